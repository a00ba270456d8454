package thin

import (
	"errors"
	"fmt"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/uring"
	"github.com/thinblk/thinblk/internal/vio"
)

// Asynchronous requests (blockdev.AsyncStorage, on a uring.Queue). A read
// resolves its blocks under the pool lock on the caller's goroutine,
// submits the data I/O to io_uring on the pool's data file and completes
// on a goroutine of the queue's; unmapped blocks read
// as zeros without I/O. A write runs on the caller's goroutine (see
// WriteAt) and completes the same way. Every rule of the synchronous path
// holds (see doc.go):
//
//   - the I/O gate is held shared from planning until the I/O completed,
//     so no freed block is handed out while a request still aims at it;
//   - a new block is planned by planWrite (filling, so that others wait)
//     and published by doWrite only after its data is written;
//   - requests that would wait (a block being filled, no space, the zero
//     mark to raise, pending changes over the limit, the gate taken or
//     wanted by a commit) are declined: the caller serves them through
//     Volume.ReadAt/WriteAt, which wait on a goroutine of their own. The
//     caller's goroutine never waits here: reads it started but has not
//     submitted yet hold the gate, and a commit waiting for the gate
//     would wait for them.
//
// FLUSH is left to the synchronous path (a commit, which may wait for the
// gate).

// errDeclined means the request was not started: serve it synchronously.
var errDeclined = errors.New("thin: request not started asynchronously")

// asyncQueue serves reads and writes of one volume asynchronously. Its
// methods are called from one goroutine at a time (the submitter). The
// buffers (guest memory) stay untouched by the caller until their
// request completes.
type asyncQueue struct {
	*uring.Queue
	v    *Volume
	p    *Pool
	offs []int64 // a read's offset per tag, for its error
	pbs  []int64 // submitter's: a read's physical block per block, -1 if unmapped
}

// OpenQueue returns an asynchronous queue for up to depth requests in
// flight, tagged 0 to depth-1. done receives completions in batches, on a
// goroutine of the queue's; the slice is reused once done returns.
// A write waiting for space can be withdrawn (a ring stopping answers at
// once; the write runs again when the ring starts).
var _ blockdev.WithdrawableStorage = (*Volume)(nil)

func (v *Volume) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	p := v.p
	q := &asyncQueue{v: v, p: p}
	// Data files without a descriptor (the tests' crashable files) run
	// their reads on the queue's goroutine instead of a kernel ring.
	fd := -1
	if f, ok := p.data.(interface{ fd() int }); ok {
		fd = f.fd()
	}
	uq, err := uring.NewQueue(uring.QueueOptions{
		Depth: depth, Entries: 4*depth + 1, Fd: fd,
		Sync:   q.readRest,
		Finish: q.finishRead,
		Done:   done,
	})
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.name, err)
	}
	q.Queue, q.offs = uq, make([]int64, depth)
	return q, nil
}

// ReadAt starts reading consecutive bytes at off into bufs. An error
// means it was not started: serve it with Volume.ReadAt.
func (q *asyncQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	v, p := q.v, q.p
	n := int64(totalLen(bufs))
	if n == 0 || v.checkRange("read", off, int(n)) != nil || !q.Begin(tag) {
		return errDeclined
	}
	blocks := int((off+n-1)>>p.shift - off>>p.shift + 1)
	if !q.Room(1, len(bufs)+blocks) || !p.ioGate.TryRLock() {
		return errDeclined
	}
	// The gate passes to the request once its reads are submitted (the
	// completion releases it); until then it is released on every exit,
	// also when clearing the guest's buffers faults (see readGated).
	handed := false
	defer func() {
		if !handed {
			p.ioGate.RUnlock()
		}
	}()
	q.offs[tag], q.pbs = off, q.pbs[:0]
	p.mu.Lock()
	if v.startLocked() != nil {
		p.mu.Unlock()
		return errDeclined
	}
	layer := v.st.rec.Layer
	for pos := off; pos < off+n; pos = (pos>>p.shift + 1) << p.shift {
		vb := uint64(pos >> p.shift)
		if p.filling[mapKey{layer, vb}] != nil {
			p.mu.Unlock()
			return errDeclined
		}
		e, _, err := p.resolveLocked(layer, vb)
		if err != nil {
			p.mu.Unlock()
			return errDeclined
		}
		pb := int64(-1)
		if e.Mapped() {
			pb = int64(e.PBlock)
		}
		q.pbs = append(q.pbs, pb)
	}
	p.mu.Unlock()
	if t := p.trace.Load(); t != nil {
		p.traceRead(t, v.name, "read-async", off, n, q.pbs)
	}
	c := vio.NewCursor(bufs)
	bs := p.blockSize
	mapped := false
	for i, pos := 0, off; pos < off+n; i++ {
		inBlk := pos & (bs - 1)
		l := min(bs-inBlk, off+n-pos)
		if pb := q.pbs[i]; pb < 0 {
			c.Clear(l)
		} else {
			// The pieces of consecutive file bytes make one submission.
			mapped = true
			for at, end := pb<<p.shift+inBlk, pb<<p.shift+inBlk+l; at < end; {
				b := c.Next(end - at)
				if len(b) == 0 {
					break // checkRange and totalLen make this unreachable
				}
				q.Add(uring.OpReadv, at, b)
				at += int64(len(b))
			}
		}
		pos += l
	}
	if !mapped {
		p.ioGate.RUnlock()
		handed = true
		q.Complete(tag, nil)
		return nil
	}
	// The completion (finishRead) releases the gate.
	handed = q.Start()
	if !handed {
		return errDeclined
	}
	return nil
}

// WriteAt writes bufs to consecutive bytes at off on the caller's
// goroutine and completes through the queue. ext4 has no non-blocking
// buffered writes (RWF_NOWAIT gets EOPNOTSUPP), so io_uring would hand
// every write to a kernel worker thread: measured on a thin pool's data
// file, that cost 3 to 4 times the CPU of the write itself, and a worker
// goroutine per write (the synchronous path) twice. Writes that would
// wait are declined: serve them with Volume.WriteAt.
func (q *asyncQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	v, p := q.v, q.p
	n := int64(totalLen(bufs))
	if n == 0 || v.checkRange("write", off, int(n)) != nil || !q.Begin(tag) || !q.Room(1, 0) {
		return errDeclined
	}
	// Above twice the pending limit the synchronous path commits before
	// it returns (backpressure): leave such writes to it. This goroutine
	// must not commit: the reads it started but has not submitted yet
	// hold the I/O gate that a commit may wait for.
	p.mu.Lock()
	over := len(p.dirty) >= 2*p.opts.MaxPending
	p.mu.Unlock()
	if over || !p.ioGate.TryRLock() {
		return errDeclined
	}
	started, _, err := v.writeGated(bufs, off, n)
	if !started {
		return errDeclined
	}
	p.opSeq.Add(1) // failed too (see Volume.WriteAt)
	q.Complete(tag, err)
	return nil
}

// Flush is not served asynchronously (a commit blocks): the caller serves
// it with Volume.Flush.
func (q *asyncQueue) Flush(tag uint16) error { return errDeclined }

// readRest reads bufs at off in the data file: the rest of a short read,
// or every read of a data file without a descriptor.
func (q *asyncQueue) readRest(op uint8, bufs [][]byte, off int64) error {
	if op != uring.OpReadv {
		return fmt.Errorf("volume %s: io_uring op %d: %w", q.v.name, op, errors.ErrUnsupported)
	}
	for _, b := range bufs {
		if err := readFull(q.p.data, b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

// finishRead ends a read whose submissions all completed: it releases the
// I/O gate.
func (q *asyncQueue) finishRead(tag uint16, err error) error {
	q.p.ioGate.RUnlock()
	if err != nil {
		return fmt.Errorf("read volume %s at %d: %w", q.v.name, q.offs[tag], err)
	}
	return nil
}
