package thin

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/pebblemeta"
)

const bs4k = 4 * kib

func volStatus(t testing.TB, p *Pool, name string) VolumeStatus {
	t.Helper()
	for _, v := range p.Status().Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("no volume %s in status", name)
	return VolumeStatus{}
}

// fillPool writes new blocks into volume filler until the pool has no
// unreserved space left, and checks that it then refuses one more.
func fillPool(t testing.TB, p *Pool, filler string) {
	t.Helper()
	v, err := p.Volume(filler)
	if err != nil {
		t.Fatal(err)
	}
	blocks := v.Size() / bs4k
	b := pattern(bs4k, 77)
	var vb uint64
	for ; vb < blocks; vb++ {
		err = v.WriteAt([][]byte{b}, int64(vb*bs4k))
		if errors.Is(err, ErrNoSpace) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if vb == blocks {
		t.Fatalf("filler %s never ran out of space", filler)
	}
	if errors.Is(err, unix.ENOSPC) {
		return // the host is full (hostLimitData)
	}
	if s := p.Status(); s.Pool.FreeBytes != 0 {
		t.Fatalf("pool full, yet %d bytes free", s.Pool.FreeBytes)
	}
}

// writeAll overwrites every block of [off, off+n) of a volume one block
// at a time: the promise says none of these writes may fail.
func writeAll(t testing.TB, p *Pool, name string, off, n int64, seed byte) {
	t.Helper()
	v, err := p.Volume(name)
	if err != nil {
		t.Fatal(err)
	}
	for pos := off; pos < off+n; pos += bs4k {
		if err := v.WriteAt([][]byte{pattern(bs4k, seed)}, pos); err != nil {
			t.Fatalf("write %s at %d (promised space): %v", name, pos, err)
		}
	}
}

func TestSnapshotReservesForProvisionedBlocks(t *testing.T) {
	p, dir := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "v", 16*bs4k)
	mustVolume(t, p, "fill", 64*bs4k)
	// 8 provisioned blocks: 4 written (mapped), 4 only reserved.
	if err := v.WriteZeroes(0, 8*bs4k, false); err != nil {
		t.Fatal(err)
	}
	write(t, v, 0, pattern(4*bs4k, 1))
	write(t, v, 10*bs4k, pattern(bs4k, 2)) // written, not provisioned: no promise
	before := p.Status()
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	s := checkAccounting(t, p)
	// v now needs a copy for each of its 8 provisioned blocks; the 4
	// reservation entries it froze are no longer counted for themselves.
	if got, want := s.Pool.ReservedBytes-before.Pool.ReservedBytes, uint64(4*bs4k); got != want {
		t.Fatalf("snapshot reserved %d more bytes, want %d", got, want)
	}
	vs := volStatus(t, p, "v")
	if vs.ReservedSharedBytes != 8*bs4k || vs.ReservedProvisionedBytes != 0 || vs.ReservedBytes != 8*bs4k {
		t.Fatalf("v after snapshot: %+v", vs)
	}
	fillPool(t, p, "fill")
	// Every provisioned block can be overwritten (copy-on-write from the
	// reservation), partial writes included.
	if err := v.WriteAt([][]byte{pattern(512, 3)}, 5*bs4k+1024); err != nil {
		t.Fatalf("partial write of a provisioned shared block: %v", err)
	}
	writeAll(t, p, "v", 0, 8*bs4k, 4)
	// The unprovisioned block has no reservation.
	if err := v.WriteAt([][]byte{pattern(bs4k, 5)}, 10*bs4k); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("write of an unprovisioned shared block in a full pool: %v, want ErrNoSpace", err)
	}
	vs = volStatus(t, p, "v")
	if vs.ReservedBytes != 0 || vs.ProvisionedBytes != 8*bs4k || vs.MappedBytes != 8*bs4k {
		t.Fatalf("v after overwriting its provisioned blocks: %+v", vs)
	}
	// The snapshot still reads the old data.
	snap, _ := p.Volume("s")
	if got := read(t, snap, 0, 4*bs4k); string(got) != string(pattern(4*bs4k, 1)) {
		t.Fatal("snapshot changed")
	}
	s = checkAccounting(t, p)
	p.Close()
	p2, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if s2 := checkAccounting(t, p2); s2.Pool.ReservedBytes != s.Pool.ReservedBytes || s2.Pool.AllocatedBytes != s.Pool.AllocatedBytes ||
		fmt.Sprint(s2.Volumes) != fmt.Sprint(s.Volumes) {
		t.Fatalf("reopened pool differs:\n%+v\n%+v", s, s2)
	}
}

func TestSnapshotWithoutSpaceIsRefused(t *testing.T) {
	p, _ := newPool(t, 32, CreateOptions{})
	v := mustVolume(t, p, "v", 16*bs4k)
	mustVolume(t, p, "fill", 64*bs4k)
	if err := v.WriteZeroes(0, 8*bs4k, false); err != nil {
		t.Fatal(err)
	}
	write(t, v, 0, pattern(8*bs4k, 1)) // 8 provisioned, mapped
	fillPool(t, p, "fill")
	// Make room for 7 of the 8 copies.
	fill, _ := p.Volume("fill")
	if err := fill.Discard(0, 7*bs4k); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	settle(p)
	before := p.Status()
	names := p.Volumes()
	err := p.CreateSnapshot("v", "s", false)
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("snapshot needing 8 blocks with 7 free: %v, want ErrNoSpace", err)
	}
	if after := p.Status(); fmt.Sprint(withoutHost(after)) != fmt.Sprint(withoutHost(before)) || fmt.Sprint(p.Volumes()) != fmt.Sprint(names) {
		t.Fatalf("a refused snapshot changed the pool:\n%+v\n%+v", before, after)
	}
	// A group is refused as a whole too, even when one member would fit.
	mustVolume(t, p, "w", 16*bs4k)
	err = p.CreateSnapshots([]SnapshotSpec{{Origin: "w", Name: "ws"}, {Origin: "v", Name: "vs"}})
	if !errors.Is(err, ErrNoSpace) || len(p.Volumes()) != 3 {
		t.Fatalf("group: %v, volumes %v", err, p.Volumes())
	}
	if err := fill.Discard(7*bs4k, bs4k); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatalf("snapshot with exactly enough space: %v", err)
	}
	checkAccounting(t, p)
}

func TestCloneReservationsAndRelease(t *testing.T) {
	p, _ := newPool(t, 128, CreateOptions{})
	v := mustVolume(t, p, "v", 16*bs4k)
	if err := v.WriteZeroes(0, 4*bs4k, false); err != nil {
		t.Fatal(err)
	}
	write(t, v, 0, pattern(4*bs4k, 1))
	if err := p.CreateSnapshot("v", "c", true); err != nil {
		t.Fatal(err)
	}
	// Both writable sharers can copy each provisioned block.
	for _, n := range []string{"v", "c"} {
		if vs := volStatus(t, p, n); vs.ReservedSharedBytes != 4*bs4k {
			t.Fatalf("%s: %+v", n, vs)
		}
	}
	checkAccounting(t, p)
	// A whole-block discard of a shared provisioned block gives its
	// reservation back; so does a copy made by a write.
	c, _ := p.Volume("c")
	if err := c.Discard(0, bs4k); err != nil {
		t.Fatal(err)
	}
	write(t, c, bs4k, pattern(100*512, 2)[:bs4k])
	if vs := volStatus(t, p, "c"); vs.ReservedSharedBytes != 2*bs4k || vs.ProvisionedBytes != bs4k {
		t.Fatalf("c after discard and copy: %+v", vs)
	}
	// Deleting the clone leaves v the only reader of the frozen layer,
	// which folds into v: v owns its blocks again and needs no copies.
	if err := p.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	if vs := volStatus(t, p, "v"); vs.ReservedBytes != 0 || vs.ProvisionedBytes != 4*bs4k {
		t.Fatalf("v after the clone's delete: %+v", vs)
	}
	if s := checkAccounting(t, p); s.Pool.ReservedBytes != 0 {
		t.Fatalf("pool still reserves %d bytes", s.Pool.ReservedBytes)
	}
}

func TestReserveMode(t *testing.T) {
	p, dir := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "v", 16*bs4k)
	mustVolume(t, p, "big", 100*bs4k)
	write(t, v, 0, pattern(4*bs4k, 1))
	if err := p.SetReserveMode("big", true); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("reserve mode for 100 blocks in a 64-block pool: %v", err)
	}
	if vs := volStatus(t, p, "big"); vs.ReserveMode || vs.ReservedBytes != 0 {
		t.Fatalf("refused reserve mode changed the volume: %+v", vs)
	}
	if err := p.SetReserveMode("v", true); err != nil {
		t.Fatal(err)
	}
	if vs := volStatus(t, p, "v"); !vs.ReserveMode || vs.ReservedReserveModeBytes != 12*bs4k {
		t.Fatalf("v in reserve mode: %+v", vs)
	}
	checkAccounting(t, p)
	// Persisted.
	p.Close()
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if vs := volStatus(t, p, "v"); !vs.ReserveMode || vs.ReservedReserveModeBytes != 12*bs4k {
		t.Fatalf("v in reserve mode after reopen: %+v", vs)
	}
	fillPool(t, p, "big")
	writeAll(t, p, "v", 0, 16*bs4k, 2)
	if vs := volStatus(t, p, "v"); vs.ReservedBytes != 0 || vs.MappedBytes != 16*bs4k {
		t.Fatalf("v fully written: %+v", vs)
	}
	// A snapshot of a reserve-mode volume must reserve all 16 blocks again.
	if err := p.CreateSnapshot("v", "s", false); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("snapshot of a full reserve-mode volume in a full pool: %v", err)
	}
	big, _ := p.Volume("big")
	if err := big.Discard(0, 100*bs4k); err != nil {
		t.Fatal(err)
	}
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	if vs := volStatus(t, p, "v"); vs.ReservedReserveModeBytes != 16*bs4k {
		t.Fatalf("v after snapshot: %+v", vs)
	}
	// Growing a reserve-mode volume reserves the new part, or fails.
	if err := p.ResizeVolume("v", 1000*bs4k); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("resize beyond the pool in reserve mode: %v", err)
	}
	if err := p.ResizeVolume("v", 20*bs4k); err != nil {
		t.Fatal(err)
	}
	if err := p.SetReserveMode("s", true); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("reserve mode on a read-only snapshot: %v", err)
	}
	if err := p.SetReserveMode("v", false); err != nil {
		t.Fatal(err)
	}
	if s := checkAccounting(t, p); s.Pool.ReservedBytes != 0 {
		t.Fatalf("reserve mode off, pool still reserves %d", s.Pool.ReservedBytes)
	}
}

// TestPromiseRandom runs random operations on volumes, snapshots and
// clones in a small pool; now and then it fills the pool from a filler
// volume and overwrites every block a writable volume was promised
// (provisioned, or all of it in reserve mode): none may fail. Check must
// be clean after each round. THIN_PROMISE_SEED picks one seed.
func TestPromiseRandom(t *testing.T) {
	seeds := []uint64{1, 2, 3, 4, 5, 6}
	if s := os.Getenv("THIN_PROMISE_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		seeds = []uint64{n}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { promiseRound(t, seed) })
	}
}

func promiseRound(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 99))
	const volBlocks = 12
	p, host := newHostLimitedPool(t, 160)
	mustVolume(t, p, "fill", 400*bs4k)
	mustVolume(t, p, "v0", volBlocks*bs4k)
	n := 1
	writable := func() []string {
		var out []string
		for _, vs := range p.Status().Volumes {
			if vs.Kind != "snapshot" && vs.Name != "fill" {
				out = append(out, vs.Name)
			}
		}
		return out
	}
	all := func() []string {
		var out []string
		for _, name := range p.Volumes() {
			if name != "fill" {
				out = append(out, name)
			}
		}
		return out
	}
	for step := 0; step < 120; step++ {
		ws := writable()
		names := all()
		pick := func(from []string) string { return from[rng.IntN(len(from))] }
		off := int64(rng.IntN(volBlocks)) * bs4k
		length := int64(1+rng.IntN(4)) * bs4k
		length = min(length, volBlocks*bs4k-off)
		op := rng.IntN(10)
		var err error
		switch {
		case op < 3 && len(ws) > 0:
			v, _ := p.Volume(pick(ws))
			err = v.WriteAt([][]byte{pattern(int(length), byte(step))}, off)
		case op < 5 && len(ws) > 0:
			v, _ := p.Volume(pick(ws))
			err = v.WriteZeroes(off, length, false)
		case op == 5 && len(ws) > 0:
			v, _ := p.Volume(pick(ws))
			err = v.WriteZeroes(off, length, rng.IntN(2) == 0)
		case op == 6 && len(names) > 0:
			err = p.CreateSnapshot(pick(names), fmt.Sprintf("v%d", n), rng.IntN(2) == 0)
			n++
		case op == 7 && len(names) > 1:
			err = p.DeleteVolume(pick(names))
		case op == 8 && len(ws) > 0:
			err = p.SetReserveMode(pick(ws), rng.IntN(3) == 0)
		case op == 9:
			if len(names) == 0 {
				mustVolume(t, p, fmt.Sprintf("v%d", n), volBlocks*bs4k)
				n++
			}
			checkPromise(t, p, host, rng)
		}
		if err != nil && !errors.Is(err, ErrNoSpace) {
			t.Fatalf("step %d: %v", step, err)
		}
	}
	checkPromise(t, p, host, rng)
}

// checkPromise fills the pool, then overwrites every promised block of
// every writable volume, then gives the filler's space back.
func checkPromise(t *testing.T, p *Pool, host *hostSpace, rng *rand.Rand) {
	t.Helper()
	checkAccounting(t, p)
	// The host has room for only 0 to 2 more blocks than the pool holds
	// now: the promised writes must need no new host space.
	host.setLimit(host.used() + rng.IntN(3))
	defer host.setLimit(0)
	fillPool(t, p, "fill")
	for _, vs := range p.Status().Volumes {
		if vs.Kind == "snapshot" || vs.Name == "fill" {
			continue
		}
		v, _ := p.Volume(vs.Name)
		for vb := uint64(0); vb < vs.SizeBytes/bs4k; vb++ {
			promised := vs.ReserveMode
			if !promised {
				p.mu.Lock()
				e, _, err := p.resolveLocked(v.st.rec.Layer, vb)
				p.mu.Unlock()
				if err != nil {
					t.Fatal(err)
				}
				promised = e.Flags&pebblemeta.FlagProvisioned != 0
			}
			if !promised {
				continue
			}
			// Half partial, half whole-block writes.
			b := pattern(bs4k, byte(vb))
			off := int64(vb * bs4k)
			if rng.IntN(2) == 0 {
				b, off = b[:1024], off+2048
			}
			if err := v.WriteAt([][]byte{b}, off); err != nil {
				t.Fatalf("promised write to %s block %d failed: %v", vs.Name, vb, err)
			}
		}
	}
	fill, _ := p.Volume("fill")
	if err := fill.Discard(0, int64(fill.Size())); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p)
}

// withoutHost drops what the host's other tenants change from a status.
func withoutHost(s Status) Status {
	s.Pool.HostFreeBytes, s.Pool.HostUnbackedBytes, s.Pool.HostBelowLowWater = 0, 0, false
	return s
}
