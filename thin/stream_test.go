package thin

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/thinblk/thinblk/stream"
)

// blockState is what a block of a volume is, as a stream must carry it.
type blockState struct {
	mapped, provisioned bool
	data                []byte // what it reads
}

// volumeBlocks reads every block of a volume with its map state.
func volumeBlocks(t *testing.T, p *Pool, name string) []blockState {
	t.Helper()
	v, err := p.Volume(name)
	if err != nil {
		t.Fatal(err)
	}
	bs := uint64(p.blockSize)
	size := v.Size()
	out := make([]blockState, (size+bs-1)/bs)
	for vb := range out {
		p.mu.Lock()
		e, _, err := p.resolveLocked(v.st.rec.Layer, uint64(vb))
		p.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		n := min(bs, size-uint64(vb)*bs)
		out[vb] = blockState{mapped: e.Mapped(), provisioned: e.Provisioned(), data: read(t, v, int64(vb)*int64(bs), int(n))}
	}
	return out
}

// sameVolume compares two volumes block by block: contents, mapped and
// provisioned.
func sameVolume(t *testing.T, a *Pool, an string, b *Pool, bn string) {
	t.Helper()
	x, y := volumeBlocks(t, a, an), volumeBlocks(t, b, bn)
	if len(x) != len(y) {
		t.Fatalf("%s has %d blocks, %s %d", an, len(x), bn, len(y))
	}
	for i := range x {
		if x[i].mapped != y[i].mapped || x[i].provisioned != y[i].provisioned || !bytes.Equal(x[i].data, y[i].data) {
			t.Fatalf("block %d: %s mapped %v provisioned %v, %s mapped %v provisioned %v, data equal %v",
				i, an, x[i].mapped, x[i].provisioned, bn, y[i].mapped, y[i].provisioned, bytes.Equal(x[i].data, y[i].data))
		}
	}
}

// scribble changes a volume at random: whole and partial writes,
// discards and provisioning, over its first blocks and its last one.
// It returns the blocks it touched.
func scribble(t *testing.T, rng *rand.Rand, v *Volume, ops int) map[uint64]bool {
	t.Helper()
	bs := int64(v.BlockSize())
	touched := map[uint64]bool{}
	for range ops {
		vb := rng.Int64N(40)
		if rng.IntN(8) == 0 {
			vb = (int64(v.Size())-1)/bs - rng.Int64N(2) // near the end of a volume larger than the pool
		}
		off := vb * bs
		n := bs * (1 + rng.Int64N(3))
		if rng.IntN(3) == 0 { // partial
			off += 512 * rng.Int64N(bs/512)
			n = 512 * (1 + rng.Int64N(bs/512))
		}
		n = min(n, int64(v.Size())-off)
		var err error
		switch rng.IntN(6) {
		case 0:
			err = v.Discard(off, n)
		case 1:
			err = v.WriteZeroes(off, n, false)
		default:
			err = v.WriteAt([][]byte{pattern(int(n), byte(rng.IntN(256)))}, off)
		}
		if err != nil {
			t.Fatalf("op at %d+%d: %v", off, n, err)
		}
		for b := off / bs; b <= (off+n-1)/bs; b++ {
			touched[uint64(b)] = true
		}
	}
	return touched
}

func send(t *testing.T, p *Pool, snap, base string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := p.Send(&buf, snap, SendOptions{Base: base}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// streamPools makes a source and a destination pool of 256 blocks of 4
// KiB, and on the source a volume "vm" of 4 MiB: larger than either pool.
func streamPools(t *testing.T) (src, dst *Pool, v *Volume) {
	src, _ = newPool(t, 256, CreateOptions{})
	dst, _ = newPool(t, 256, CreateOptions{})
	return src, dst, mustVolume(t, src, "vm", 4<<20)
}

// Full, then three incrementals, each compared block by block with the
// source snapshot (data, mapped, provisioned), the pools checked clean.
func TestSendReceiveRoundTrips(t *testing.T) {
	src, dst, v := streamPools(t)
	rng := rand.New(rand.NewPCG(15, 1))
	scribble(t, rng, v, 60)
	if err := src.CreateSnapshot("vm", "s0", false); err != nil {
		t.Fatal(err)
	}
	full := send(t, src, "s0", "")
	h, err := dst.Receive(bytes.NewReader(full), "vm", ReceiveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h.Incremental || h.Name != "s0" {
		t.Fatalf("header %+v", h)
	}
	sameVolume(t, src, "s0", dst, "s0")
	sameVolume(t, src, "s0", dst, "vm")
	checkExactSpace(t, dst)
	for i := 1; i <= 3; i++ {
		if i == 2 {
			if err := src.ResizeVolume("vm", v.Size()+64*kib); err != nil {
				t.Fatal(err)
			}
		}
		touched := scribble(t, rng, v, 12)
		name, base := fmt.Sprintf("s%d", i), fmt.Sprintf("s%d", i-1)
		if err := src.CreateSnapshot("vm", name, false); err != nil {
			t.Fatal(err)
		}
		inc := send(t, src, name, base)
		h, err := dst.Receive(bytes.NewReader(inc), "vm", ReceiveOptions{})
		if err != nil {
			t.Fatalf("incremental %s: %v", name, err)
		}
		// Only what was touched travels.
		if got := h.DataBlocks + h.ProvisionBlocks + h.DiscardBlocks; got == 0 || got > uint64(len(touched)) {
			t.Fatalf("incremental %s carries %d blocks, %d were touched", name, got, len(touched))
		}
		sameVolume(t, src, name, dst, name)
		sameVolume(t, src, name, dst, "vm")
		sameVolume(t, src, base, dst, base) // the older one unchanged
		checkExactSpace(t, dst)
		checkExactSpace(t, src)
	}
	// The receiver's snapshots carry the sender's ids.
	for _, n := range []string{"s0", "s3"} {
		if a, b := src.vols[n].rec.StreamID, dst.vols[n].rec.StreamID; a != b || a == ([16]byte{}) {
			t.Fatalf("snapshot %s ids %x, %x", n, a, b)
		}
	}
}

// frames lists the records of a stream: type and where each starts.
func frames(t *testing.T, b []byte) (types []byte, offs []int) {
	t.Helper()
	for off := 10; off < len(b); {
		types, offs = append(types, b[off]), append(offs, off)
		off += 13 + int(binary.BigEndian.Uint32(b[off+9:])) + 4
	}
	return types, offs
}

// space is a pool's allocated and reserved bytes.
type space struct{ allocated, reserved uint64 }

func spaceOf(p *Pool) space {
	s := p.Status()
	return space{s.Pool.AllocatedBytes, s.Pool.ReservedBytes}
}

// untouched asserts that a failed receive left the destination as it was:
// the volumes named, the same space used, check clean.
func untouched(t *testing.T, dst *Pool, vols []string, want space) {
	t.Helper()
	if got := dst.Volumes(); strings.Join(got, ",") != strings.Join(vols, ",") {
		t.Fatalf("volumes %v, want %v", got, vols)
	}
	checkAccounting(t, dst)
	if got := spaceOf(dst); got != want {
		t.Fatalf("allocated, reserved bytes %v, want %v", got, want)
	}
}

func TestBadStreamsLeaveNothing(t *testing.T) {
	src, dst, v := streamPools(t)
	bs := int64(4 * kib)
	write(t, v, 0, pattern(int(8*bs), 3))
	if err := v.WriteZeroes(10*bs, 2*bs, false); err != nil { // provisioned, not written
		t.Fatal(err)
	}
	if err := src.CreateSnapshot("vm", "s1", false); err != nil {
		t.Fatal(err)
	}
	write(t, v, 2*bs, pattern(int(bs), 9))
	if err := v.Discard(4*bs, bs); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteZeroes(20*bs, bs, false); err != nil {
		t.Fatal(err)
	}
	if err := src.CreateSnapshot("vm", "s2", false); err != nil {
		t.Fatal(err)
	}
	full, inc := send(t, src, "s1", ""), send(t, src, "s2", "s1")
	ft, _ := frames(t, full)
	it, _ := frames(t, inc)
	if string(ft) != "HDPE" || string(it) != "HDZPE" {
		t.Fatalf("record types: full %q, incremental %q", ft, it)
	}
	rng := rand.New(rand.NewPCG(15, 2))
	bad := func(b []byte, what string) {
		t.Helper()
		_, err := dst.Receive(bytes.NewReader(b), "vm", ReceiveOptions{})
		if !errors.Is(err, stream.ErrBadStream) {
			t.Fatalf("%s: %v", what, err)
		}
	}
	// The full stream, cut or corrupted: no volume, no space taken.
	for range 20 {
		n := rng.IntN(len(full))
		bad(full[:n], fmt.Sprintf("full stream cut at %d", n))
		untouched(t, dst, nil, space{})
	}
	for _, flip := range flips(t, full) {
		bad(flip.b, "full stream, "+flip.what)
		untouched(t, dst, nil, space{})
	}
	if _, err := dst.Receive(bytes.NewReader(full), "vm", ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	before := spaceOf(dst)
	onS1 := func() {
		t.Helper()
		untouched(t, dst, []string{"s1", "vm"}, before)
		sameVolume(t, src, "s1", dst, "vm")
	}
	// The incremental stream, cut or corrupted: the volume back on s1.
	for range 20 {
		n := rng.IntN(len(inc))
		bad(inc[:n], fmt.Sprintf("incremental stream cut at %d", n))
		onS1()
	}
	for _, flip := range flips(t, inc) {
		bad(flip.b, "incremental stream, "+flip.what)
		onS1()
	}
	if _, err := dst.Receive(bytes.NewReader(inc), "vm", ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	sameVolume(t, src, "s2", dst, "vm")
	checkExactSpace(t, dst)
}

type flipped struct {
	b    []byte
	what string
}

// flips corrupts one byte in each record (header, data, provision,
// discard, end) and in each part of a frame.
func flips(t *testing.T, b []byte) []flipped {
	types, offs := frames(t, b)
	var out []flipped
	for i, off := range offs {
		end := len(b)
		if i+1 < len(offs) {
			end = offs[i+1]
		}
		for _, at := range []int{off, off + 1 + 7, off + 9 + 3, off + 13, end - 1} {
			c := bytes.Clone(b)
			c[at] ^= 0x40
			out = append(out, flipped{c, fmt.Sprintf("byte %d of the %s record flipped", at-off, stream.TypeName(types[i]))})
		}
	}
	return out
}

func TestReceiveRefusesWrongBase(t *testing.T) {
	src, dst, v := streamPools(t)
	write(t, v, 0, pattern(16*kib, 1))
	for _, s := range []string{"s1", "s2", "s3"} {
		if err := src.CreateSnapshot("vm", s, false); err != nil {
			t.Fatal(err)
		}
		write(t, v, 4*kib, pattern(4*kib, s[1]))
	}
	full, inc12, inc23 := send(t, src, "s1", ""), send(t, src, "s2", "s1"), send(t, src, "s3", "s2")
	wrongBase := func(b []byte, vol, want string) {
		t.Helper()
		before, vols := spaceOf(dst), dst.Volumes()
		_, err := dst.Receive(bytes.NewReader(b), vol, ReceiveOptions{})
		if !errors.Is(err, ErrStreamBase) || !strings.Contains(err.Error(), want) {
			t.Fatalf("want %q: %v", want, err)
		}
		untouched(t, dst, vols, before)
	}
	wrongBase(inc12, "vm", "no such volume")
	if _, err := dst.Receive(bytes.NewReader(full), "vm", ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	wrongBase(inc23, "vm", "no snapshot s2")
	// Another pool's s1 is another snapshot: same name, another id.
	other, _ := newPool(t, 256, CreateOptions{})
	ov := mustVolume(t, other, "vm", 4<<20)
	write(t, ov, 0, pattern(16*kib, 1))
	for _, s := range []string{"s1", "s2"} {
		if err := other.CreateSnapshot("vm", s, false); err != nil {
			t.Fatal(err)
		}
	}
	wrongBase(send(t, other, "s2", "s1"), "vm", "it is another snapshot")
	// A volume written since its base: refused, then dropped with Force.
	dv, _ := dst.Volume("vm")
	write(t, dv, 8*kib, pattern(4*kib, 99))
	wrongBase(inc12, "vm", "changed since snapshot s1")
	if _, err := dst.Receive(bytes.NewReader(inc12), "vm", ReceiveOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	sameVolume(t, src, "s2", dst, "vm")
	// The same incremental twice: its snapshot exists.
	if _, err := dst.Receive(bytes.NewReader(inc12), "vm", ReceiveOptions{}); !errors.Is(err, ErrVolumeExists) {
		t.Fatalf("incremental applied twice: %v", err)
	}
	// A volume named like the stream's snapshot.
	if _, err := dst.Receive(bytes.NewReader(full), "s1", ReceiveOptions{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("volume named like the snapshot: %v", err)
	}
	// A full stream onto an existing volume.
	if _, err := dst.Receive(bytes.NewReader(full), "vm", ReceiveOptions{}); !errors.Is(err, ErrVolumeExists) {
		t.Fatalf("full stream onto a volume: %v", err)
	}
	checkExactSpace(t, dst)
}

// A stream needing more blocks than the pool has free fails with "no
// space" before it writes anything, full or incremental.
func TestReceiveNoSpace(t *testing.T) {
	src, _, v := streamPools(t)
	small, _ := newPool(t, 24, CreateOptions{})
	write(t, v, 0, pattern(20*4*kib, 5))
	if err := v.WriteZeroes(100*4*kib, 8*4*kib, false); err != nil {
		t.Fatal(err)
	}
	if err := src.CreateSnapshot("vm", "s1", false); err != nil {
		t.Fatal(err)
	}
	_, err := small.Receive(bytes.NewReader(send(t, src, "s1", "")), "vm", ReceiveOptions{})
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "needs 28 blocks") {
		t.Fatalf("full stream of 28 blocks into 24: %v", err)
	}
	untouched(t, small, nil, space{})
	// Room for the full stream, not for the incremental on top.
	mid, _ := newPool(t, 32, CreateOptions{})
	if _, err := mid.Receive(bytes.NewReader(send(t, src, "s1", "")), "vm", ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	write(t, v, 40*4*kib, pattern(8*4*kib, 6))
	if err := src.CreateSnapshot("vm", "s2", false); err != nil {
		t.Fatal(err)
	}
	before := spaceOf(mid)
	if _, err := mid.Receive(bytes.NewReader(send(t, src, "s2", "s1")), "vm", ReceiveOptions{}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("incremental of 8 blocks with 4 free: %v", err)
	}
	untouched(t, mid, []string{"s1", "vm"}, before)
	sameVolume(t, src, "s1", mid, "vm")
}

// The space a receive holds is its own: other volumes' writes fail for
// lack of it while the receiving volume's writes and provisioning take it.
func TestReceiveReservationHolds(t *testing.T) {
	p, _ := newPool(t, 32, CreateOptions{})
	rv := mustVolume(t, p, "rv", 1<<20)
	other := mustVolume(t, p, "other", 1<<20)
	write(t, other, 0, pattern(4*4*kib, 1))
	if err := p.holdForReceive("rv", 28); err != nil {
		t.Fatal(err)
	}
	if err := p.holdForReceive("other", 1); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("second hold beyond free space: %v", err)
	}
	if err := other.WriteAt([][]byte{make([]byte, 4*kib)}, 10*4*kib); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("another volume took reserved space: %v", err)
	}
	write(t, rv, 0, pattern(20*4*kib, 2))
	if err := rv.WriteZeroes(30*4*kib, 8*4*kib, false); err != nil {
		t.Fatalf("provisioning from the reservation: %v", err)
	}
	if rv.st.recvRes != 0 {
		t.Fatalf("%d blocks still held", rv.st.recvRes)
	}
	s := checkAccounting(t, p)
	if s.Pool.FreeBytes != 0 {
		t.Fatalf("free %d, want 0", s.Pool.FreeBytes)
	}
	p.Flush()
	if err := p.holdForReceive("rv", 0); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p)
}

// Provisioned data blocks, once the received volume is snapshotted, need
// a block each reserved for their copy-on-write: receive reserves those up
// front too, so it never fails for space after writing.
func TestReceiveReservesSnapshotCopies(t *testing.T) {
	src, _, v := streamPools(t)
	bs := int64(4 * kib)
	if err := v.WriteZeroes(0, 10*bs, false); err != nil {
		t.Fatal(err)
	}
	write(t, v, 0, pattern(int(10*bs), 4)) // provisioned and written
	write(t, v, 20*bs, pattern(int(2*bs), 5))
	if err := src.CreateSnapshot("vm", "s1", false); err != nil {
		t.Fatal(err)
	}
	full := send(t, src, "s1", "")
	tight, _ := newPool(t, 21, CreateOptions{})
	if _, err := tight.Receive(bytes.NewReader(full), "vm", ReceiveOptions{}); !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "needs 22 blocks") {
		t.Fatalf("12 data blocks, 10 of them provisioned, into 21 blocks: %v", err)
	}
	untouched(t, tight, nil, space{})
	exact, _ := newPool(t, 22, CreateOptions{})
	if _, err := exact.Receive(bytes.NewReader(full), "vm", ReceiveOptions{}); err != nil {
		t.Fatal(err)
	}
	sameVolume(t, src, "s1", exact, "vm")
	checkExactSpace(t, exact)
	if got := spaceOf(exact); got != (space{12 * uint64(bs), 10 * uint64(bs)}) {
		t.Fatalf("allocated, reserved %v: want 12 blocks and the 10 copies", got)
	}
	// The promise holds: every provisioned block can be overwritten.
	dv, _ := exact.Volume("vm")
	write(t, dv, 0, pattern(int(10*bs), 6))
}
