package thin

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/uring"
)

// Asynchronous requests (the shape of virtio/blk's AsyncStorage, without
// importing it). A read resolves its blocks under the pool lock on the
// caller's goroutine, submits the data I/O to io_uring on the pool's data
// file and completes on a goroutine of the queue's; unmapped blocks read
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

// Completion is the outcome of one asynchronous request.
type Completion struct {
	Tag uint16
	Err error // nil, or why the request failed
}

// errDeclined means the request was not started: serve it synchronously.
var errDeclined = errors.New("thin: request not started asynchronously")

// User data of a submission: the tag in the low 16 bits, the segment
// above it; nopBit marks a request that is already done (a write, or a
// read of unmapped blocks: its outcome is in its slot), stopTag the Close
// NOP.
const (
	nopBit  = 1 << 32
	stopTag = 1 << 33
)

// AsyncQueue serves reads and writes of one volume asynchronously. Its
// methods are called from one goroutine at a time (the submitter). The
// buffers (guest memory) stay untouched by the caller until their
// request completes.
type AsyncQueue struct {
	v     *Volume
	p     *Pool
	ring  aioRing
	done  func([]Completion)
	slots []aslot
	// Bounds of one request, so that a started request always fits.
	maxSQEs, maxIovs int
	broken           bool // submission failed: every later request is declined

	// inflight counts submissions prepared and not yet completed; the
	// completion goroutine exits once it is zero after Close began.
	inflight atomic.Int64
	closing  atomic.Bool
	exited   chan struct{}

	// Completion goroutine.
	ios   []ioDone
	batch []Completion
}

// aslot is the reused state of one tag's request.
type aslot struct {
	off     int64
	pbs     []int64 // a read's physical block per block, -1 if unmapped
	segs    []aseg
	nsegs   int
	pending atomic.Int32 // submissions not yet completed
	err     error        // a finished (nopBit) request's outcome
}

// aseg is one submission: consecutive bytes of the data file.
type aseg struct {
	bufs [][]byte
	iov  []unix.Iovec // for io_uring
	off  int64
	size int
	err  error
}

// ioDone is one completed submission.
type ioDone struct {
	ud  uint64
	n   int   // bytes transferred
	err error // unix.Errno from io_uring
}

// aioRing runs submissions: io_uring on the data file, or for data files
// without a descriptor (the tests' crashable files) a goroutine that does
// the same I/O through the dataFile interface.
type aioRing interface {
	free() int
	prep(op uint8, s *aseg, ud uint64) error
	submit() error
	unsubmitted(fn func(ud uint64))
	wait(dst []ioDone) ([]ioDone, error) // at least one
	stop()                               // makes wait return stopTag once idle
	close()
}

// OpenQueue returns an asynchronous queue for up to depth requests in
// flight, tagged 0 to depth-1. done receives completions in batches, on a
// goroutine of the queue's; the slice is reused once done returns.
func (v *Volume) OpenQueue(depth int, done func([]Completion)) (*AsyncQueue, error) {
	if depth < 1 || depth > 1<<16 {
		return nil, fmt.Errorf("volume %s: queue depth %d: want 1 to 65536", v.name, depth)
	}
	p := v.p
	q := &AsyncQueue{
		v: v, p: p, done: done,
		slots:  make([]aslot, depth),
		exited: make(chan struct{}),
	}
	if f, ok := p.data.(interface{ fd() int }); ok {
		r, err := uring.New(uint32(4*depth + 1))
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w: %w", v.name, err, errors.ErrUnsupported)
		}
		q.ring = &uringRing{r: r, fd: f.fd()}
		// Completions never exceed the completion ring; one submission
		// slot stays free for Close's NOP.
		q.maxSQEs = int(r.CQEntries()) - 1
	} else {
		q.ring = newFileRing(p.data, 4*depth+1)
		q.maxSQEs = 8 * depth
	}
	// A request's segments together have at most this many pieces:
	// IOV_MAX, which bounds one segment.
	q.maxIovs = 1024
	q.ios = make([]ioDone, 0, q.maxSQEs+1)
	q.batch = make([]Completion, 0, depth)
	go q.reap()
	return q, nil
}

// room reports whether a request of up to sqes submissions and iovs
// buffer pieces can be started now.
func (q *AsyncQueue) room(sqes, iovs int) bool {
	return !q.broken && iovs <= q.maxIovs && q.ring.free() >= sqes+1 &&
		int(q.inflight.Load())+sqes <= q.maxSQEs
}

// ReadAt starts reading consecutive bytes at off into bufs. An error
// means it was not started: serve it with Volume.ReadAt.
func (q *AsyncQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	v, p := q.v, q.p
	n := int64(totalLen(bufs))
	if int(tag) >= len(q.slots) || n == 0 || v.checkRange("read", off, int(n)) != nil {
		return errDeclined
	}
	blocks := int((off+n-1)>>p.shift - off>>p.shift + 1)
	if !q.room(1, len(bufs)+blocks) || !p.ioGate.TryRLock() {
		return errDeclined
	}
	s := &q.slots[tag]
	s.off, s.pbs, s.nsegs = off, s.pbs[:0], 0
	p.mu.Lock()
	if v.startLocked() != nil {
		p.mu.Unlock()
		p.ioGate.RUnlock()
		return errDeclined
	}
	layer := v.st.rec.Layer
	for pos := off; pos < off+n; pos = (pos>>p.shift + 1) << p.shift {
		vb := uint64(pos >> p.shift)
		if p.filling[mapKey{layer, vb}] != nil {
			p.mu.Unlock()
			p.ioGate.RUnlock()
			return errDeclined
		}
		e, _, err := p.resolveLocked(layer, vb)
		if err != nil {
			p.mu.Unlock()
			p.ioGate.RUnlock()
			return errDeclined
		}
		pb := int64(-1)
		if e.Mapped() {
			pb = int64(e.PBlock)
		}
		s.pbs = append(s.pbs, pb)
	}
	p.mu.Unlock()
	c := cursor{bufs: bufs}
	bs := p.blockSize
	for i, pos := 0, off; pos < off+n; i++ {
		inBlk := pos & (bs - 1)
		l := min(bs-inBlk, off+n-pos)
		if pb := s.pbs[i]; pb < 0 {
			c.clear(l)
		} else {
			q.piece(s, pb<<p.shift+inBlk, l, &c)
		}
		pos += l
	}
	if s.nsegs == 0 {
		p.ioGate.RUnlock()
		q.finished(tag, nil)
		return nil
	}
	if !q.room(s.nsegs, 0) {
		p.ioGate.RUnlock()
		return errDeclined
	}
	q.prepSegs(uring.OpReadv, tag, s)
	return nil
}

// WriteAt writes bufs to consecutive bytes at off on the caller's
// goroutine and completes through the queue. ext4 has no non-blocking
// buffered writes (RWF_NOWAIT gets EOPNOTSUPP), so io_uring would hand
// every write to a kernel worker thread: measured on a thin pool's data
// file, that cost 3 to 4 times the CPU of the write itself, and a worker
// goroutine per write (the synchronous path) twice. Writes that would
// wait are declined: serve them with Volume.WriteAt.
func (q *AsyncQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	v, p := q.v, q.p
	n := int64(totalLen(bufs))
	if int(tag) >= len(q.slots) || n == 0 || v.checkRange("write", off, int(n)) != nil || !q.room(1, 0) {
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
	plans, wait, err := v.planWrite(off, n)
	if wait != nil || err != nil {
		p.ioGate.RUnlock()
		return errDeclined
	}
	err = v.doWrite(plans, bufs, off, n)
	p.ioGate.RUnlock()
	if isHostNoSpace(err) {
		// Nothing was published; the synchronous path retries it as the
		// no-space policy says.
		return errDeclined
	}
	if err != nil {
		err = fmt.Errorf("write volume %s at %d: %w", v.name, off, err)
	} else {
		p.opSeq.Add(1)
	}
	q.finished(tag, err)
	return nil
}

// Flush is not served asynchronously (a commit blocks): the caller serves
// it with Volume.Flush.
func (q *AsyncQueue) Flush(tag uint16) error { return errDeclined }

// cursor walks a scatter-gather list front to back.
type cursor struct {
	bufs [][]byte
	i, o int
}

// take returns up to l bytes of the next buffer (empty at the end).
func (c *cursor) take(l int64) []byte {
	for c.i < len(c.bufs) && c.o == len(c.bufs[c.i]) {
		c.i++
		c.o = 0
	}
	if c.i == len(c.bufs) {
		return nil
	}
	b := c.bufs[c.i][c.o:]
	if int64(len(b)) > l {
		b = b[:l]
	}
	c.o += len(b)
	return b
}

func (c *cursor) clear(l int64) {
	for l > 0 {
		b := c.take(l)
		if len(b) == 0 {
			return
		}
		clear(b)
		l -= int64(len(b))
	}
}

// piece adds l bytes of the request at file offset off: to the last
// segment when it ends there, else as a new segment.
func (q *AsyncQueue) piece(s *aslot, off, l int64, c *cursor) {
	var g *aseg
	if s.nsegs > 0 && s.segs[s.nsegs-1].off+int64(s.segs[s.nsegs-1].size) == off {
		g = &s.segs[s.nsegs-1]
	} else {
		if s.nsegs == len(s.segs) {
			s.segs = append(s.segs, aseg{})
		}
		g = &s.segs[s.nsegs]
		s.nsegs++
		g.bufs, g.off, g.size, g.err = g.bufs[:0], off, 0, nil
	}
	for rest := l; rest > 0; {
		b := c.take(rest)
		if len(b) == 0 {
			break // checkRange and totalLen make this unreachable
		}
		g.bufs = append(g.bufs, b)
		rest -= int64(len(b))
	}
	g.size += int(l)
}

// prepSegs hands a request's segments to the ring (room checked that they
// fit).
func (q *AsyncQueue) prepSegs(op uint8, tag uint16, s *aslot) {
	s.pending.Store(int32(s.nsegs))
	var failed error
	prepped := 0
	for i := range s.nsegs {
		if err := q.ring.prep(op, &s.segs[i], uint64(tag)|uint64(i)<<16); err != nil {
			s.segs[i].err, failed = err, err // cannot happen after room
			continue
		}
		prepped++
	}
	// After the slot's last write (prep builds the iovecs): the completion
	// goroutine's Load pairs with it.
	q.inflight.Add(int64(prepped))
	if failed != nil && s.pending.Add(-int32(s.nsegs-prepped)) == 0 {
		q.done([]Completion{{tag, q.finishReq(s)}})
	}
}

// finished completes a request that needed no I/O (or ran synchronously)
// through a NOP, so that every completion comes from the completion
// goroutine in its batches.
func (q *AsyncQueue) finished(tag uint16, err error) {
	s := &q.slots[tag]
	s.err = err
	s.pending.Store(1)
	q.inflight.Add(1)
	if q.ring.prep(uring.OpNop, nil, uint64(tag)|nopBit) != nil {
		q.inflight.Add(-1)
		q.done([]Completion{{tag, err}})
	}
}

// Submit hands the requests started since the last Submit to the kernel.
func (q *AsyncQueue) Submit() {
	if q.broken {
		return
	}
	if err := q.ring.submit(); err != nil {
		// The kernel refused the ring (it cannot for a valid one): fail
		// what it did not take, decline everything from now on.
		q.broken = true
		var failed []Completion
		q.ring.unsubmitted(func(ud uint64) {
			if c, ok := q.complete(ioDone{ud: ud, err: err}); ok {
				failed = append(failed, c)
			}
			q.inflight.Add(-1)
		})
		if len(failed) > 0 {
			q.done(failed)
		}
	}
}

// Close waits until every started request has completed, then releases
// the queue.
func (q *AsyncQueue) Close() error {
	q.closing.Store(true)
	q.ring.stop()
	<-q.exited
	q.ring.close()
	return nil
}

// reap collects completions until Close has begun and nothing is in
// flight.
func (q *AsyncQueue) reap() {
	defer close(q.exited)
	for {
		if q.closing.Load() && q.inflight.Load() == 0 {
			return
		}
		ios, err := q.ring.wait(q.ios[:0])
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		// The kernel orders the submitter's writes (slots, guest
		// buffers) before their completions; this acquire, pairing with
		// the submitter's Add, shows the race detector the same order.
		q.inflight.Load()
		q.ios = ios
		q.batch = q.batch[:0]
		n := 0
		for _, d := range ios {
			if d.ud == stopTag {
				continue
			}
			n++
			if c, ok := q.complete(d); ok {
				q.batch = append(q.batch, c)
			}
		}
		if len(q.batch) > 0 {
			q.done(q.batch)
		}
		q.inflight.Add(-int64(n))
	}
}

// complete records one submission's outcome; when it was its request's
// last, it finishes the request and returns its completion.
func (q *AsyncQueue) complete(d ioDone) (Completion, bool) {
	tag := uint16(d.ud)
	s := &q.slots[tag]
	if d.ud&nopBit != 0 {
		s.pending.Store(0)
		err := s.err
		s.err = nil
		return Completion{tag, err}, true
	}
	g := &s.segs[d.ud>>16&0xffff]
	g.err = q.finishSeg(g, d)
	if s.pending.Add(-1) != 0 {
		return Completion{}, false
	}
	return Completion{tag, q.finishReq(s)}, true
}

// finishSeg turns a read's result into its outcome, doing the rest of a
// short transfer (or all of an interrupted one) synchronously.
func (q *AsyncQueue) finishSeg(g *aseg, d ioDone) error {
	done := d.n
	if d.err != nil {
		if d.err != unix.EINTR && d.err != unix.EAGAIN {
			return d.err
		}
		done = 0
	}
	if done >= g.size {
		return nil
	}
	off := g.off
	for _, b := range g.bufs {
		if done >= len(b) {
			done -= len(b)
			off += int64(len(b))
			continue
		}
		b = b[done:]
		off += int64(done)
		done = 0
		if err := readFull(q.p.data, b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

// finishReq finishes a read whose submissions all completed: it releases
// the I/O gate.
func (q *AsyncQueue) finishReq(s *aslot) error {
	var err error
	for i := range s.nsegs {
		g := &s.segs[i]
		if err == nil {
			err = g.err
		}
		clear(g.bufs) // no references to guest memory are kept
		g.bufs = g.bufs[:0]
	}
	q.p.ioGate.RUnlock()
	if err != nil {
		return fmt.Errorf("read volume %s at %d: %w", q.v.name, s.off, err)
	}
	return nil
}

// uringRing is an io_uring on the data file's descriptor.
type uringRing struct {
	r    *uring.Ring
	fd   int
	cqes []uring.CQE // completion goroutine's
}

func (u *uringRing) free() int { return int(u.r.Free()) }

func (u *uringRing) prep(op uint8, s *aseg, ud uint64) error {
	if s == nil {
		return u.r.Prep(op, -1, 0, 0, 0, 0, ud)
	}
	s.iov = s.iov[:0]
	for _, b := range s.bufs {
		if len(b) > 0 {
			s.iov = append(s.iov, unix.Iovec{Base: &b[0], Len: uint64(len(b))})
		}
	}
	return u.r.Prep(op, u.fd, uintptr(unsafe.Pointer(&s.iov[0])), uint32(len(s.iov)), uint64(s.off), 0, ud)
}

func (u *uringRing) submit() error                  { return u.r.Submit() }
func (u *uringRing) unsubmitted(fn func(ud uint64)) { u.r.Unsubmitted(fn) }

func (u *uringRing) wait(dst []ioDone) ([]ioDone, error) {
	if err := u.r.WaitCQE(); err != nil {
		return dst, err
	}
	if u.cqes == nil {
		u.cqes = make([]uring.CQE, 0, 64)
	}
	u.cqes = u.r.Reap(u.cqes[:0])
	for _, c := range u.cqes {
		d := ioDone{ud: c.UserData, n: int(c.Res)}
		if c.Res < 0 {
			d.n, d.err = 0, unix.Errno(-c.Res)
		}
		dst = append(dst, d)
	}
	return dst, nil
}

func (u *uringRing) stop() {
	// Wakes the completion goroutine if it waits with nothing in flight
	// (room keeps a slot free for this).
	if u.r.Prep(uring.OpNop, -1, 0, 0, 0, 0, stopTag) == nil {
		_ = u.r.Submit()
	}
}

func (u *uringRing) close() { u.r.Close() }

// fileRing runs submissions through the dataFile interface on the
// completion goroutine: the same asynchrony for data files that have no
// descriptor (the crash tests' files).
type fileRing struct {
	d       dataFile
	entries int
	prepped []fileOp // submitter's
	mu      sync.Mutex
	cond    *sync.Cond
	queue   []fileOp
	stopped bool
}

type fileOp struct {
	s  *aseg // nil for a NOP
	ud uint64
}

func newFileRing(d dataFile, entries int) *fileRing {
	r := &fileRing{d: d, entries: entries}
	r.cond = sync.NewCond(&r.mu)
	return r
}

func (r *fileRing) free() int { return r.entries - len(r.prepped) }

func (r *fileRing) prep(op uint8, s *aseg, ud uint64) error {
	if len(r.prepped) >= r.entries {
		return uring.ErrRingFull
	}
	r.prepped = append(r.prepped, fileOp{s, ud}) // reads and NOPs only
	return nil
}

func (r *fileRing) submit() error {
	r.mu.Lock()
	r.queue = append(r.queue, r.prepped...)
	r.mu.Unlock()
	r.prepped = r.prepped[:0]
	r.cond.Signal()
	return nil
}

func (r *fileRing) unsubmitted(func(uint64)) {}

func (r *fileRing) wait(dst []ioDone) ([]ioDone, error) {
	r.mu.Lock()
	for len(r.queue) == 0 && !r.stopped {
		r.cond.Wait()
	}
	ops := r.queue
	r.queue = nil
	stopped := r.stopped
	r.mu.Unlock()
	for _, o := range ops {
		d := ioDone{ud: o.ud}
		if o.s != nil {
			off := o.s.off
			for _, b := range o.s.bufs {
				if err := readFull(r.d, b, off); err != nil {
					d.err = err
					break
				}
				off += int64(len(b))
				d.n += len(b)
			}
		}
		dst = append(dst, d)
	}
	if len(ops) == 0 && stopped {
		dst = append(dst, ioDone{ud: stopTag})
	}
	return dst, nil
}

func (r *fileRing) stop() {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.cond.Broadcast()
}

func (r *fileRing) close() {}
