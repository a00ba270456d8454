package frontend

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
)

// pagesOf adds the 4 KiB pages of guest-physical [addr, addr+n) to set.
func pagesOf(set map[uint64]bool, addr, n uint64) {
	for p := addr / vhostuser.LogPageSize; p <= (addr+n-1)/vhostuser.LogPageSize; p++ {
		set[p] = true
	}
}

func sortedPages(set map[uint64]bool) []uint64 {
	var out []uint64
	for p := range set {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// TestDirtyLogMatchesModel turns dirty logging on while the rings run, as
// a migration does, and checks after every batch of requests that the log
// holds exactly the pages a model of the requests predicts: the
// device-writable buffers (read data, GET_ID's buffer, status bytes) and
// the used ring's elements, index and avail_event, and not the header,
// write data, descriptor table or available ring. Rings of 1024 entries
// span three pages: index and flags in the first, avail_event in the
// last, and the middle one holds only elements 511 to 1022, which the
// requests reach (the first 600 completions are flushes before logging
// starts), so a back-end that does not log used elements fails. With
// logging off, nothing is written to the log.
func TestDirtyLogMatchesModel(t *testing.T) {
	for _, v := range []struct {
		name string
		opts Options
	}{
		{"direct", Options{}},
		{"indirect", Options{Indirect: true}},
		{"no-event-idx", Options{DisableFeatures: 1 << virtio.FeatureEventIdx}},
	} {
		t.Run(v.name, func(t *testing.T) {
			for _, b := range backends() {
				t.Run(b.name, func(t *testing.T) {
					sock := b.start(t, newImage(t, imgSize), serveOpts{queues: 2, queueSize: 1024})
					opts := v.opts
					opts.NumQueues, opts.QueueSize = 2, 1024
					// libvhost-user (qemu-storage-daemon) does not log its
					// avail_event writes.
					testDirtyLog(t, dial(t, sock, opts), b.name != "qsd")
				})
			}
		})
	}
}

func testDirtyLog(t *testing.T, d *Disk, logsAvailEvent bool) {
	rng := rand.New(rand.NewPCG(5, 6))
	// Some data to read back.
	mustWrite(t, d, randomBytes(rng, 1<<20), 0)
	for _, q := range d.Queues() {
		r, err := q.NewReq(1)
		if err != nil {
			t.Fatal(err)
		}
		r.Type = blk.TypeFlush
		for range 600 {
			if err := q.Do(r); err != nil {
				t.Fatal(err)
			}
		}
		r.Free()
	}

	log, err := d.StartDirtyLog()
	if err != nil {
		t.Fatalf("start dirty log: %v", err)
	}
	log.TakeDirty() // the set-up itself wrote nothing we model
	mem := d.Memory()
	for round := 0; round < 30; round++ {
		want := map[uint64]bool{}
		var bufs []Buffer
		type sub struct {
			q *Queue
			r *Req
		}
		var subs []sub
		for qi, q := range d.Queues() {
			// The used ring's index, elements and (with EVENT_IDX)
			// avail_event; without it the flags, in the index's page.
			u := d.UsedRing(qi)
			n := uint64(q.Size())
			pagesOf(want, u.Addr+2, 2)
			if d.Has(virtio.FeatureEventIdx) && logsAvailEvent {
				pagesOf(want, u.Addr+4+8*n, 2)
			}
			slot := uint64(q.ring.lastUsed)
			// At least one request per queue per round, so that every
			// used ring is written in every round.
			for range 1 + rng.IntN(6) {
				r, err := q.NewReq(4)
				if err != nil {
					t.Fatal(err)
				}
				r.Indirect = d.indirect && d.opts.Indirect
				r.Sector = uint64(rng.IntN(2048)) * 8 // written above, or never written
				typ := []uint32{blk.TypeIn, blk.TypeIn, blk.TypeOut, blk.TypeGetID, blk.TypeFlush}[rng.IntN(5)]
				r.Type = typ
				switch typ {
				case blk.TypeIn, blk.TypeOut:
					for range 1 + rng.IntN(3) {
						// Page-aligned or not, one byte short of a page
						// boundary or spanning several.
						n := uint64(512 * (1 + rng.IntN(24)))
						align := []uint64{512, 4096}[rng.IntN(2)]
						b, err := mem.Alloc(n, align)
						if err != nil {
							t.Fatal(err)
						}
						bufs = append(bufs, b)
						r.Data = append(r.Data, b)
						if typ == blk.TypeIn {
							pagesOf(want, b.Addr, n)
						}
					}
				case blk.TypeGetID:
					b, err := mem.Alloc(blk.IDBytes, 16)
					if err != nil {
						t.Fatal(err)
					}
					bufs = append(bufs, b)
					r.Data = []Buffer{b}
					pagesOf(want, b.Addr, blk.IDBytes)
				}
				s := r.StatusBuf()
				pagesOf(want, s.Addr, 1)
				pagesOf(want, u.Addr+4+8*(slot%n), 8)
				slot++
				subs = append(subs, sub{q, r})
			}
		}
		for _, s := range subs {
			if err := s.q.Submit(s.r); err != nil {
				t.Fatal(err)
			}
		}
		for _, s := range subs {
			for !s.r.Done() {
				if _, err := s.q.Wait(nil, 10*time.Second); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
			}
			if s.r.Status != blk.StatusOK {
				t.Fatalf("round %d: request type %d at %d: status %d", round, s.r.Type, s.r.Sector, s.r.Status)
			}
		}
		// The used ring is marked just after the index is published:
		// collect until the model's pages are all there (or time runs
		// out), then compare exactly.
		got := map[uint64]bool{}
		for deadline := time.Now().Add(5 * time.Second); ; {
			for _, p := range log.TakeDirty() {
				got[p] = true
			}
			missing := false
			for p := range want {
				if !got[p] {
					missing = true
				}
			}
			if !missing || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Millisecond)
		}
		if g, w := sortedPages(got), sortedPages(want); !slices.Equal(g, w) {
			t.Fatalf("round %d: dirty pages %v, model %v", round, g, w)
		}
		for _, s := range subs {
			s.r.Free()
		}
		for _, b := range bufs {
			mem.Free(b)
		}
	}

	if err := d.StopDirtyLog(); err != nil {
		t.Fatalf("stop dirty log: %v", err)
	}
	log.TakeDirty()
	for i := range 50 {
		mustRead(t, d, 8192, int64(i)*8192)
		mustWrite(t, d, randomBytes(rng, 4096), int64(i)*4096)
	}
	if got := log.TakeDirty(); len(got) != 0 {
		t.Fatalf("logging off: %d pages marked: %v", len(got), got)
	}
}
