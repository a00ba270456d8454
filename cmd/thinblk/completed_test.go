package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
	"github.com/thinblk/thinblk/virtio/blk"
)

// TestServeNeverTouchesCompletedBuffers: once a request is on the used ring its buffers are
// the driver's again, and a guest reuses them at once (page cache, kernel stacks). A back-end
// that wrote one late (an I/O finishing after its request was completed, a completion pushed
// twice) would corrupt guest memory far from the disk. The driver paints every completed
// request's buffers (data, header, status) with a canary and checks it once many later
// requests have completed, and again at the end; a random mix of reads (mapped and unmapped
// blocks, scattered buffers), writes that allocate and overwrite, discards, write-zeroes with
// and without unmap and flushes keeps both queues full, so thin's asynchronous and
// synchronous paths, declines, commits and punching all run.
func TestServeNeverTouchesCompletedBuffers(t *testing.T) {
	bin := buildThinblk(t)
	const volSize = 32 << 20
	t.Run("pool", func(t *testing.T) {
		s := serveNewPool(t, bin, []string{"--size", "48M", "--block-size", "64K"}, volSize, "--queues", "2")
		paintAndCheck(t, s.sock, volSize, s.logs.String)
		s.stop(t)
		if out := mustThinblk(t, "check", s.dir, "--quiet"); !strings.Contains(out, "clean") {
			t.Errorf("check: %q", out)
		}
	})
	t.Run("raw", func(t *testing.T) {
		s := serveNewImage(t, bin, volSize, "--queues", "2")
		paintAndCheck(t, s.sock, volSize, s.logs.String)
		s.stop(t)
	})
}

// quarantined is a completed request whose buffers carry a canary.
type quarantined struct {
	r      *frontend.Req
	bufs   []frontend.Buffer
	canary byte
}

func paint(q quarantined) {
	for _, b := range append(q.bufs, q.r.Header(), q.r.StatusBuf()) {
		for i := range b.Bytes {
			b.Bytes[i] = q.canary
		}
	}
}

// changed returns where the canary was overwritten, or "".
func changed(q quarantined) string {
	for bi, b := range append(q.bufs, q.r.Header(), q.r.StatusBuf()) {
		for i, c := range b.Bytes {
			if c != q.canary {
				return fmt.Sprintf("buffer %d (guest address %#x) byte %d is %#x, painted %#x", bi, b.Addr, i, c, q.canary)
			}
		}
	}
	return ""
}

func paintAndCheck(t *testing.T, sock string, size int64, logs func() string) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2, MemSize: 128 << 20})
	if err != nil {
		t.Fatalf("dial: %v\n%s", err, logs())
	}
	defer disk.Close()
	var wg sync.WaitGroup
	var left [2][]quarantined
	errs := make([]error, 2)
	for qi := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[qi] = driveQueue(disk, disk.Queue(qi), size, uint64(qi), &left[qi])
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("%v\nback-end log:\n%s", err, logs())
		}
	}
	// A last round trip on each queue: whatever the back-end still had in hand for the
	// quarantined requests has happened by the time both answered.
	for range 2 {
		if err := disk.Flush(); err != nil {
			t.Fatalf("final flush: %v\n%s", err, logs())
		}
	}
	time.Sleep(100 * time.Millisecond)
	for qi := range 2 {
		for _, e := range left[qi] {
			if where := changed(e); where != "" {
				t.Errorf("queue %d: the back-end wrote a completed request's buffer (type %d, sector %d): %s",
					qi, e.r.Type, e.r.Sector, where)
			}
		}
	}
}

// splitBlocks cuts n blocks into at most pieces non-empty parts.
func splitBlocks(rng *rand.Rand, n, pieces int) []int {
	var parts []int
	for n > 0 {
		l := n
		if len(parts) < pieces-1 && n > 1 && rng.IntN(2) == 0 {
			l = 1 + rng.IntN(n-1)
		}
		parts = append(parts, l)
		n -= l
	}
	return parts
}

// driveQueue keeps depth requests in flight on q for total requests, quarantining each
// completed one until keep later ones have completed.
// The requests still quarantined at the end are left in *left.
func driveQueue(disk *frontend.Disk, q *frontend.Queue, size int64, seed uint64, left *[]quarantined) error {
	const (
		total = 1500
		depth = 32
		keep  = 96
		block = 4096
	)
	rng := rand.New(rand.NewPCG(seed, 77))
	mem := disk.Memory()
	var quarantine []quarantined
	inFlight := map[*frontend.Req][]frontend.Buffer{}
	release := func(e quarantined) error {
		if where := changed(e); where != "" {
			return fmt.Errorf("queue %d: the back-end wrote a completed request's buffer (type %d, sector %d): %s",
				q.Index(), e.r.Type, e.r.Sector, where)
		}
		for _, b := range e.bufs {
			mem.Free(b)
		}
		e.r.Free()
		return nil
	}
	alloc := func(n int) (frontend.Buffer, error) { return mem.Alloc(uint64(n), 512) }
	newReq := func() (*frontend.Req, []frontend.Buffer, error) {
		r, err := q.NewReq(4)
		if err != nil {
			return nil, nil, err
		}
		off := rng.Int64N(size/block) * block
		n := min(int(1+rng.IntN(32))*block, int(size-off))
		r.Sector = uint64(off / blk.SectorSize)
		var bufs []frontend.Buffer
		switch k := rng.IntN(100); {
		case k < 75: // read or write, in one to three pieces
			r.Type = blk.TypeIn
			if k >= 40 {
				r.Type = blk.TypeOut
			}
			for _, l := range splitBlocks(rng, n/block, 3) {
				b, err := alloc(l * block)
				if err != nil {
					return nil, nil, err
				}
				if r.Type == blk.TypeOut {
					for i := range b.Bytes {
						b.Bytes[i] = byte(rng.Uint32())
					}
				}
				bufs = append(bufs, b)
			}
		case k < 93: // discard, write-zeroes with and without unmap
			r.Type, r.Sector = blk.TypeDiscard, 0
			var flags uint32
			if k >= 85 {
				r.Type = blk.TypeWriteZeroes
				if k < 90 {
					flags = blk.DiscardFlagUnmap
				}
			}
			b, err := alloc(blk.DiscardSegmentSize)
			if err != nil {
				return nil, nil, err
			}
			copy(b.Bytes, frontend.EncodeSegments(frontend.DiscardSegment{
				Sector: uint64(off / blk.SectorSize), NumSectors: uint32(n / blk.SectorSize), Flags: flags}))
			bufs = append(bufs, b)
		default:
			r.Type, r.Sector = blk.TypeFlush, 0
		}
		r.Data = bufs
		return r, bufs, nil
	}
	submitted := 0
	var done []*frontend.Req
	for submitted < total || len(inFlight) > 0 {
		var batch []*frontend.Req
		for len(inFlight)+len(batch) < depth && submitted < total {
			r, bufs, err := newReq()
			if err != nil {
				return fmt.Errorf("queue %d: build request: %w", q.Index(), err)
			}
			inFlight[r] = bufs
			batch = append(batch, r)
			submitted++
		}
		if len(batch) > 0 {
			if err := q.Submit(batch...); err != nil {
				return fmt.Errorf("queue %d: submit: %w", q.Index(), err)
			}
		}
		var err error
		if done, err = q.Wait(done[:0], 30*time.Second); err != nil {
			return fmt.Errorf("queue %d: %d of %d submitted, %d in flight: %w", q.Index(), submitted, total, len(inFlight), err)
		}
		for _, r := range done {
			bufs, ok := inFlight[r]
			if !ok {
				return fmt.Errorf("queue %d: a request completed twice", q.Index())
			}
			delete(inFlight, r)
			// The pool is larger than the volume: every request succeeds.
			if r.Status != blk.StatusOK {
				return fmt.Errorf("queue %d: request type %d: status %d", q.Index(), r.Type, r.Status)
			}
			e := quarantined{r: r, bufs: bufs, canary: byte(0xA0 | rng.IntN(16))}
			paint(e)
			quarantine = append(quarantine, e)
			if len(quarantine) > keep {
				if err := release(quarantine[0]); err != nil {
					return err
				}
				quarantine = quarantine[1:]
			}
		}
	}
	*left = quarantine
	return nil
}
