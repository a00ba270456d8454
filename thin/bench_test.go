package thin

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/uring"
)

// Benchmarks run on real files in a temporary directory. Each thin
// benchmark has a raw twin doing the same I/O on a plain file, so the
// ratio is visible in one run:
//   go test -run XXX -bench . -benchtime 2s ./thin

const benchBlocks = 4096 // 256 MiB with 64 KiB blocks

func benchPool(b *testing.B) (*Pool, *Volume) {
	b.Helper()
	dir := filepath.Join(b.TempDir(), "pool")
	if err := Create(dir, CreateOptions{Size: benchBlocks * 64 * kib}); err != nil {
		b.Fatal(err)
	}
	p, err := Open(dir, quietOpts())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	v := mustVolume(b, p, "v", benchBlocks*64*kib)
	return p, v
}

// mapAll maps every block of v with one large write per block.
func mapAll(b *testing.B, p *Pool, v *Volume) {
	buf := pattern(64*kib, 1)
	for i := int64(0); i < benchBlocks; i++ {
		if err := v.WriteAt([][]byte{buf}, i*64*kib); err != nil {
			b.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		b.Fatal(err)
	}
}

func rawFile(b *testing.B) *os.File {
	f, err := os.Create(filepath.Join(b.TempDir(), "raw"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	buf := pattern(64*kib, 1)
	for i := int64(0); i < benchBlocks; i++ {
		f.WriteAt(buf, i*64*kib)
	}
	return f
}

func randOff(rng *rand.Rand) int64 { return rng.Int64N(benchBlocks*16) * 4 * kib }

func BenchmarkRead4KMapped(b *testing.B) {
	p, v := benchPool(b)
	mapAll(b, p, v)
	buf := [][]byte{make([]byte, 4*kib)}
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for range b.N {
		if err := v.ReadAt(buf, randOff(rng)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRead4KRaw(b *testing.B) {
	f := rawFile(b)
	buf := make([]byte, 4*kib)
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for range b.N {
		if _, err := f.ReadAt(buf, randOff(rng)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRead4KMappedParallel(b *testing.B) {
	p, v := benchPool(b)
	mapAll(b, p, v)
	b.SetBytes(4 * kib)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := [][]byte{make([]byte, 4*kib)}
		rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
		for pb.Next() {
			if err := v.ReadAt(buf, randOff(rng)); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkOverwrite4KMapped(b *testing.B) {
	p, v := benchPool(b)
	mapAll(b, p, v)
	buf := [][]byte{pattern(4*kib, 2)}
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for range b.N {
		if err := v.WriteAt(buf, randOff(rng)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOverwrite4KRaw(b *testing.B) {
	f := rawFile(b)
	buf := pattern(4*kib, 2)
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for range b.N {
		if _, err := f.WriteAt(buf, randOff(rng)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAllocWrite4KFlush32 writes 4 KiB to new blocks (each write
// allocates a 64 KiB block) with a Flush every 32 writes. The pool is
// recycled (discard everything) when it fills, outside the timer.
func BenchmarkAllocWrite4KFlush32(b *testing.B) {
	p, v := benchPool(b)
	buf := [][]byte{pattern(4*kib, 3)}
	order := rand.New(rand.NewPCG(1, 1)).Perm(benchBlocks)
	next := 0
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for i := range b.N {
		if next == len(order) {
			b.StopTimer()
			v.Discard(0, benchBlocks*64*kib)
			p.Flush()
			next = 0
			b.StartTimer()
		}
		if err := v.WriteAt(buf, int64(order[next])*64*kib); err != nil {
			b.Fatal(err)
		}
		next++
		if i%32 == 31 {
			if err := v.Flush(); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkAllocWrite4K: allocating writes with no FLUSH, where the
// intent log (a write system call per allocating write, intent.go) is the
// whole difference to BenchmarkAllocWrite4KNoIntent, the same without it.
func BenchmarkAllocWrite4K(b *testing.B)         { benchAllocWrite(b, true) }
func BenchmarkAllocWrite4KNoIntent(b *testing.B) { benchAllocWrite(b, false) }

func benchAllocWrite(b *testing.B, intent bool) {
	p, v := benchPool(b)
	if !intent {
		p.mu.Lock()
		p.intent = nil
		p.mu.Unlock()
	}
	buf := [][]byte{pattern(4*kib, 3)}
	order := rand.New(rand.NewPCG(1, 1)).Perm(benchBlocks)
	next := 0
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for range b.N {
		if next == len(order) {
			b.StopTimer()
			v.Discard(0, benchBlocks*64*kib)
			p.Flush()
			settle(p)
			next = 0
			b.StartTimer()
		}
		if err := v.WriteAt(buf, int64(order[next])*64*kib); err != nil {
			b.Fatal(err)
		}
		next++
	}
}

func BenchmarkAllocWrite4KFlush32Raw(b *testing.B) {
	f := rawFile(b)
	buf := pattern(4*kib, 3)
	order := rand.New(rand.NewPCG(1, 1)).Perm(benchBlocks)
	b.SetBytes(4 * kib)
	b.ResetTimer()
	for i := range b.N {
		if _, err := f.WriteAt(buf, int64(order[i%len(order)])*64*kib); err != nil {
			b.Fatal(err)
		}
		if i%32 == 31 {
			if err := f.Sync(); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkMetadataPerBlock maps 200k blocks (THIN_BENCH_META_BLOCKS) of a
// large sparse volume and reports metadata bytes per mapped block on disk
// and the Go heap growth (total and per block).
func BenchmarkMetadataPerBlock(b *testing.B) {
	n := envInt("THIN_BENCH_META_BLOCKS", 200_000)
	for range b.N {
		dir := filepath.Join(b.TempDir(), "pool")
		if err := Create(dir, CreateOptions{Size: uint64(n) * 4 * kib, BlockSize: 4 * kib}); err != nil {
			b.Fatal(err)
		}
		o := quietOpts()
		// A cache smaller than the map, so heap-B/block shows what grows
		// with the map (nothing should); the cache itself is bounded by
		// MapCacheEntries.
		o.MapCacheEntries = 4096
		p, err := Open(dir, o)
		if err != nil {
			b.Fatal(err)
		}
		v := mustVolume(b, p, "v", 1<<40)
		var before runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		buf := [][]byte{make([]byte, 512)}
		rng := rand.New(rand.NewPCG(1, 1))
		for i := range n {
			// Sparse: blocks scattered over a 1 TiB volume.
			off := (int64(i)*(1<<28/int64(n)) + rng.Int64N(1<<28/int64(n))) * 4 * kib
			if err := v.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := p.Flush(); err != nil {
			b.Fatal(err)
		}
		var after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&after)
		p.store.Flush()
		b.ReportMetric(float64(p.store.DiskUsage())/float64(n), "disk-B/block")
		growth := float64(after.HeapInuse) - float64(before.HeapInuse)
		b.ReportMetric(growth/float64(n), "heap-B/block")
		b.ReportMetric(growth/(1<<20), "heap-MiB") // flat as n grows: memtable and caches, not the map
		p.Close()
	}
}

// benchQD32 keeps 32 requests in flight through start (which returns
// false when the queue declined, so the request ran synchronously) and
// submit, as the virtio-blk device's runner does.
func benchQD32(b *testing.B, start func(tag uint16, off int64) bool, submit func(), done chan uint16) {
	const qd = 32
	rng := rand.New(rand.NewPCG(1, 1))
	declined := 0
	b.SetBytes(4 * kib)
	b.ResetTimer()
	issued, completed := 0, 0
	free := make([]uint16, 0, qd)
	for t := range uint16(qd) {
		free = append(free, t)
	}
	for completed < b.N {
		for len(free) > 0 && issued < b.N {
			t := free[len(free)-1]
			free = free[:len(free)-1]
			issued++
			if !start(t, randOff(rng)) {
				declined++
				completed++
				free = append(free, t)
			}
		}
		submit()
		if completed == issued {
			continue
		}
		t := <-done
		completed++
		free = append(free, t)
		for more := true; more; {
			select {
			case t := <-done:
				completed++
				free = append(free, t)
			default:
				more = false
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(declined)/float64(b.N), "declined/op")
}

func benchAsyncThin(b *testing.B, write bool) {
	p, v := benchPool(b)
	mapAll(b, p, v)
	done := make(chan uint16, 64)
	q, err := v.OpenQueue(32, func(cs []blockdev.Completion) {
		for _, c := range cs {
			if c.Err != nil {
				b.Error(c.Err)
			}
			done <- c.Tag
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	bufs := make([][][]byte, 32)
	for i := range bufs {
		bufs[i] = [][]byte{pattern(4*kib, byte(i))}
	}
	benchQD32(b, func(tag uint16, off int64) bool {
		var err error
		if write {
			if err = q.WriteAt(tag, bufs[tag], off); err != nil {
				err = v.WriteAt(bufs[tag], off)
				if err != nil {
					b.Fatal(err)
				}
				return false
			}
		} else if err = q.ReadAt(tag, bufs[tag], off); err != nil {
			if err = v.ReadAt(bufs[tag], off); err != nil {
				b.Fatal(err)
			}
			return false
		}
		return true
	}, q.Submit, done)
}

func benchAsyncRaw(b *testing.B, write bool) {
	f := rawFile(b)
	r, err := uring.New(64)
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	bufs := make([][]byte, 32)
	iovs := make([]unix.Iovec, 32)
	for i := range bufs {
		bufs[i] = pattern(4*kib, byte(i))
		iovs[i] = unix.Iovec{Base: &bufs[i][0], Len: 4 * kib}
	}
	op := uint8(uring.OpReadv)
	if write {
		op = uring.OpWritev
	}
	done := make(chan uint16, 64)
	go func() {
		cqes := make([]uring.CQE, 0, 64)
		for {
			if r.WaitCQE() != nil {
				return
			}
			for _, c := range r.Reap(cqes[:0]) {
				if c.UserData == 1<<20 {
					close(done)
					return
				}
				done <- uint16(c.UserData)
			}
		}
	}()
	benchQD32(b, func(tag uint16, off int64) bool {
		if err := r.Prep(op, int(f.Fd()), uintptr(unsafe.Pointer(&iovs[tag])), 1, uint64(off), 0, uint64(tag)); err != nil {
			b.Fatal(err)
		}
		return true
	}, func() { r.Submit() }, done)
	r.Prep(uring.OpNop, -1, 0, 0, 0, 0, 1<<20)
	r.Submit()
	for range done {
	}
}

// The asynchronous queue at queue depth 32 (reads on io_uring, writes on
// the submitting goroutine) against io_uring on a plain file (serve
// --raw's path), as the benchmark tool compares them.
func BenchmarkAsyncRead4KMapped(b *testing.B)      { benchAsyncThin(b, false) }
func BenchmarkAsyncRead4KRaw(b *testing.B)         { benchAsyncRaw(b, false) }
func BenchmarkAsyncOverwrite4KMapped(b *testing.B) { benchAsyncThin(b, true) }
func BenchmarkAsyncOverwrite4KRaw(b *testing.B)    { benchAsyncRaw(b, true) }
