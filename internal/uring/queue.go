package uring

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/vio"
)

// Queue is the asynchronous request engine of the raw disk and the thin
// pool (blockdev.AsyncQueue's machinery): requests tagged 0 to depth-1,
// each made of submissions to one file, are built and submitted by one
// goroutine (the submitter) and completed in batches by a reaper
// goroutine of the queue's.
//
//   - User data: the tag in the low 16 bits, the submission's index in its
//     request above it; nopBit marks a request finished on the submitter
//     (Complete), stopTag the NOP with which Close wakes the reaper.
//   - A request finished without I/O completes through a NOP, so that
//     every completion comes from the reaper, in its batches.
//   - A short transfer is finished synchronously (QueueOptions.Sync); an
//     interrupted one (EINTR, EAGAIN) is redone whole that way.
//   - Submission and completion slots are counted so that a started
//     request always fits, with one submission slot kept for Close.
//   - A Submit the kernel refuses fails what it did not take, and the
//     queue starts nothing after it (the caller serves synchronously).
//   - Inline mode (Inline) has no reaper: the submitter collects
//     completions itself, in Submit, Poll, Settle and Wait, which also
//     waits for eventfds (the virtqueue's kick) through the ring, so that
//     one sleeping thread serves both.
type Queue struct {
	opts        QueueOptions
	ring        ringer
	maxInflight int // submissions in flight at most: the completion ring's size

	// Submitter's.
	reqs   []request
	cur    *request // being built (Begin)
	curTag uint16
	iovs   int // buffers of the request being built
	broken bool

	// inflight counts submissions handed to the ring and not yet
	// completed; the reaper exits once it is zero after Close began.
	inflight atomic.Int64
	closing  atomic.Bool
	exited   chan struct{}

	// Reaper's (the submitter's in inline mode).
	results []result
	batch   []blockdev.Completion

	reaping bool // the reaper goroutine runs
	// inline: no reaper (Inline). kr is the kernel ring, armed the
	// eventfds with a poll in it.
	inline bool
	kr     *kernelRing
	armed  [maxWaitFds]int32 // -1: free
	// reserve is how many submission slots Room keeps back: Close's NOP,
	// or in inline mode the polls on the waited eventfds.
	reserve int
}

// maxWaitFds is how many eventfds Wait watches at most (the kick and the
// runner's own wake-up).
const maxWaitFds = 2

// QueueOptions configure a Queue.
type QueueOptions struct {
	Depth   int // tags 0 to Depth-1, at most 65536
	Entries int // submission ring size (at least Depth+1)
	// Fd is the file every submission addresses. Without one (Fd < 0, a
	// file that lives in memory), submissions run through Sync on the
	// reaper goroutine instead of a kernel ring: the same asynchrony.
	Fd int
	// Sync does a submission, or the rest of a short one, synchronously:
	// OpReadv and OpWritev transfer bufs at off, OpFsync is fdatasync.
	Sync func(op uint8, bufs [][]byte, off int64) error
	// Finish, if set, runs on the reaper when a request that had
	// submissions is done: it releases what the request held and returns
	// the error its completion carries (err with context, say).
	Finish func(tag uint16, err error) error
	// Done receives completions in batches on the reaper goroutine; the
	// slice is reused once Done returns.
	Done func([]blockdev.Completion)
}

const (
	nopBit  = 1 << 32
	stopTag = 1 << 33
	// pollBit marks a poll on a waited eventfd (the fd below it).
	pollBit = 1 << 34
)

// request is one tag's reused state.
type request struct {
	subs    []sub
	n       int          // submissions in use
	pending atomic.Int32 // submissions not yet completed
	err     error        // outcome of a request finished by Complete
}

// sub is one submission: consecutive bytes of the file.
type sub struct {
	op   uint8
	bufs [][]byte
	iov  []unix.Iovec // read by the kernel until completion
	off  int64
	size int
	err  error
}

// result is one completed submission.
type result struct {
	ud  uint64
	n   int   // bytes transferred
	err error // unix.Errno from the kernel, or Sync's error
}

// ringer runs submissions: a kernel io_uring, or Sync on the reaper.
type ringer interface {
	free() int
	prep(s *sub, ud uint64) error // s nil: a NOP
	submit() error
	unsubmitted(fn func(ud uint64))
	wait(dst []result, block bool) ([]result, error) // at least one if block
	close()
}

// NewQueue sets up a queue and starts its reaper.
func NewQueue(opts QueueOptions) (*Queue, error) {
	if opts.Depth < 1 || opts.Depth > 1<<16 {
		return nil, fmt.Errorf("queue depth %d: want 1 to 65536", opts.Depth)
	}
	entries := max(opts.Entries, opts.Depth+1)
	if opts.Sync == nil {
		opts.Sync = func(uint8, [][]byte, int64) error { return errNoSync }
	}
	q := &Queue{opts: opts, reqs: make([]request, opts.Depth), exited: make(chan struct{}), reserve: 1}
	q.armed = [maxWaitFds]int32{-1, -1}
	if opts.Fd >= 0 {
		r, err := New(uint32(entries))
		if err != nil {
			return nil, fmt.Errorf("%w: %w", err, errors.ErrUnsupported)
		}
		q.kr = &kernelRing{r: r, fd: opts.Fd, cqes: make([]CQE, 0, r.CQEntries())}
		q.ring = q.kr
		// Completions never exceed the completion ring, Close's NOP
		// included.
		q.maxInflight = int(r.CQEntries()) - 1
	} else {
		q.ring = newSyncRing(entries, opts.Sync)
		q.maxInflight = 2 * entries
	}
	q.results = make([]result, 0, q.maxInflight+maxWaitFds+1)
	q.batch = make([]blockdev.Completion, 0, opts.Depth)
	// The reaper starts with the first Submit, unless Inline comes first.
	return q, nil
}

// Inline makes the queue do without its reaper goroutine: completions
// then reach Done on the submitter's goroutine, in Submit, Poll, Settle
// and Wait, and the submitter must call Settle before Close while
// requests are in flight. The submitter's goroutine must stay locked to
// one OS thread (runtime.LockOSThread) from its first Submit or Wait on:
// the ring runs its completions only when that thread waits in it (and
// refuses waits from other threads: Close with requests in flight must
// come from there too). It is false, and nothing changed, for a queue
// without a kernel ring or once Submit was called.
func (q *Queue) Inline() bool {
	if q.inline {
		return true
	}
	if q.kr == nil || q.reaping || q.kr.r.Pending() > 0 {
		return false
	}
	// A ring of one issuer, made now (nothing is prepared in the old one).
	r, err := NewIssuer(q.kr.r.SQEntries())
	if err != nil {
		return false
	}
	q.kr.r.Close()
	q.kr.r, q.kr.cqes = r, make([]CQE, 0, r.CQEntries())
	q.inline, q.reserve = true, maxWaitFds
	// The polls' completions share the completion ring.
	q.maxInflight = int(r.CQEntries()) - maxWaitFds
	q.results = make([]result, 0, int(r.CQEntries()))
	return true
}

// Room reports whether a request of up to sqes submissions and iovs
// buffers can be started now.
func (q *Queue) Room(sqes, iovs int) bool {
	return !q.broken && iovs <= vio.MaxIOV && q.ring.free() >= sqes+q.reserve &&
		int(q.inflight.Load())+sqes <= q.maxInflight
}

// Begin starts building tag's request (Add, then Start), or readies it for
// Complete. It is false for a tag out of range or a broken queue: serve
// the request synchronously.
func (q *Queue) Begin(tag uint16) bool {
	if q.broken || int(tag) >= len(q.reqs) {
		return false
	}
	q.cur, q.curTag, q.iovs = &q.reqs[tag], tag, 0
	q.cur.n = 0
	return true
}

// Add appends b, to be read or written (op) at file offset off, to the
// request being built: to its last submission when that ends at off.
func (q *Queue) Add(op uint8, off int64, b []byte) {
	if len(b) == 0 {
		return
	}
	r := q.cur
	var g *sub
	if r.n > 0 && r.subs[r.n-1].op == op && r.subs[r.n-1].off+int64(r.subs[r.n-1].size) == off {
		g = &r.subs[r.n-1]
	} else {
		g = r.next(op, off)
	}
	g.bufs = append(g.bufs, b)
	g.size += len(b)
	q.iovs++
}

// AddFdatasync appends an fdatasync to the request being built.
func (q *Queue) AddFdatasync() { q.cur.next(OpFsync, 0) }

func (r *request) next(op uint8, off int64) *sub {
	if r.n == len(r.subs) {
		r.subs = append(r.subs, sub{})
	}
	g := &r.subs[r.n]
	r.n++
	g.op, g.bufs, g.off, g.size, g.err = op, g.bufs[:0], off, 0, nil
	return g
}

// Start hands the request being built to the ring; the kernel gets it at
// the next Submit. It is false, and nothing started, when the request has
// no submissions or does not fit now.
func (q *Queue) Start() bool {
	r, tag := q.cur, q.curTag
	if r.n == 0 || !q.Room(r.n, q.iovs) {
		r.release()
		return false
	}
	r.pending.Store(int32(r.n))
	failed := 0
	for i := range r.n {
		if err := q.ring.prep(&r.subs[i], uint64(tag)|uint64(i)<<16); err != nil {
			r.subs[i].err = err // not after Room
			failed++
		}
	}
	// After the request's last write (prep builds the iovecs): the
	// reaper's Load pairs with it. The kernel sees nothing before Submit.
	q.inflight.Add(int64(r.n - failed))
	if failed > 0 {
		if r.pending.Add(-int32(failed)) == 0 {
			q.opts.Done([]blockdev.Completion{{Tag: tag, Err: q.finish(tag, r)}})
		}
	}
	return true
}

// Complete completes tag's request (readied by Begin) with err, done on
// the submitter, through a NOP so that the completion comes in the
// reaper's batches. Check Room(1, 0) before doing the work.
func (q *Queue) Complete(tag uint16, err error) {
	r := &q.reqs[tag]
	r.err = err
	r.pending.Store(1)
	q.inflight.Add(1)
	if q.ring.prep(nil, uint64(tag)|nopBit) != nil {
		// Not after Room: the completion then comes from the submitter.
		q.inflight.Add(-1)
		r.pending.Store(0)
		r.err = nil
		q.opts.Done([]blockdev.Completion{{Tag: tag, Err: err}})
	}
}

// Submit hands the requests started since the last Submit to the kernel.
// In inline mode it also completes what has finished, in the same pass.
func (q *Queue) Submit() {
	if q.broken {
		return
	}
	if q.inline {
		q.submitInline()
		return
	}
	if !q.reaping {
		q.reaping = true
		go q.reap()
	}
	if err := q.ring.submit(); err != nil {
		q.failUnsubmitted(err)
	}
}

// failUnsubmitted fails what the kernel did not take, after it refused
// the ring (it cannot for a valid one); the queue starts nothing from now
// on.
func (q *Queue) failUnsubmitted(err error) {
	q.broken = true
	var failed []blockdev.Completion
	n := 0
	q.ring.unsubmitted(func(ud uint64) {
		if ud == stopTag {
			return
		}
		if ud&pollBit != 0 {
			q.disarm(int32(uint32(ud)))
			return
		}
		n++
		if c, ok := q.complete(result{ud: ud, err: err}); ok {
			failed = append(failed, c)
		}
	})
	if len(failed) > 0 {
		q.opts.Done(failed)
	}
	q.inflight.Add(-int64(n))
}

// submitInline submits what is prepared and completes what has finished,
// without waiting.
func (q *Queue) submitInline() {
	for {
		if err := q.enter(false); err != nil {
			q.failUnsubmitted(err)
			return
		}
		q.reapInline(nil, nil)
		if q.kr.r.Pending() == 0 {
			return
		}
	}
}

// enter submits and runs completions in the kernel ring, waiting for one
// if wait. The first call enables the ring for the calling thread.
func (q *Queue) enter(wait bool) error {
	if err := q.kr.r.Enable(); err != nil {
		return err
	}
	return q.kr.r.SubmitWait(wait)
}

// Poll completes what has finished, without blocking (in inline mode; a
// queue with a reaper does nothing).
func (q *Queue) Poll() {
	if !q.inline || q.broken {
		return
	}
	if q.kr.r.Pending() > 0 || q.kr.r.TaskrunPending() {
		q.submitInline()
		return
	}
	q.reapInline(nil, nil)
}

// Settle waits in inline mode until every started request has completed,
// completing them; the polls of Wait stay armed.
func (q *Queue) Settle() {
	for q.inline && q.inflight.Load() > 0 {
		if q.broken {
			// Entering a refused ring would run entries already
			// failed: what was submitted still completes.
			if err := q.kr.r.WaitCQE(); err != nil {
				time.Sleep(time.Millisecond)
			}
		} else if err := q.enter(true); err != nil {
			q.failUnsubmitted(err)
			continue
		}
		q.reapInline(nil, nil)
	}
}

// Wait submits what is prepared and sleeps in the ring until one of fds
// (eventfds, at most 2) is readable or failed, completing requests as
// they finish meanwhile. revents receives each fd's poll events (0: not
// ready); the caller reads a ready eventfd to reset it. Inline mode only.
// After an error the queue starts no more requests (Room is false): call
// Settle, then serve synchronously.
func (q *Queue) Wait(fds []int32, revents []int16) error {
	err := q.wait(fds, revents)
	if err != nil {
		q.broken = true
	}
	return err
}

func (q *Queue) wait(fds []int32, revents []int16) error {
	if !q.inline {
		return errors.New("io_uring queue: Wait without Inline")
	}
	if len(fds) > maxWaitFds || len(revents) < len(fds) {
		return fmt.Errorf("io_uring queue: Wait for %d fds (%d events), at most %d", len(fds), len(revents), maxWaitFds)
	}
	if q.broken {
		return errors.New("io_uring queue: ring refused")
	}
	clear(revents[:len(fds)])
	for _, fd := range fds {
		if q.isArmed(fd) {
			continue
		}
		slot := q.isArmedSlot(-1)
		if slot < 0 {
			return fmt.Errorf("io_uring queue: no poll slot for fd %d (armed: %v)", fd, q.armed)
		}
		if err := q.kr.r.Prep(OpPollAdd, int(fd), 0, 0, 0, unix.POLLIN, pollBit|uint64(uint32(fd))); err != nil {
			return err // not with Room's reserve
		}
		q.armed[slot] = fd
	}
	for {
		if err := q.enter(true); err != nil {
			q.failUnsubmitted(err)
			return err
		}
		if q.reapInline(fds, revents) {
			return nil
		}
	}
}

func (q *Queue) isArmed(fd int32) bool { return q.isArmedSlot(fd) >= 0 }

func (q *Queue) isArmedSlot(fd int32) int {
	for i, a := range q.armed {
		if a == fd {
			return i
		}
	}
	return -1
}

func (q *Queue) disarm(fd int32) {
	if i := q.isArmedSlot(fd); i >= 0 {
		q.armed[i] = -1
	}
}

// reapInline completes the requests whose completions are in the ring
// and records the polls that fired in revents (by fds' order). It
// reports whether one of fds fired.
func (q *Queue) reapInline(fds []int32, revents []int16) bool {
	res, _ := q.kr.wait(q.results[:0], false)
	q.results = res
	if len(res) == 0 {
		return false
	}
	fired := false
	q.inflight.Load() // see reap
	for _, d := range res {
		if d.ud&pollBit == 0 {
			continue
		}
		fd := int32(uint32(d.ud))
		q.disarm(fd)
		ev := int16(unix.POLLERR)
		if d.err == nil {
			ev = int16(d.n)
		}
		for i, f := range fds {
			if f == fd {
				revents[i] |= ev
				fired = true
			}
		}
	}
	q.deliver(res)
	return fired
}

// deliver completes the requests among res (not the polls or the
// reaper's wake-up) and hands them to Done in one batch.
func (q *Queue) deliver(res []result) {
	q.batch = q.batch[:0]
	n := 0
	for _, d := range res {
		if d.ud == stopTag || d.ud&pollBit != 0 {
			continue
		}
		n++
		if c, ok := q.complete(d); ok {
			q.batch = append(q.batch, c)
		}
	}
	if len(q.batch) > 0 {
		q.opts.Done(q.batch)
	}
	q.inflight.Add(-int64(n))
}

// Close waits until every started request has completed, then releases
// the queue.
func (q *Queue) Close() error {
	if q.inline {
		// Settled by the submitter (a ring of one issuer cannot be
		// waited in from another thread); the kernel cancels the polls.
		if q.inflight.Load() > 0 {
			q.Settle()
		}
		q.ring.close()
		return nil
	}
	if !q.reaping {
		q.reaping = true
		go q.reap()
	}
	q.closing.Store(true)
	if !q.broken {
		// Wakes the reaper if it waits with nothing in flight (Room keeps
		// a slot for this). A broken ring must not be entered again: it
		// would run entries already failed. Its waits fail too, and the
		// reaper polls.
		if q.ring.prep(nil, stopTag) == nil {
			_ = q.ring.submit()
		}
	}
	<-q.exited
	q.ring.close()
	return nil
}

// reap collects completions until Close has begun and nothing is in
// flight.
func (q *Queue) reap() {
	defer close(q.exited)
	for {
		if q.closing.Load() && q.inflight.Load() == 0 {
			return
		}
		res, err := q.ring.wait(q.results[:0], true)
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		// The kernel orders the submitter's writes (requests, buffers)
		// before their completions; this acquire, pairing with the
		// submitter's Add, shows the race detector the same order.
		q.inflight.Load()
		q.results = res
		q.deliver(res)
	}
}

// complete records one submission's outcome; when it was its request's
// last, it finishes the request and returns its completion.
func (q *Queue) complete(d result) (blockdev.Completion, bool) {
	tag := uint16(d.ud)
	r := &q.reqs[tag]
	if d.ud&nopBit != 0 {
		r.pending.Store(0)
		err := r.err
		r.err = nil
		return blockdev.Completion{Tag: tag, Err: err}, true
	}
	g := &r.subs[d.ud>>16&0xffff]
	g.err = q.finishSub(g, d)
	if r.pending.Add(-1) != 0 {
		return blockdev.Completion{}, false
	}
	return blockdev.Completion{Tag: tag, Err: q.finish(tag, r)}, true
}

// finishSub turns a submission's result into its outcome, doing the rest
// of a short transfer (or all of an interrupted one) synchronously.
func (q *Queue) finishSub(g *sub, d result) error {
	done := d.n
	if d.err != nil {
		if d.err != unix.EINTR && d.err != unix.EAGAIN {
			if errno, ok := d.err.(unix.Errno); ok {
				return fmt.Errorf("io_uring %s: %w", opNames[g.op], errno)
			}
			return d.err
		}
		done = 0
	}
	if g.op == OpFsync {
		if d.err == nil {
			return nil
		}
		return q.opts.Sync(OpFsync, nil, 0)
	}
	if done >= g.size {
		return nil
	}
	c := vio.NewCursor(g.bufs)
	c.Skip(int64(done))
	return q.opts.Sync(g.op, c.Rest(), g.off+int64(done))
}

// finish ends a request whose submissions all completed: its first error,
// through opts.Finish.
func (q *Queue) finish(tag uint16, r *request) error {
	var err error
	for i := range r.n {
		if err == nil {
			err = r.subs[i].err
		}
	}
	r.release()
	if q.opts.Finish != nil {
		return q.opts.Finish(tag, err)
	}
	return err
}

// release drops the request's references to its buffers (guest memory).
func (r *request) release() {
	for i := range r.n {
		clear(r.subs[i].bufs)
		r.subs[i].bufs = r.subs[i].bufs[:0]
	}
}

var opNames = map[uint8]string{OpReadv: "readv", OpWritev: "writev", OpFsync: "fsync"}

// kernelRing is an io_uring on one file.
type kernelRing struct {
	r    *Ring
	fd   int
	cqes []CQE // reaper's
}

func (k *kernelRing) free() int { return int(k.r.Free()) }

func (k *kernelRing) prep(s *sub, ud uint64) error {
	switch {
	case s == nil:
		return k.r.Prep(OpNop, -1, 0, 0, 0, 0, ud)
	case s.op == OpFsync:
		return k.r.Prep(OpFsync, k.fd, 0, 0, 0, FsyncDatasync, ud)
	}
	s.iov = s.iov[:0]
	for _, b := range s.bufs {
		s.iov = append(s.iov, unix.Iovec{Base: &b[0], Len: uint64(len(b))})
	}
	return k.r.Prep(s.op, k.fd, uintptr(unsafe.Pointer(&s.iov[0])), uint32(len(s.iov)), uint64(s.off), 0, ud)
}

func (k *kernelRing) submit() error                  { return k.r.Submit() }
func (k *kernelRing) unsubmitted(fn func(ud uint64)) { k.r.Unsubmitted(fn) }
func (k *kernelRing) close()                         { k.r.Close() }

func (k *kernelRing) wait(dst []result, block bool) ([]result, error) {
	if block {
		if err := k.r.WaitCQE(); err != nil {
			return dst, err
		}
	}
	k.cqes = k.r.Reap(k.cqes[:0])
	for _, c := range k.cqes {
		d := result{ud: c.UserData, n: int(c.Res)}
		if c.Res < 0 {
			d.n, d.err = 0, unix.Errno(-c.Res)
		}
		dst = append(dst, d)
	}
	return dst, nil
}

// syncRing runs submissions through Sync on the reaper goroutine.
type syncRing struct {
	entries int
	do      func(op uint8, bufs [][]byte, off int64) error
	prepped []syncOp // submitter's
	mu      sync.Mutex
	cond    *sync.Cond
	queue   []syncOp
}

type syncOp struct {
	s  *sub // nil for a NOP
	ud uint64
}

func newSyncRing(entries int, do func(uint8, [][]byte, int64) error) *syncRing {
	r := &syncRing{entries: entries, do: do}
	r.cond = sync.NewCond(&r.mu)
	return r
}

func (r *syncRing) free() int { return r.entries - len(r.prepped) }

func (r *syncRing) prep(s *sub, ud uint64) error {
	if len(r.prepped) >= r.entries {
		return ErrRingFull
	}
	r.prepped = append(r.prepped, syncOp{s, ud})
	return nil
}

func (r *syncRing) submit() error {
	r.mu.Lock()
	r.queue = append(r.queue, r.prepped...)
	r.mu.Unlock()
	r.prepped = r.prepped[:0]
	r.cond.Signal()
	return nil
}

func (r *syncRing) unsubmitted(func(uint64)) {}
func (r *syncRing) close()                   {}

func (r *syncRing) wait(dst []result, _ bool) ([]result, error) {
	r.mu.Lock()
	for len(r.queue) == 0 {
		r.cond.Wait()
	}
	ops := r.queue
	r.queue = nil
	r.mu.Unlock()
	for _, o := range ops {
		d := result{ud: o.ud}
		if s := o.s; s != nil {
			if d.err = r.do(s.op, s.bufs, s.off); d.err == nil {
				d.n = s.size
			}
		}
		dst = append(dst, d)
	}
	return dst, nil
}

// errNoSync is Sync's default: a queue on a kernel ring that cannot
// finish a short transfer fails it.
var errNoSync = errors.New("io_uring: short transfer and no synchronous path")
