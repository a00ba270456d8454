package blk_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/rawdisk"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// countingAsync counts what reaches a storage's asynchronous queues, to
// show which path the device took.
type countingAsync struct {
	blockdev.AsyncStorage
	reads, writes, flushes atomic.Int64
}

func (c *countingAsync) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	q, err := c.AsyncStorage.OpenQueue(depth, done)
	if err != nil {
		return nil, err
	}
	return &countingQueue{q, c}, nil
}

type countingQueue struct {
	blockdev.AsyncQueue
	c *countingAsync
}

func (q *countingQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	q.c.reads.Add(1)
	return q.AsyncQueue.ReadAt(tag, bufs, off)
}

func (q *countingQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	q.c.writes.Add(1)
	return q.AsyncQueue.WriteAt(tag, bufs, off)
}

func (q *countingQueue) Flush(tag uint16) error {
	q.c.flushes.Add(1)
	return q.AsyncQueue.Flush(tag)
}

func openRawdisk(t *testing.T, size int64) *rawdisk.Disk {
	t.Helper()
	path := newFileStorage(t, size).f.Name() // creates the image
	d, err := rawdisk.Open(path, rawdisk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := d.Uring(); !ok {
		t.Fatalf("io_uring unavailable: %v", err) // PLATFORM.md: it works here
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// burst submits n requests on queue 0 with one kick and waits for all of
// them; it returns each request's status and, for reads, data.
type burstReq struct {
	typ    uint32
	sector uint64
	data   []byte // written for OUT
	in     int    // bytes to read for IN
}

type burstResult struct {
	status byte
	used   uint32
	data   []byte
}

func (h *harness) burst(t *testing.T, reqs []burstReq) []burstResult {
	t.Helper()
	h.mu[0].Lock()
	defer h.mu[0].Unlock()
	d := h.drv[0]
	type pending struct {
		i        int
		in, stat virtiotest.Buf
	}
	subs := map[uint16]pending{}
	for i, r := range reqs {
		bufs := []virtiotest.Buf{d.AllocBuf(16, false, header(r.typ, r.sector))}
		if len(r.data) > 0 {
			bufs = append(bufs, d.AllocBuf(uint32(len(r.data)), false, r.data))
		}
		var in virtiotest.Buf
		if r.in > 0 {
			in = d.AllocBuf(uint32(r.in), true, nil)
			bufs = append(bufs, in)
		}
		stat := d.AllocBuf(1, true, []byte{0xff})
		bufs = append(bufs, stat)
		subs[d.AddIndirect(bufs...)] = pending{i, in, stat}
	}
	if err := d.KickNow(); err != nil {
		t.Fatal(err)
	}
	out := make([]burstResult, len(reqs))
	deadline := time.Now().Add(10 * time.Second)
	for len(subs) > 0 {
		u, ok := d.PopUsed()
		if !ok {
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d requests not completed", len(subs), len(reqs))
			}
			d.SetUsedEvent(d.UsedIdx())
			d.WaitCall(5)
			continue
		}
		p, ok := subs[uint16(u.ID)]
		if !ok {
			t.Fatalf("completion of unknown head %d", u.ID)
		}
		delete(subs, uint16(u.ID))
		res := burstResult{status: h.mem.Bytes(p.stat.Addr, 1)[0], used: u.Len}
		if p.in.Len > 0 {
			res.data = append([]byte(nil), h.mem.Bytes(p.in.Addr, uint64(p.in.Len))...)
		}
		out[p.i] = res
	}
	return out
}

// The same mixed bursts give the same results through io_uring and
// through the synchronous calls; only the first uses the async queue.
func TestAsyncPathMatchesSync(t *testing.T) {
	for _, syncOnly := range []bool{false, true} {
		t.Run(fmt.Sprintf("syncOnly=%v", syncOnly), func(t *testing.T) {
			c := &countingAsync{AsyncStorage: openRawdisk(t, diskSize)}
			h := newHarness(t, c, blk.Options{SyncOnly: syncOnly}, 128, allFeat)
			const n = 100
			var writes []burstReq
			for i := range n {
				writes = append(writes, burstReq{typ: blk.TypeOut, sector: uint64(i * 16), data: pattern(4096+512*(i%9), byte(i))})
			}
			writes = append(writes, burstReq{typ: blk.TypeFlush})
			for i, r := range h.burst(t, writes) {
				if r.status != blk.StatusOK || r.used != 1 {
					t.Fatalf("request %d: status %d used %d", i, r.status, r.used)
				}
			}
			// Reads, mixed with requests the async path leaves to the
			// workers: out of range, GET_ID, write zeroes.
			var reads []burstReq
			for i := range n {
				reads = append(reads, burstReq{typ: blk.TypeIn, sector: uint64(i * 16), in: 4096 + 512*(i%9)})
			}
			reads = append(reads,
				burstReq{typ: blk.TypeIn, sector: diskSize / 512, in: 512},
				burstReq{typ: blk.TypeGetID, in: blk.IDBytes},
				burstReq{typ: blk.TypeWriteZeroes, sector: 4000, data: segment(4000, 8, 0)},
			)
			res := h.burst(t, reads)
			for i := range n {
				r := res[i]
				if r.status != blk.StatusOK || int(r.used) != len(writes[i].data)+1 || !bytes.Equal(r.data, writes[i].data) {
					t.Fatalf("read %d: status %d used %d, data equal %v", i, r.status, r.used, bytes.Equal(r.data, writes[i].data))
				}
			}
			if r := res[n]; r.status != blk.StatusIOErr || r.used != 1 {
				t.Fatalf("read beyond capacity: status %d used %d", r.status, r.used)
			}
			if r := res[n+1]; r.status != blk.StatusOK {
				t.Fatalf("GET_ID: status %d", r.status)
			}
			if r := res[n+2]; r.status != blk.StatusOK {
				t.Fatalf("WRITE_ZEROES: status %d", r.status)
			}
			nr, nw, nf := c.reads.Load(), c.writes.Load(), c.flushes.Load()
			if syncOnly && nr+nw+nf != 0 {
				t.Fatalf("SyncOnly device used the async queue: %d reads, %d writes, %d flushes", nr, nw, nf)
			}
			if !syncOnly && (nr != n || nw != n || nf != 1) {
				t.Fatalf("async queue saw %d reads, %d writes, %d flushes; want %d, %d, 1", nr, nw, nf, n, n)
			}
		})
	}
}

// With the write cache off, writes go through the synchronous path (which
// flushes after each); reads stay asynchronous.
func TestAsyncWriteThrough(t *testing.T) {
	c := &countingAsync{AsyncStorage: openRawdisk(t, diskSize)}
	h := newHarness(t, c, blk.Options{WriteThrough: true}, 128, allFeat)
	h.mustWrite(t, 8, pattern(4096, 3))
	expectEqual(t, h.mustRead(t, 8, 4096), pattern(4096, 3))
	if c.writes.Load() != 0 || c.reads.Load() != 1 {
		t.Fatalf("async queue saw %d writes, %d reads; want 0, 1", c.writes.Load(), c.reads.Load())
	}
}

// heldAsync is an AsyncStorage over fileStorage whose completions the test
// releases: for checking that stopping waits for them.
type heldAsync struct {
	*fileStorage
	release chan struct{}
	started atomic.Int64
}

type heldQueue struct {
	s    *heldAsync
	done func([]blockdev.Completion)
	next []blockdev.Completion
	wg   sync.WaitGroup
}

func (s *heldAsync) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	return &heldQueue{s: s, done: done}, nil
}

func (q *heldQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	q.next = append(q.next, blockdev.Completion{Tag: tag, Err: q.s.fileStorage.ReadAt(bufs, off)})
	return nil
}

func (q *heldQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	return errors.New("not here")
}

func (q *heldQueue) Flush(tag uint16) error { return errors.New("not here") }

func (q *heldQueue) Submit() {
	if len(q.next) == 0 {
		return
	}
	batch := q.next
	q.next = nil
	q.s.started.Add(int64(len(batch)))
	q.wg.Add(1)
	go func() {
		defer q.wg.Done()
		<-q.s.release
		q.done(batch)
	}()
}

func (q *heldQueue) Close() error {
	q.wg.Wait()
	return nil
}

func TestDrainWaitsForAsync(t *testing.T) {
	s := &heldAsync{fileStorage: newFileStorage(t, diskSize), release: make(chan struct{})}
	h := newHarness(t, s, blk.Options{}, 16, allFeat)
	d := h.drv[0]
	for range 3 {
		d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), d.AllocBuf(512, true, nil), d.AllocBuf(1, true, nil))
	}
	d.KickNow()
	for start := time.Now(); s.started.Load() != 3; time.Sleep(time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%d requests started asynchronously, want 3", s.started.Load())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := h.dev.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with requests held: %v", err)
	}
	close(s.release)
	if err := h.dev.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		if _, ok := d.PopUsed(); !ok {
			break
		}
		n++
	}
	if n != 3 {
		t.Fatalf("%d completions when Drain returned, want 3", n)
	}
}

// orderedAsync is an AsyncStorage over fileStorage that delivers each
// Submit's requests as one batch, in order, on one completion goroutine
// (as io_uring storages do). The first batch waits for release; Flush
// after that waits until the second batch has been delivered: a storage
// whose flush depends on its own later completions (a thin pool's commit
// waits for its reads in flight).
type orderedAsync struct {
	*fileStorage
	release, second chan struct{}
	started         atomic.Int64
	stuck           atomic.Bool // a Flush gave up waiting
}

type orderedQueue struct {
	s       *orderedAsync
	done    func([]blockdev.Completion)
	next    []blockdev.Completion
	batches chan []blockdev.Completion
	exited  chan struct{}
}

func (s *orderedAsync) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	q := &orderedQueue{s: s, done: done, batches: make(chan []blockdev.Completion, depth), exited: make(chan struct{})}
	go func() {
		defer close(q.exited)
		n := 0
		for b := range q.batches {
			if n == 0 {
				<-s.release
			}
			q.done(b)
			if n++; n == 2 {
				close(s.second)
			}
		}
	}()
	return q, nil
}

func (s *orderedAsync) Flush() error {
	select {
	case <-s.release:
	default:
		return s.fileStorage.Flush() // before the test releases the first batch
	}
	select {
	case <-s.second:
		return s.fileStorage.Flush()
	case <-time.After(5 * time.Second):
		s.stuck.Store(true)
		return errors.New("flush waited 5 s for the storage's own completions")
	}
}

func (q *orderedQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	q.next = append(q.next, blockdev.Completion{Tag: tag, Err: q.s.fileStorage.ReadAt(bufs, off)})
	return nil
}

func (q *orderedQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	q.next = append(q.next, blockdev.Completion{Tag: tag, Err: q.s.fileStorage.WriteAt(bufs, off)})
	return nil
}

func (q *orderedQueue) Flush(tag uint16) error { return errors.New("not here") }

func (q *orderedQueue) Submit() {
	if len(q.next) > 0 {
		q.s.started.Add(int64(len(q.next)))
		q.batches <- q.next
		q.next = nil
	}
}

func (q *orderedQueue) Close() error {
	close(q.batches)
	<-q.exited
	return nil
}

// A write that completes after the guest turned the write cache off is
// flushed first, but not on the storage's completion goroutine: the
// flush may need completions that only that goroutine delivers.
func TestAsyncWriteThroughFlushOffCompletionGoroutine(t *testing.T) {
	s := &orderedAsync{fileStorage: newFileStorage(t, diskSize), release: make(chan struct{}), second: make(chan struct{})}
	h := newHarness(t, s, blk.Options{}, 16, allFeat)
	d := h.drv[0]
	waitStarted := func(n int64) {
		for start := time.Now(); s.started.Load() != n; time.Sleep(time.Millisecond) {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%d requests started asynchronously, want %d", s.started.Load(), n)
			}
		}
	}
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeOut, 0)), d.AllocBuf(512, false, pattern(512, 1)), d.AllocBuf(1, true, nil))
	d.KickNow()
	waitStarted(1)
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), d.AllocBuf(512, true, nil), d.AllocBuf(1, true, nil))
	d.KickNow()
	waitStarted(2)
	if err := h.dev.WriteConfig([]byte{0}, blk.ConfigWritebackMode); err != nil {
		t.Fatal(err)
	}
	close(s.release)
	n := 0
	for start := time.Now(); n < 2; {
		if _, ok := d.PopUsed(); ok {
			n++
			continue
		}
		if time.Since(start) > 20*time.Second {
			t.Fatalf("%d of 2 requests completed", n)
		}
		time.Sleep(time.Millisecond)
	}
	if s.stuck.Load() {
		t.Fatal("the write-through flush ran on the completion goroutine and waited for it")
	}
}
