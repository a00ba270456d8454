package thin

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"
)

// countingData counts the writes that reach a data file.
type countingData struct {
	dataFile
	writes, vwrites, iovs atomic.Int64
}

func (d *countingData) WriteAt(b []byte, off int64) (int, error) {
	d.writes.Add(1)
	return d.dataFile.WriteAt(b, off)
}

func (d *countingData) WriteVAt(bufs [][]byte, off int64) error {
	d.vwrites.Add(1)
	d.iovs.Add(int64(len(bufs)))
	return d.dataFile.WriteVAt(bufs, off)
}

func (d *countingData) reset() {
	d.writes.Store(0)
	d.vwrites.Store(0)
	d.iovs.Store(0)
}

// newCountingPool is newPool on real files whose data file writes are
// counted.
func newCountingPool(t *testing.T, blocks uint64, bs uint32) (*Pool, *countingData) {
	t.Helper()
	var cd *countingData
	e := &env{fs: vfs.Default, openData: func(path string, create bool) (dataFile, error) {
		f, err := openOSDataFile(path, create)
		if err != nil {
			return nil, err
		}
		cd = &countingData{dataFile: f}
		return cd, nil
	}}
	dir := filepath.Join(t.TempDir(), "pool")
	if err := create(dir, CreateOptions{Size: blocks * uint64(bs), BlockSize: bs}, e); err != nil {
		t.Fatal(err)
	}
	p, err := open(dir, quietOpts(), e)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, cd
}

// split cuts b into buffers of the given sizes, the rest in a last one.
func split(b []byte, sizes ...int) [][]byte {
	var bufs [][]byte
	for _, n := range sizes {
		bufs = append(bufs, b[:n])
		b = b[n:]
	}
	return append(bufs, b)
}

func writeV(t *testing.T, v *Volume, img []byte, off int64, bufs [][]byte) {
	t.Helper()
	if err := v.WriteAt(bufs, off); err != nil {
		t.Fatalf("write %d+%d: %v", off, totalLen(bufs), err)
	}
	for _, b := range bufs {
		off += int64(copy(img[off:], b))
	}
}

func verify(t *testing.T, v *Volume, img []byte) {
	t.Helper()
	got := read(t, v, 0, len(img))
	if i := firstDiff(got, img); i >= 0 {
		t.Fatalf("volume %s differs first at byte %d (block %d): got %#x, want %#x",
			v.Name(), i, i/int(v.BlockSize()), got[i], img[i])
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestCoalesceWritesAndReadsBack writes runs of new, reused and mapped
// blocks with odd scatter-gather lists and checks every byte.
func TestCoalesceWritesAndReadsBack(t *testing.T) {
	for _, max := range []int64{64 * kib, 256 * kib, 1 << 40} {
		t.Run(fmt.Sprintf("runs of at most %d", max), func(t *testing.T) { testCoalesceReadBack(t, max) })
	}
}

func testCoalesceReadBack(t *testing.T, writeRunMax int64) {
	const bs = 64 * kib
	tune := defaultTuning()
	tune.writeRunMax = writeRunMax
	p, _ := newTunedPool(t, 64, CreateOptions{BlockSize: bs}, &tune)
	const size = 48 * bs
	v := mustVolume(t, p, "v", size)
	img := make([]byte, size)

	// 1 MiB at an unaligned offset into fresh blocks: 17 of them, the
	// first and last partly written.
	off := int64(2*bs + 3*512)
	writeV(t, v, img, off, split(pattern(1<<20, 1), 100000, 500000))
	verify(t, v, img)
	// Overwrite the middle in place, across block boundaries.
	writeV(t, v, img, off+200*kib+512, split(pattern(300*kib, 2), 4096, 70000, 1536))
	verify(t, v, img)
	// Overwrite that also allocates past the mapped end.
	writeV(t, v, img, off+900*kib, split(pattern(400*kib, 3), 12345+512-12345%512))
	verify(t, v, img)

	// Freed blocks that were not punched come back without zeros: a
	// partial write to such a reused block writes the whole block,
	// padded, amid direct pieces.
	p.noPunch.Store(true)
	if err := v.Discard(0, size); err != nil {
		t.Fatal(err)
	}
	clear(img)
	if err := p.Flush(); err != nil { // freed blocks are reusable after a commit
		t.Fatal(err)
	}
	settle(p) // and its release phase
	p.mu.Lock()
	p.cursor = 0 // allocate the freed blocks again, not fresh ones above them
	p.mu.Unlock()
	writeV(t, v, img, 5*bs+1024, split(pattern(6*bs, 4), 3*bs-1024, 4096))
	verify(t, v, img)
	if s := checkAccounting(t, p); s.Pool.AllocatedBytes != 7*bs {
		t.Fatalf("allocated %d bytes, want %d", s.Pool.AllocatedBytes, 7*bs)
	}
}

// TestCoalesceMixedPlans writes one request over a shared block (copied),
// mapped blocks, an unmapped one and a wholly overwritten shared one.
func TestCoalesceMixedPlans(t *testing.T) {
	const bs = 64 * kib
	p, _ := newPool(t, 64, CreateOptions{BlockSize: bs})
	const size = 8 * bs
	v := mustVolume(t, p, "v", size)
	img := make([]byte, size)
	writeV(t, v, img, 0, [][]byte{pattern(bs, 1)})
	writeV(t, v, img, 3*bs, [][]byte{pattern(bs, 2)})
	if err := p.CreateSnapshot("v", "s", false); err != nil {
		t.Fatal(err)
	}
	snapImg := bytes.Clone(img)
	writeV(t, v, img, bs, [][]byte{pattern(bs, 3)})
	writeV(t, v, img, 4*bs, [][]byte{pattern(bs, 4)})
	// Block 0 shared (copy on write), 1 mapped, 2 unmapped, 3 shared but
	// wholly written, 4 mapped and partly written.
	off := int64(4096 + 512)
	writeV(t, v, img, off, split(pattern(4*bs, 5), bs/2, 7*512, bs+1024))
	verify(t, v, img)
	s, err := p.Volume("s")
	if err != nil {
		t.Fatal(err)
	}
	verify(t, s, snapImg)
	checkExactSpace(t, p)
}

// TestCoalesceOneCallPerRun counts the data file writes: a request over
// consecutive physical blocks is one vectored write, or one per
// writeRunMax.
func TestCoalesceOneCallPerRun(t *testing.T) {
	const bs = 64 * kib
	p, cd := newCountingPool(t, 64, bs)
	v := mustVolume(t, p, "v", 48*bs)
	img := make([]byte, 48*bs)
	check := func(what string, wantV, wantIovs int64) {
		t.Helper()
		if w, vw, n := cd.writes.Load(), cd.vwrites.Load(), cd.iovs.Load(); w != 0 || vw != wantV || n != wantIovs {
			t.Fatalf("%s: %d writes, %d vectored writes of %d buffers; want 0, %d of %d", what, w, vw, n, wantV, wantIovs)
		}
		cd.reset()
	}
	cd.reset() // the default first: runs are not cut
	// 16 fresh blocks, allocated one after the other: 16 pieces, 18 with
	// the buffer boundaries inside blocks.
	writeV(t, v, img, 0, split(pattern(1<<20, 1), 100000, 500000))
	check("1 MiB to 16 new blocks", 1, 18)
	// The same blocks overwritten in place.
	writeV(t, v, img, 0, [][]byte{pattern(1<<20, 2)})
	check("1 MiB overwrite", 1, 16)
	// Unaligned, over 16 mapped and 1 new block.
	writeV(t, v, img, 1024, [][]byte{pattern(1<<20, 3)})
	check("unaligned 1 MiB", 1, 17)
	// More buffers than one pwritev takes: split at IOV_MAX.
	var bufs [][]byte
	for i := range 1500 {
		bufs = append(bufs, pattern(512, byte(i)))
	}
	writeV(t, v, img, 20*bs, bufs)
	check("1500 buffers", 2, 1500)
	// Runs are cut where the data file offset crosses a multiple of
	// writeRunMax.
	p.tune.writeRunMax = 256 * kib // only this goroutine writes
	p.mu.Lock()
	e, _, err := p.resolveLocked(v.st.rec.Layer, 0)
	p.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ off, iovs int64 }{{0, 16}, {1024, 17}} {
		at := int64(e.PBlock)*bs + c.off // the blocks are consecutive (above)
		cuts := (at+1<<20-1)/(256*kib) - at/(256*kib)
		writeV(t, v, img, c.off, [][]byte{pattern(1<<20, byte(c.off))})
		check(fmt.Sprintf("1 MiB at %d, runs of at most 256 KiB", c.off), 1+cuts, c.iovs)
	}
	// Cut at 64 KiB: a vectored write per block, whatever the buffers.
	p.tune.writeRunMax = 64 * kib
	writeV(t, v, img, 0, split(pattern(1<<20, 7), 100000, 500000, 512, 512))
	check("1 MiB in 5 buffers, runs of at most 64 KiB", 16, 20)
	verify(t, v, img)
}

// TestCoalesceNoAllocs checks that a small overwrite allocates no more
// than planning it does (the vectored write's list is pooled).
func TestCoalesceNoAllocs(t *testing.T) {
	const bs = 64 * kib
	p, _ := newPool(t, 64, CreateOptions{BlockSize: bs})
	v := mustVolume(t, p, "v", 16*bs)
	write(t, v, 0, pattern(16*bs, 1))
	b4k := [][]byte{pattern(4096, 2)}
	b64k := split(pattern(bs, 3), 4096, 8192)
	for _, c := range []struct {
		name string
		bufs [][]byte
		off  int64
	}{{"4k", b4k, 8192}, {"64k in 3 buffers, 2 blocks", b64k, bs / 2}} {
		allocs := testing.AllocsPerRun(100, func() {
			if err := v.WriteAt(c.bufs, c.off); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("%s: %v allocations per write", c.name, allocs)
		if allocs > 1 { // planWrite's plan list
			t.Errorf("%s: %v allocations per write, want at most 1", c.name, allocs)
		}
	}
}

// BenchmarkCoalesce fills a volume with 1 MiB writes, cut into vectored
// writes of at most writeRunMax, then reads and overwrites 4 KiB at random:
// the host page cache keeps the data in folios as large as those writes,
// which changes what later small I/O costs. cpu-ns/op counts the whole
// process's CPU time (the kernel's included), less swayed than ns/op by
// other load on a shared machine.
func BenchmarkCoalesce(b *testing.B) {
	for _, max := range []int64{64 * kib, 128 * kib, 256 * kib, 1 << 20} {
		b.Run(fmt.Sprintf("run=%dK", max>>10), func(b *testing.B) {
			p, v := benchPool(b)
			p.tune.writeRunMax = max // before the first write
			buf := [][]byte{pattern(1<<20, 1)}
			for off := int64(0); off < benchBlocks*64*kib; off += 1 << 20 {
				if err := v.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
			if err := p.Flush(); err != nil {
				b.Fatal(err)
			}
			for _, write := range []bool{false, true} {
				name := "read4k"
				if write {
					name = "overwrite4k"
				}
				b.Run(name, func(b *testing.B) {
					buf := [][]byte{pattern(4*kib, 2)}
					rng := rand.New(rand.NewPCG(1, 1))
					b.SetBytes(4 * kib)
					c0 := cpuTime()
					b.ResetTimer()
					for range b.N {
						var err error
						if write {
							err = v.WriteAt(buf, randOff(rng))
						} else {
							err = v.ReadAt(buf, randOff(rng))
						}
						if err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64(cpuTime()-c0)/float64(b.N), "cpu-ns/op")
				})
			}
		})
	}
}

func cpuTime() int64 {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}
