package thin

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/pebblemeta"
)

// TestConcurrentMixed runs writers, discarders, provisioners and flushers
// on two volumes at once, with background commits racing them and a pool
// too small for everything (so some requests hit ErrNoSpace). Each
// goroutine owns some blocks outright and some sectors of blocks shared
// with every other goroutine (racing first writes); at the end every byte
// must be what its owner last wrote, and Check must be clean. Run it with
// -race.
func TestConcurrentMixed(t *testing.T) {
	const (
		workers   = 4
		ownBlocks = 12
		shared    = 8
		bs        = 4 * kib
		volBlocks = workers*ownBlocks + shared
	)
	dir := filepath.Join(t.TempDir(), "pool")
	if err := Create(dir, CreateOptions{Size: 70 * bs, BlockSize: bs}); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.FlushInterval = 3 * time.Millisecond
	o.MaxPending = 16
	o.MapCacheEntries = 64
	p, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	vols := []*Volume{mustVolume(t, p, "a", volBlocks*bs), mustVolume(t, p, "b", volBlocks*bs)}
	type sectorModel map[int64]byte // byte offset of sector -> fill byte (0 = zeros)
	models := make([][]sectorModel, len(vols))
	var wg sync.WaitGroup
	for vi, v := range vols {
		models[vi] = make([]sectorModel, workers)
		for w := range workers {
			m := sectorModel{}
			models[vi][w] = m
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(vi), uint64(w)))
				own := int64(w*ownBlocks) * bs
				sharedBase := int64(workers*ownBlocks) * bs
				for i := range 300 {
					val := byte(1 + rng.IntN(250))
					switch r := rng.IntN(10); {
					case r < 4: // write own range
						s := rng.Int64N(ownBlocks*8 - 1)
						n := 1 + rng.Int64N(min(16, ownBlocks*8-s))
						err := v.WriteAt([][]byte{bytes.Repeat([]byte{val}, int(n*512))}, own+s*512)
						if errors.Is(err, ErrNoSpace) {
							continue
						}
						if err != nil {
							t.Error(err)
							return
						}
						for k := range n {
							m[own+(s+k)*512] = val
						}
					case r < 6: // write own sector of a shared block
						blk := rng.Int64N(shared)
						off := sharedBase + blk*bs + int64(w)*512
						err := v.WriteAt([][]byte{bytes.Repeat([]byte{val}, 512)}, off)
						if errors.Is(err, ErrNoSpace) {
							continue
						}
						if err != nil {
							t.Error(err)
							return
						}
						m[off] = val
					case r < 8: // discard / zero own range
						s := rng.Int64N(ownBlocks*8 - 1)
						n := 1 + rng.Int64N(min(24, ownBlocks*8-s))
						var err error
						switch rng.IntN(3) {
						case 0:
							err = v.Discard(own+s*512, n*512)
						case 1:
							err = v.WriteZeroes(own+s*512, n*512, true)
						default:
							err = v.WriteZeroes(own+s*512, n*512, false)
						}
						if errors.Is(err, ErrNoSpace) {
							continue
						}
						if err != nil {
							t.Error(err)
							return
						}
						for k := range n {
							m[own+(s+k)*512] = 0
						}
					case r < 9:
						if err := v.Flush(); err != nil {
							t.Error(err)
							return
						}
					default: // read back own range
						buf := make([]byte, ownBlocks*bs)
						if err := v.ReadAt([][]byte{buf}, own); err != nil {
							t.Error(err)
							return
						}
						for k := int64(0); k < ownBlocks*8; k++ {
							want := m[own+k*512]
							if got := buf[k*512 : (k+1)*512]; !bytes.Equal(got, bytes.Repeat([]byte{want}, 512)) {
								t.Errorf("vol %d worker %d step %d: sector %d reads %d, want %d", vi, w, i, k, got[0], want)
								return
							}
						}
					}
				}
			}()
		}
	}
	// Meanwhile a third volume comes and goes, and the pool grows.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 20 {
			if err := p.CreateVolume("c", 64*bs); err != nil {
				t.Error(err)
				return
			}
			c, err := p.Volume("c")
			if err != nil {
				t.Error(err)
				return
			}
			for k := range int64(8) {
				if err := c.WriteAt([][]byte{make([]byte, 512)}, k*bs); err != nil && !errors.Is(err, ErrNoSpace) {
					t.Error(err)
					return
				}
			}
			if err := c.WriteZeroes(8*bs, 4*bs, false); err != nil && !errors.Is(err, ErrNoSpace) {
				t.Error(err)
				return
			}
			if err := p.DeleteVolume("c"); err != nil {
				t.Error(err)
				return
			}
			if i == 5 {
				// Check runs on a snapshot while I/O and commits go on.
				if err := p.Check(nil); err != nil {
					t.Error(err)
					return
				}
			}
			if i == 10 {
				if err := p.Grow(80 * bs); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	wg.Wait()
	if t.Failed() {
		return
	}
	for vi, v := range vols {
		buf := make([]byte, volBlocks*bs)
		if err := v.ReadAt([][]byte{buf}, 0); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, len(buf))
		for _, m := range models[vi] {
			for off, val := range m {
				copy(want[off:off+512], bytes.Repeat([]byte{val}, 512))
			}
		}
		if !bytes.Equal(buf, want) {
			t.Fatalf("volume %d differs from the models", vi)
		}
	}
	checkAccounting(t, p)
}

func TestQueueWakesOnDiscardAndDelete(t *testing.T) {
	p, _ := newPool(t, 2, CreateOptions{NoSpace: NoSpaceQueue, NoSpaceTimeout: 10 * time.Second})
	a := mustVolume(t, p, "a", 1<<20)
	b := mustVolume(t, p, "b", 1<<20)
	write(t, a, 0, pattern(4*kib, 1))
	write(t, b, 0, pattern(4*kib, 1))
	done := make(chan error, 2)
	go func() { done <- a.WriteAt([][]byte{pattern(4*kib, 2)}, 8*kib) }()
	go func() { done <- a.WriteAt([][]byte{pattern(4*kib, 3)}, 16*kib) }()
	time.Sleep(30 * time.Millisecond)
	if err := b.Discard(0, 4*kib); err != nil { // frees one block
		t.Fatal(err)
	}
	proceeds(t, done, "queued write did not proceed after a discard")
	if err := p.DeleteVolume("b"); err != nil { // nothing left to free...
		t.Fatal(err)
	}
	c := mustVolume(t, p, "c", 1<<20)
	_ = c
	select {
	case err := <-done:
		t.Fatalf("second queued write finished without space: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := a.Discard(0, 4*kib); err != nil {
		t.Fatal(err)
	}
	proceeds(t, done, "queued write did not proceed")
	checkAccounting(t, p)
}

// TestCheckFindsCorruption tampers with the metadata behind the pool's back
// and expects Check to name each problem.
func TestCheckFindsCorruption(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tamper func(b *pebblemeta.Batch, layer uint64, e0 pebblemeta.Entry)
		want   string
	}{
		{"double owner", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetEntry(l, 100, e0)
		}, "another entry owns too"},
		{"beyond pool", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetEntry(l, 0, pebblemeta.Entry{Flags: pebblemeta.FlagMapped, PBlock: 1 << 40})
		}, "beyond the pool"},
		{"leaked bitmap", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetEntry(l, 0, pebblemeta.Entry{})
		}, "leaked"},
		{"orphan layer", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetEntry(l+50, 0, pebblemeta.Entry{Flags: pebblemeta.FlagProvisioned})
		}, "belongs to no volume"},
		{"unmarked block", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetBitmapChunk(0, make([]byte, chunkBytes))
		}, "free in the allocation bitmap"},
		{"counter", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetVolume(pebblemeta.VolumeRecord{Name: "v", Layer: l, Size: 1 << 20, Mapped: 7})
		}, "counters say"},
		{"entry beyond volume", func(b *pebblemeta.Batch, l uint64, e0 pebblemeta.Entry) {
			b.SetEntry(l, 1<<30, pebblemeta.Entry{Flags: pebblemeta.FlagProvisioned})
		}, "beyond its size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, dir := newPool(t, 16, CreateOptions{})
			v := mustVolume(t, p, "v", 1<<20)
			write(t, v, 0, pattern(8*kib, 1))
			checkAccounting(t, p)
			p.Close()
			st, err := pebblemeta.Open(filepath.Join(dir, metaName), pebblemeta.Options{})
			if err != nil {
				t.Fatal(err)
			}
			vols, _ := st.Volumes()
			e0, _, _ := st.MapEntry(vols[0].Layer, 0)
			b := st.NewBatch()
			tc.tamper(b, vols[0].Layer, e0)
			if err := b.Commit(true); err != nil {
				t.Fatal(err)
			}
			st.Close()
			p2, err := Open(dir, quietOpts())
			if err != nil {
				t.Fatal(err)
			}
			defer p2.Close()
			err = p2.Check(nil)
			var ce *CheckError
			if !errors.As(err, &ce) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Check = %v, want a problem mentioning %q", err, tc.want)
			}
			// Requests on corrupt metadata may fail but must not crash.
			v2, err := p2.Volume("v")
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 12*kib)
			v2.ReadAt([][]byte{buf}, 0)
			v2.WriteAt([][]byte{buf}, 0)
			v2.WriteZeroes(0, 64*kib, false)
			v2.Discard(0, 1<<20)
			v2.WriteAt([][]byte{buf}, 400*kib)
			v2.Flush()
		})
	}
}

func TestCheckProgress(t *testing.T) {
	p, _ := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "v", 1<<20)
	write(t, v, 0, make([]byte, 40*4*kib))
	var last [2]uint64
	if err := p.Check(func(done, total uint64) { last = [2]uint64{done, total} }); err != nil {
		t.Fatal(err)
	}
	if last != [2]uint64{40, 40} {
		t.Fatalf("final progress %v, want 40/40", last)
	}
}

// TestMemoryBounded: however many blocks get mapped, the pending set and
// the entry cache stay within their limits (the map itself lives in
// Pebble).
func TestMemoryBounded(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	if err := Create(dir, CreateOptions{Size: 4000 * 4 * kib, BlockSize: 4 * kib}); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.MaxPending = 64
	o.MapCacheEntries = 128
	p, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	v := mustVolume(t, p, "v", 1<<30)
	buf := [][]byte{make([]byte, 512)}
	maxDirty, maxCache := 0, 0
	for i := range int64(3000) {
		if err := v.WriteAt(buf, i*4*kib); err != nil {
			t.Fatal(err)
		}
		if i%3 == 0 {
			_ = read(t, v, (i/2)*4*kib, 512) // fill the cache with old entries
		}
		p.mu.Lock()
		maxDirty, maxCache = max(maxDirty, len(p.dirty)), max(maxCache, p.cache.measure(t))
		p.mu.Unlock()
	}
	if maxDirty >= 2*64 || maxCache > 128 {
		t.Fatalf("pending changes peaked at %d (limit 2x64), cache at %d (limit 128)", maxDirty, maxCache)
	}
	if s := checkAccounting(t, p); s.Volumes[0].MappedBytes != 3000*4*kib {
		t.Fatalf("mapped %d", s.Volumes[0].MappedBytes)
	}
}

// TestWatcherMayCallPool: a watcher reacting to an event (as serve does,
// opening the new volume) may call management methods without deadlock,
// and events stay in commit order.
func TestWatcherMayCallPool(t *testing.T) {
	p, _ := newPool(t, 16, CreateOptions{})
	var got []string
	p.Watch(func(e Event) {
		got = append(got, e.Type.String()+":"+e.Volume)
		if e.Type == VolumeCreated && e.Volume == "a" {
			if _, err := p.Volume("a"); err != nil {
				t.Error(err)
			}
			if err := p.CreateVolume("b", 512); err != nil {
				t.Error(err)
			}
			p.Flush()
		}
	})
	if err := p.CreateVolume("a", 512); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteVolume("b"); err != nil {
		t.Fatal(err)
	}
	want := "volume-created:a volume-created:b volume-deleted:b"
	if s := strings.Join(got, " "); s != want {
		t.Fatalf("events %q, want %q", s, want)
	}
}
