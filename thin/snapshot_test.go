package thin

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/thinblk/thinblk/pebblemeta"
)

// image is what a test expects a volume to read: one byte slice per volume.
type images map[string][]byte

func (im images) write(t *testing.T, p *Pool, name string, off int64, b []byte) {
	t.Helper()
	v, err := p.Volume(name)
	if err != nil {
		t.Fatal(err)
	}
	write(t, v, off, b)
	copy(im[name][off:], b)
}

func (im images) zero(t *testing.T, p *Pool, name string, off, n int64, unmap bool) {
	t.Helper()
	v, err := p.Volume(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.WriteZeroes(off, n, unmap); err != nil {
		t.Fatalf("zero %s %d+%d unmap=%v: %v", name, off, n, unmap, err)
	}
	clear(im[name][off : off+n])
}

func (im images) verify(t *testing.T, p *Pool) {
	t.Helper()
	for name, want := range im {
		v, err := p.Volume(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := read(t, v, 0, len(want)); !bytes.Equal(got, want) {
			i := 0
			for got[i] == want[i] {
				i++
			}
			t.Fatalf("volume %s differs first at byte %d: got %#x want %#x", name, i, got[i], want[i])
		}
	}
}

// reachableBlocks counts the distinct physical blocks some volume can read:
// exactly what the pool should have allocated.
func reachableBlocks(t *testing.T, p *Pool) uint64 {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := map[uint64]bool{}
	for _, v := range p.vols {
		for vb := uint64(0); vb < (v.rec.Size+uint64(p.blockSize)-1)/uint64(p.blockSize); vb++ {
			e, _, err := p.resolveLocked(v.rec.Layer, vb)
			if err != nil {
				t.Fatal(err)
			}
			if e.Mapped() {
				seen[e.PBlock] = true
			}
		}
	}
	return uint64(len(seen))
}

func checkExactSpace(t *testing.T, p *Pool) {
	t.Helper()
	s := checkAccounting(t, p)
	if got, want := s.Pool.AllocatedBytes/uint64(p.blockSize), reachableBlocks(t, p); got != want {
		t.Fatalf("pool has %d blocks allocated, volumes can read %d", got, want)
	}
}

// buildSnapshots makes a volume "v" with data, a read-only snapshot "s",
// a clone "c" of v, a read-only snapshot "ss" of the snapshot, and
// diverging writes, discards and provisioning in each writable one.
func buildSnapshots(t *testing.T, p *Pool) images {
	const size = 16 * 4 * kib
	im := images{"v": make([]byte, size)}
	mustVolume(t, p, "v", size)
	im.write(t, p, "v", 0, pattern(8*4*kib, 1))
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	im["s"] = bytes.Clone(im["v"])
	if err := p.CreateSnapshot("v", "c", true); err != nil {
		t.Fatal(err)
	}
	im["c"] = bytes.Clone(im["v"])
	// Partial writes copy the rest of the shared block.
	im.write(t, p, "v", 512, pattern(1024, 9))
	im.write(t, p, "c", 4*kib+3072, pattern(2048, 17)) // spans blocks 1 and 2
	if err := p.CreateSnapshot("s", "ss", false); err != nil {
		t.Fatal(err)
	}
	im["ss"] = bytes.Clone(im["s"])
	// Whole-block discard of a shared block: a hole, the snapshot keeps it.
	im.zero(t, p, "v", 2*4*kib, 4*kib, true)
	// Partial discard and partial provisioning of shared blocks: copied first.
	im.zero(t, p, "v", 3*4*kib+512, 1024, true)
	im.zero(t, p, "c", 4*4*kib+512, 1024, false)
	// Whole-block provisioning of a shared block.
	im.zero(t, p, "c", 5*4*kib, 4*kib, false)
	// New blocks beyond the shared ones, and rewrites of copied ones.
	im.write(t, p, "c", 10*4*kib, pattern(4*kib, 33))
	im.write(t, p, "v", 0, pattern(4*kib, 41))
	return im
}

func TestSnapshotCopyOnWrite(t *testing.T) {
	p, dir := newPool(t, 256, CreateOptions{})
	im := buildSnapshots(t, p)
	im.verify(t, p)
	checkExactSpace(t, p)
	s := p.Status()
	kinds := map[string]string{}
	for _, v := range s.Volumes {
		kinds[v.Name] = v.Kind + "<" + v.Origin
	}
	if want := "map[c:clone<v s:snapshot<v ss:snapshot<s v:volume<]"; fmt.Sprint(kinds) != want {
		t.Fatalf("kinds %v, want %s", kinds, want)
	}
	// Everything survives a reopen.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	im.verify(t, p)
	checkExactSpace(t, p)
}

func TestReadOnlySnapshotRefusesChanges(t *testing.T) {
	p, _ := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "v", 64*kib)
	write(t, v, 0, pattern(4*kib, 3))
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	s, err := p.Volume("s")
	if err != nil {
		t.Fatal(err)
	}
	if !s.ReadOnly() || v.ReadOnly() {
		t.Fatalf("ReadOnly: snapshot %v, volume %v", s.ReadOnly(), v.ReadOnly())
	}
	for what, err := range map[string]error{
		"write":        s.WriteAt([][]byte{make([]byte, 512)}, 0),
		"discard":      s.Discard(0, 4*kib),
		"write-zeroes": s.WriteZeroes(0, 4*kib, false),
		"resize":       p.ResizeVolume("s", 128*kib),
	} {
		if !errors.Is(err, ErrReadOnly) {
			t.Errorf("%s on a read-only snapshot: %v, want ErrReadOnly", what, err)
		}
	}
	if got := read(t, s, 0, 4*kib); !bytes.Equal(got, pattern(4*kib, 3)) {
		t.Fatal("snapshot changed")
	}
	for _, bad := range [][]SnapshotSpec{
		{{Origin: "v", Name: "s"}},                           // exists
		{{Origin: "nope", Name: "x"}},                        // no origin
		{{Origin: "v", Name: "a/b"}},                         // bad name
		{{Origin: "v", Name: "x"}, {Origin: "v", Name: "x"}}, // twice
	} {
		if err := p.CreateSnapshots(bad); err == nil {
			t.Errorf("CreateSnapshots(%v) succeeded", bad)
		}
	}
	if got := p.Volumes(); fmt.Sprint(got) != "[s v]" {
		t.Fatalf("a refused snapshot left volumes behind: %v", got)
	}
	checkExactSpace(t, p)
}

func TestConsistencyGroupAllOrNothing(t *testing.T) {
	p, _ := newPool(t, 64, CreateOptions{})
	a := mustVolume(t, p, "a", 64*kib)
	b := mustVolume(t, p, "b", 64*kib)
	write(t, a, 0, pattern(4*kib, 1))
	write(t, b, 0, pattern(4*kib, 2))
	// One bad member: nothing is created, nothing is frozen.
	err := p.CreateSnapshots([]SnapshotSpec{{Origin: "a", Name: "a1"}, {Origin: "b", Name: "a"}})
	if !errors.Is(err, ErrVolumeExists) {
		t.Fatalf("group with a taken name: %v", err)
	}
	if fmt.Sprint(p.Volumes()) != "[a b]" || len(p.layers) != 0 {
		t.Fatalf("refused group changed the pool: %v, %d layers", p.Volumes(), len(p.layers))
	}
	if err := p.CreateSnapshots([]SnapshotSpec{{Origin: "a", Name: "a1"}, {Origin: "b", Name: "b1", Writable: true}, {Origin: "a", Name: "a2"}}); err != nil {
		t.Fatal(err)
	}
	write(t, a, 0, pattern(4*kib, 5))
	write(t, b, 0, pattern(4*kib, 6))
	for name, seed := range map[string]byte{"a1": 1, "a2": 1, "b1": 2, "a": 5, "b": 6} {
		v, _ := p.Volume(name)
		if got := read(t, v, 0, 4*kib); !bytes.Equal(got, pattern(4*kib, seed)) {
			t.Errorf("%s does not read its point-in-time data", name)
		}
	}
	checkExactSpace(t, p)
}

// TestDeleteInEveryOrder deletes the four volumes of buildSnapshots in
// all 24 orders: after each delete the others read the same, Check is
// clean and the pool holds exactly the blocks someone can still read.
func TestDeleteInEveryOrder(t *testing.T) {
	names := []string{"v", "s", "c", "ss"}
	var perms [][]string
	var permute func(rest, acc []string)
	permute = func(rest, acc []string) {
		if len(rest) == 0 {
			perms = append(perms, append([]string(nil), acc...))
			return
		}
		for i := range rest {
			r := append(append([]string(nil), rest[:i]...), rest[i+1:]...)
			permute(r, append(acc, rest[i]))
		}
	}
	permute(names, nil)
	for _, order := range perms {
		t.Run(fmt.Sprint(order), func(t *testing.T) {
			p, _ := newPool(t, 256, CreateOptions{})
			im := buildSnapshots(t, p)
			for _, n := range order {
				if err := p.DeleteVolume(n); err != nil {
					t.Fatalf("delete %s: %v", n, err)
				}
				delete(im, n)
				im.verify(t, p)
				checkExactSpace(t, p)
			}
			if s := p.Status(); s.Pool.AllocatedBytes != 0 || s.Pool.ReservedBytes != 0 || len(p.layers) != 0 {
				t.Fatalf("after deleting everything: %+v, %d layers", s.Pool, len(p.layers))
			}
		})
	}
}

// TestSnapshotIsConstantTime: snapshotting a volume with many mapped
// blocks costs what snapshotting a nearly empty one costs (no map walk).
func TestSnapshotIsConstantTime(t *testing.T) {
	const big = 1 << 14
	p, _ := newPool(t, big+64, CreateOptions{})
	large := mustVolume(t, p, "large", big*4*kib)
	buf := make([]byte, 1<<20)
	for off := int64(0); off < big*4*kib; off += int64(len(buf)) {
		write(t, large, off, buf)
	}
	small := mustVolume(t, p, "small", 64*kib)
	write(t, small, 0, buf[:4*kib])
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	timeIt := func(origin, name string) time.Duration {
		best := time.Hour
		for i := 0; i < 3; i++ {
			start := time.Now()
			if err := p.CreateSnapshot(origin, fmt.Sprint(name, i), false); err != nil {
				t.Fatal(err)
			}
			best = min(best, time.Since(start))
		}
		return best
	}
	ts, tl := timeIt("small", "s"), timeIt("large", "l")
	t.Logf("snapshot of %d mapped blocks: %v; of 1 block: %v", big, tl, ts)
	if tl > 5*ts+20*time.Millisecond {
		t.Fatalf("snapshot of a large volume took %v, of a small one %v: not O(1)", tl, ts)
	}
	if len(p.dirty) != 0 {
		t.Fatalf("snapshots left %d map changes", len(p.dirty))
	}
	checkExactSpace(t, p)
}

// TestSnapshotCrash: snapshots, copies, holes and deletes (with their
// folds and prunes) survive crashes at random points of the data file's
// unsynced writes: after a crash Check is clean, the pool holds exactly
// the readable blocks, and what was durable reads back.
func TestSnapshotCrash(t *testing.T) {
	for seed := uint64(1); seed <= 6; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			m := newMachine()
			dir := "/pool"
			if err := create(dir, CreateOptions{Size: 256 * 4 * kib, BlockSize: 4 * kib}, m.env()); err != nil {
				t.Fatal(err)
			}
			reopen := func() *Pool {
				p, err := open(dir, quietOpts(), m.env())
				if err != nil {
					t.Fatal(err)
				}
				return p
			}
			p := reopen()
			im := buildSnapshots(t, p)
			if err := p.Flush(); err != nil {
				t.Fatal(err)
			}
			// Unflushed changes to v, then a crash.
			v, _ := p.Volume("v")
			write(t, v, 6*4*kib, pattern(4*kib, 77))
			p.abandon()
			m = m.crash(rng)
			p = reopen()
			im.verify(t, p) // v's unflushed copy of block 6 was lost
			im.write(t, p, "v", 6*4*kib, pattern(4*kib, 78))
			checkExactSpace(t, p)
			// Durable deletes in a random order, each followed by an
			// unflushed write and a crash.
			order := []string{"v", "s", "c", "ss"}
			rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			for _, n := range order {
				if err := p.DeleteVolume(n); err != nil {
					t.Fatal(err)
				}
				delete(im, n)
				old := map[string][]byte{}
				for name := range im {
					old[name] = bytes.Clone(im[name][9*4*kib : 10*4*kib])
				}
				for name := range im {
					if vv, _ := p.Volume(name); vv.st.rec.Kind != pebblemeta.KindSnapshot {
						if err := vv.WriteAt([][]byte{pattern(4*kib, 90)}, 9*4*kib); err != nil {
							t.Fatal(err)
						}
						if rng.IntN(2) == 0 {
							if err := p.Flush(); err != nil {
								t.Fatal(err)
							}
						}
						copy(im[name][9*4*kib:], pattern(4*kib, 90))
						break
					}
				}
				p.abandon()
				m = m.crash(rng)
				p = reopen()
				for name := range im {
					vv, _ := p.Volume(name)
					// Block 9 was maybe not flushed: adopt what survived.
					got := read(t, vv, 9*4*kib, 4*kib)
					if !bytes.Equal(got, pattern(4*kib, 90)) && !bytes.Equal(got, old[name]) {
						t.Fatalf("%s block 9 after crash holds neither old nor new data", name)
					}
					copy(im[name][9*4*kib:], got)
				}
				im.verify(t, p)
				checkExactSpace(t, p)
			}
			p.Close()
		})
	}
}

// TestSnapshotsDuringWrites takes and deletes snapshots while writers
// run: every write lands either before a snapshot (which then reads it)
// or after (which then does not), and Check stays clean.
func TestSnapshotsDuringWrites(t *testing.T) {
	p, _ := newPool(t, 1024, CreateOptions{})
	v := mustVolume(t, p, "v", 64*4*kib)
	stop := make(chan struct{})
	errs := make(chan error, 2)
	for w := 0; w < 2; w++ {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				// Each block holds a whole pattern of one seed, or zeros.
				vb := int64(rng.IntN(64))
				if err := v.WriteAt([][]byte{pattern(4*kib, byte(rng.IntN(200)))}, vb*4*kib); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for i := 0; i < 20; i++ {
		name := fmt.Sprint("s", i)
		if err := p.CreateSnapshot("v", name, i%2 == 0); err != nil {
			t.Fatal(err)
		}
		if i >= 3 {
			if err := p.DeleteVolume(fmt.Sprint("s", i-3)); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	for w := 0; w < 2; w++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// Every block of every snapshot is a whole pattern or zeros: no torn copy.
	for _, name := range p.Volumes() {
		s, _ := p.Volume(name)
		for vb := int64(0); vb < 64; vb++ {
			got := read(t, s, vb*4*kib, 4*kib)
			if bytes.Equal(got, make([]byte, 4*kib)) || bytes.Equal(got, pattern(4*kib, got[0])) {
				continue
			}
			t.Fatalf("%s block %d is torn", name, vb)
		}
	}
	checkExactSpace(t, p)
}

// volumeAndClone returns a pool of 64 blocks with volume v (8 blocks, the first 4 written with
// pattern 1) and its writable clone c.
func volumeAndClone(t *testing.T) (*Pool, *Volume, *Volume) {
	t.Helper()
	p, _ := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "v", 8*4*kib)
	write(t, v, 0, pattern(4*4*kib, 1))
	if err := p.CreateSnapshot("v", "c", true); err != nil {
		t.Fatal(err)
	}
	c, err := p.Volume("c")
	if err != nil {
		t.Fatal(err)
	}
	return p, v, c
}

// TestBlockCopiedByEverySharerIsReleased: once the volume and its clone
// have both overwritten a shared block, no one reads the frozen copy, and
// its space comes back without waiting for a delete.
func TestBlockCopiedByEverySharerIsReleased(t *testing.T) {
	p, v, c := volumeAndClone(t)
	write(t, v, 0, pattern(4*kib, 2))
	write(t, c, 512, pattern(1024, 3)) // a partial copy
	write(t, c, 4*kib, pattern(4*kib, 4))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	// 4 originals and 3 copies, less block 0's original: v and c both
	// copied it, no one reads it.
	s := checkAccounting(t, p)
	if got, want := s.Pool.AllocatedBytes/(4*kib), uint64(4+3-1); got != want {
		t.Fatalf("allocated %d blocks, want %d", got, want)
	}
	checkExactSpace(t, p)
	write(t, v, 4*kib, pattern(4*kib, 5))
	checkExactSpace(t, p)
	if err := p.CreateSnapshot("c", "cs", false); err != nil {
		t.Fatal(err)
	}
	// Now c's own copies are shared with cs: overwriting them in c keeps
	// cs's view intact.
	write(t, c, 0, pattern(4*kib, 6))
	cs, _ := p.Volume("cs")
	want := pattern(4*kib, 1)
	copy(want[512:], pattern(1024, 3))
	if got := read(t, cs, 0, 4*kib); !bytes.Equal(got, want) {
		t.Fatal("snapshot of the clone lost its block")
	}
	checkExactSpace(t, p)
}

// TestBlockHiddenByEverySharerIsReleased: a frozen block that the last of its sharers discards
// or provisions over (whole-block: a hole or a reservation hides it) is released at once, as
// one every sharer copied is; a read-only snapshot still reading it keeps it.
func TestBlockHiddenByEverySharerIsReleased(t *testing.T) {
	p, v, c := volumeAndClone(t)
	allocated := func() uint64 {
		t.Helper()
		if err := p.Flush(); err != nil {
			t.Fatal(err)
		}
		return checkAccounting(t, p).Pool.AllocatedBytes / (4 * kib)
	}
	if got := allocated(); got != 4 {
		t.Fatalf("allocated %d blocks after the clone, want 4", got)
	}
	// Block 0: discarded by both. Block 1: discarded by v, provisioned over by c.
	if err := v.Discard(0, 2*4*kib); err != nil {
		t.Fatal(err)
	}
	if got := allocated(); got != 4 {
		t.Fatalf("allocated %d blocks after v's discard, want 4 (c still reads them)", got)
	}
	if err := c.Discard(0, 4*kib); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(4*kib, 4*kib, false); err != nil {
		t.Fatal(err)
	}
	if got := allocated(); got != 2 {
		t.Fatalf("allocated %d blocks after every sharer hid blocks 0 and 1, want 2", got)
	}
	checkExactSpace(t, p)
	// With a read-only snapshot of v reading block 2, v's and c's discards keep it.
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(2*4*kib, 4*kib); err != nil {
		t.Fatal(err)
	}
	if err := c.Discard(2*4*kib, 4*kib); err != nil {
		t.Fatal(err)
	}
	if got := allocated(); got != 2 {
		t.Fatalf("allocated %d blocks, want 2: snapshot s still reads block 2", got)
	}
	s, _ := p.Volume("s")
	if got := read(t, s, 2*4*kib, 4*kib); !bytes.Equal(got, pattern(4*4*kib, 1)[2*4*kib:3*4*kib]) {
		t.Fatal("snapshot lost block 2")
	}
	for _, vol := range []*Volume{v, c} {
		if got := read(t, vol, 0, 3*4*kib); !bytes.Equal(got, make([]byte, 3*4*kib)) {
			t.Fatalf("volume %s: discarded or provisioned blocks do not read as zeros", vol.Name())
		}
	}
	checkExactSpace(t, p)
	if err := p.Check(nil); err != nil {
		t.Fatal(err)
	}
}

// TestMergeKeepsPendingFrozenRelease: a frozen entry that its last sharer hid is gone in
// pending changes only; a delete that then merges the remaining head into that frozen layer
// (before any commit) must not bring the committed entry back (its block is already free).
func TestMergeKeepsPendingFrozenRelease(t *testing.T) {
	p, v, c := volumeAndClone(t) // the snapshot commits: the frozen entries are on disk
	if err := v.Discard(0, 4*kib); err != nil {
		t.Fatal(err)
	}
	if err := c.Discard(0, 4*kib); err != nil {
		t.Fatal(err)
	}
	// v's head (one hole) is merged into the frozen layer (four blocks, one just released).
	if err := p.DeleteVolume("c"); err != nil {
		t.Fatal(err)
	}
	checkExactSpace(t, p)
	want := pattern(4*4*kib, 1)
	clear(want[:4*kib])
	if got := read(t, v, 0, 4*4*kib); !bytes.Equal(got, want) {
		t.Fatal("v does not read its discarded block as zeros and the rest as written")
	}
}

// TestDeleteSnapshotMergesSmallHead: deleting the only snapshot of a big
// volume merges the volume's small head into the frozen layer (walking
// only what changed since the snapshot), and everything reads, counts
// and checks as before.
func TestDeleteSnapshotMergesSmallHead(t *testing.T) {
	for _, chained := range []bool{false, true} {
		t.Run(fmt.Sprintf("chained=%v", chained), func(t *testing.T) {
			p, dir := newPool(t, 128, CreateOptions{})
			const size = 32 * 4 * kib
			im := images{"v": make([]byte, size)}
			mustVolume(t, p, "v", size)
			v, _ := p.Volume("v")
			if err := v.WriteZeroes(16*4*kib, 4*4*kib, false); err != nil {
				t.Fatal(err)
			}
			im.write(t, p, "v", 0, pattern(12*4*kib, 1))
			if chained {
				if err := p.CreateSnapshot("v", "old", false); err != nil {
					t.Fatal(err)
				}
				im["old"] = bytes.Clone(im["v"])
				im.write(t, p, "v", 4*kib, pattern(10*4*kib, 2)) // the snapshot s takes must be the bigger layer
			}
			if err := p.CreateSnapshot("v", "s", false); err != nil {
				t.Fatal(err)
			}
			im["s"] = bytes.Clone(im["v"])
			frozen := v.st.rec.Layer - 1 // the layer s sits on
			if p.vols["s"].rec.Layer != frozen {
				t.Fatalf("s on layer %d, expected %d", p.vols["s"].rec.Layer, frozen)
			}
			im.write(t, p, "v", 512, pattern(1024, 3))       // partial copy
			im.zero(t, p, "v", 2*4*kib, 4*kib, true)         // hole over a shared block
			im.zero(t, p, "v", 17*4*kib, 4*kib, true)        // hole over a shared reservation
			im.write(t, p, "v", 18*4*kib, pattern(4*kib, 4)) // copy of a provisioned block
			im.write(t, p, "v", 25*4*kib, pattern(4*kib, 5)) // a new block
			im.zero(t, p, "v", 26*4*kib, 2*4*kib, false)     // new reservations
			if err := p.DeleteVolume("s"); err != nil {
				t.Fatal(err)
			}
			delete(im, "s")
			if got := v.st.rec.Layer; got != frozen {
				t.Fatalf("v's head is layer %d; the merge should have made it %d", got, frozen)
			}
			im.verify(t, p)
			checkExactSpace(t, p)
			vs := volStatus(t, p, "v")
			if chained {
				// Blocks 16-19 provisioned before "old": v still shares
				// 16 and 19 with it (17 is a hole now, 18 was copied).
				if vs.ReservedSharedBytes != 2*4*kib {
					t.Fatalf("v: %+v", vs)
				}
			} else if vs.ReservedSharedBytes != 0 || vs.ReservedProvisionedBytes != 4*4*kib {
				t.Fatalf("v: %+v", vs)
			}
			p.Close()
			p2, err := Open(dir, quietOpts())
			if err != nil {
				t.Fatal(err)
			}
			defer p2.Close()
			im.verify(t, p2)
			checkExactSpace(t, p2)
			if chained {
				if err := p2.DeleteVolume("old"); err != nil {
					t.Fatal(err)
				}
				delete(im, "old")
				im.verify(t, p2)
				checkExactSpace(t, p2)
			}
		})
	}
}

// TestWriteZeroesOverSharedBlocksAllOrNothing: a write-zeroes covering
// parts of two blocks shared with a snapshot copies each into the volume
// first. Whether it then succeeds or fails for lack of space, the volume
// reads either zeros in the range or exactly as before. (Seed 1155 of a
// long TestModelSnapshotsCrashPoints run: the copies were made by writing
// zeros, and when the second found no space the request failed with the
// first half zeroed.) The pool has blocks for both copies, the host room
// for one only: the second copy finds no space.
func TestWriteZeroesOverSharedBlocksAllOrNothing(t *testing.T) {
	const bs = 4 * kib
	for _, unmap := range []bool{false, true} {
		t.Run(fmt.Sprintf("unmap=%v", unmap), func(t *testing.T) {
			p, host := newHostLimitedPool(t, 8)
			v := mustVolume(t, p, "a", 8*bs)
			data := pattern(2*bs, 7)
			if err := v.WriteAt([][]byte{data}, 0); err != nil {
				t.Fatal(err)
			}
			if err := p.CreateSnapshot("a", "s", false); err != nil {
				t.Fatal(err)
			}
			fill := mustVolume(t, p, "fill", 8*bs)
			if err := fill.WriteAt([][]byte{pattern(3*bs, 9)}, 0); err != nil {
				t.Fatal(err)
			}
			if free := p.Status().Pool.FreeBytes; free != 3*bs {
				t.Fatalf("free %d bytes, want 3 blocks", free)
			}
			host.setLimit(host.used() + bs/hostPage)
			err := v.WriteZeroes(bs/2, bs, unmap)
			t.Logf("write-zeroes: %v", err)
			if err == nil {
				t.Fatal("write-zeroes copied two shared blocks with host room for one")
			}
			want := slices.Clone(data)
			switch {
			case err == nil:
				clear(want[bs/2 : bs/2+bs])
			case !errors.Is(err, ErrNoSpace):
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			if err := v.ReadAt([][]byte{got}, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("write-zeroes over two shared half blocks returned %v, and the volume differs from that at byte %d", err, i)
			}
			if err := p.Check(nil); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A write-zeroes over shared blocks fits when the pool has exactly the
// blocks it needs: copies of the partly covered shared blocks plus a
// reservation for the whole one. The copies are unreserved writes: the
// spares the request backs for its reservations must not be held against
// them too (it failed with ErrNoSpace with free blocks to spare).
func TestWriteZeroesOverSharedBlocksExactFit(t *testing.T) {
	const bs = 4 * kib
	for _, unmap := range []bool{false, true} {
		t.Run(fmt.Sprintf("unmap=%v", unmap), func(t *testing.T) {
			p, _ := newPool(t, 8, CreateOptions{})
			v := mustVolume(t, p, "a", 8*bs)
			data := pattern(3*bs, 7)
			if err := v.WriteAt([][]byte{data}, 0); err != nil {
				t.Fatal(err)
			}
			if err := p.CreateSnapshot("a", "s", false); err != nil {
				t.Fatal(err)
			}
			// Two copies, and without unmap one reservation: 3 blocks.
			need, filled := 3, 2
			if unmap {
				need, filled = 2, 3
			}
			fill := mustVolume(t, p, "fill", 8*bs)
			if err := fill.WriteAt([][]byte{pattern(filled*bs, 9)}, 0); err != nil {
				t.Fatal(err)
			}
			if free := p.Status().Pool.FreeBytes; free != uint64(need*bs) {
				t.Fatalf("free %d bytes, want %d blocks", free, need)
			}
			if err := v.WriteZeroes(bs/2, 2*bs, unmap); err != nil {
				t.Fatalf("write-zeroes needing %d blocks with %d free: %v", need, need, err)
			}
			want := slices.Clone(data)
			clear(want[bs/2 : bs/2+2*bs])
			got := make([]byte, len(data))
			if err := v.ReadAt([][]byte{got}, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("volume differs from the write-zeroes at byte %d", i)
			}
			if free := p.Status().Pool.FreeBytes; free != 0 {
				t.Fatalf("free %d bytes after the write-zeroes, want 0", free)
			}
			if err := p.Check(nil); err != nil {
				t.Fatal(err)
			}
		})
	}
}
