package rawdisk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/uring"
)

var _ blockdev.AsyncStorage = (*Disk)(nil)

// errSyncPath tells the device to serve a request synchronously.
var errSyncPath = errors.New("rawdisk: request not suited to io_uring")

// stopTag marks the NOP that tells the reaper to finish; request tags are
// 16 bits.
const stopTag = 1 << 32

// probeUring reports whether this process may use io_uring.
func probeUring() error { return uring.Probe() }

// OpenQueue implements blockdev.AsyncStorage with one io_uring per queue: the
// caller's goroutine fills and submits it, a reaper goroutine collects
// completions and hands them to done in batches.
func (d *Disk) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	if d.uringErr != nil {
		return nil, fmt.Errorf("rawdisk: io_uring unavailable (%w): %w", d.uringErr, errors.ErrUnsupported)
	}
	if depth < 1 || depth > 1<<16 {
		return nil, fmt.Errorf("rawdisk: queue depth %d: want 1 to 65536", depth)
	}
	// One extra entry for the stop NOP.
	ring, err := uring.New(uint32(depth + 1))
	if err != nil {
		return nil, fmt.Errorf("rawdisk: %w", err)
	}
	q := &uringQueue{
		d:      d,
		ring:   ring,
		done:   done,
		slots:  make([]uringSlot, depth),
		cqes:   make([]uring.CQE, 0, depth+1),
		batch:  make([]blockdev.Completion, 0, depth+1),
		exited: make(chan struct{}),
	}
	go q.reap()
	return q, nil
}

// uringQueue is one virtqueue's io_uring.
type uringQueue struct {
	d    *Disk
	ring *uring.Ring
	done func([]blockdev.Completion)

	// Submission side (the caller's goroutine).
	slots  []uringSlot
	broken bool // submission failed: no more requests taken

	// inflight counts requests prepared and not yet reaped; the reaper
	// exits once it is zero after Close began.
	inflight atomic.Int64
	closing  atomic.Bool

	// Reaper goroutine.
	cqes   []uring.CQE
	batch  []blockdev.Completion
	exited chan struct{}
}

// uringSlot is the state of one tag's request, reused.
type uringSlot struct {
	op   uint8
	iov  []unix.Iovec // read by the kernel until completion
	bufs [][]byte     // for finishing a short transfer synchronously
	off  int64
	size int
	err  error // outcome of a write done inline (op is OpNop)
}

func (q *uringQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	return q.rw(uring.OpReadv, tag, bufs, off)
}

// WriteAt writes through io_uring with O_DIRECT. Buffered writes are done
// on the caller's goroutine and complete through a NOP: ext4 has no
// non-blocking buffered writes, so io_uring hands each to a kernel worker
// thread, which measured several times the CPU of the write itself (the
// thin pool's data path does the same, see thin.AsyncQueue.WriteAt).
func (q *uringQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	if q.d.readOnly {
		return ErrReadOnly
	}
	if q.d.direct {
		return q.rw(uring.OpWritev, tag, bufs, off)
	}
	if q.broken || int(tag) >= len(q.slots) {
		return errSyncPath
	}
	s := &q.slots[tag]
	s.op, s.bufs, s.size, s.err = uring.OpNop, nil, 0, q.d.WriteAt(bufs, off)
	return q.prep(uring.OpNop, 0, 0, 0, 0, tag)
}

func (q *uringQueue) rw(op uint8, tag uint16, bufs [][]byte, off int64) error {
	if q.broken || int(tag) >= len(q.slots) {
		return errSyncPath
	}
	s := &q.slots[tag]
	s.iov = s.iov[:0]
	size := 0
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		s.iov = append(s.iov, unix.Iovec{Base: &b[0], Len: uint64(len(b))})
		size += len(b)
	}
	if len(s.iov) == 0 || len(s.iov) > 1024 { // IOV_MAX
		return errSyncPath
	}
	s.op, s.bufs, s.off, s.size = op, bufs, off, size
	addr := uintptr(unsafe.Pointer(&s.iov[0]))
	return q.prep(op, addr, uint32(len(s.iov)), uint64(off), 0, tag)
}

func (q *uringQueue) Flush(tag uint16) error {
	if q.broken || int(tag) >= len(q.slots) || q.d.readOnly {
		return errSyncPath
	}
	s := &q.slots[tag]
	s.op, s.bufs, s.size = uring.OpFsync, nil, 0
	return q.prep(uring.OpFsync, 0, 0, 0, uring.FsyncDatasync, tag)
}

func (q *uringQueue) prep(op uint8, addr uintptr, length uint32, off uint64, flags uint32, tag uint16) error {
	q.inflight.Add(1)
	if err := q.ring.Prep(op, q.d.fd, addr, length, off, flags, uint64(tag)); err != nil {
		q.inflight.Add(-1)
		return errSyncPath
	}
	return nil
}

// Submit implements blockdev.AsyncQueue.
func (q *uringQueue) Submit() {
	if q.broken {
		return
	}
	if err := q.ring.Submit(); err != nil {
		// The kernel refuses the ring (it cannot do so for a valid
		// one). Fail what it did not take, and serve everything
		// synchronously from now on.
		q.broken = true
		q.failUnsubmitted(err)
	}
}

// failUnsubmitted completes the entries the kernel has not consumed with
// err. They stay published, but nothing submits them any more.
func (q *uringQueue) failUnsubmitted(err error) {
	var failed []blockdev.Completion
	q.ring.Unsubmitted(func(tag uint64) {
		if tag == stopTag {
			return
		}
		failed = append(failed, blockdev.Completion{Tag: uint16(tag), Err: fmt.Errorf("rawdisk: %w", err)})
		q.slots[uint16(tag)].bufs = nil
	})
	q.inflight.Add(-int64(len(failed)))
	if len(failed) > 0 {
		q.done(failed)
	}
}

// Close implements blockdev.AsyncQueue.
func (q *uringQueue) Close() error {
	q.closing.Store(true)
	if !q.broken {
		// Wakes the reaper if it waits with nothing in flight. If this
		// fails, so do the reaper's waits, and it polls instead.
		if q.ring.Prep(uring.OpNop, -1, 0, 0, 0, 0, stopTag) == nil {
			_ = q.ring.Submit()
		}
	}
	<-q.exited
	q.ring.Close()
	return nil
}

// reap collects completions until Close has begun and nothing is in
// flight.
func (q *uringQueue) reap() {
	defer close(q.exited)
	for {
		if q.closing.Load() && q.inflight.Load() == 0 {
			return
		}
		if err := q.ring.WaitCQE(); err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		q.cqes = q.ring.Reap(q.cqes[:0])
		// The kernel orders the submitter's writes (slots, the
		// caller's request state) before their completions; this
		// acquire, pairing with prep's Add, shows the race detector
		// the same order.
		q.inflight.Load()
		q.batch = q.batch[:0]
		for _, c := range q.cqes {
			if c.UserData == stopTag {
				continue
			}
			tag := uint16(c.UserData)
			q.batch = append(q.batch, blockdev.Completion{Tag: tag, Err: q.finish(&q.slots[tag], c.Res)})
		}
		if len(q.batch) > 0 {
			n := len(q.batch)
			q.done(q.batch)
			q.inflight.Add(-int64(n))
		}
	}
}

// finish turns a completion's result into the request's outcome, doing
// the rest of a short transfer synchronously.
func (q *uringQueue) finish(s *uringSlot, res int32) error {
	defer func() { s.bufs, s.err = nil, nil }()
	if s.op == uring.OpNop {
		return s.err
	}
	if res < 0 {
		errno := unix.Errno(-res)
		if errno != unix.EINTR && errno != unix.EAGAIN {
			return fmt.Errorf("rawdisk: io_uring op %d: %w", s.op, errno)
		}
		res = 0 // interrupted before any transfer: redo it all
		if s.op == uring.OpFsync {
			return q.d.Flush()
		}
	}
	if int(res) >= s.size {
		return nil
	}
	rest := skipBytes(s.bufs, int(res))
	off := s.off + int64(res)
	if s.op == uring.OpReadv {
		return q.d.ReadAt(rest, off)
	}
	return q.d.WriteAt(rest, off)
}

// skipBytes returns bufs without their first n bytes (a copy of the slice
// headers: only for the rare short transfer).
func skipBytes(bufs [][]byte, n int) [][]byte {
	out := make([][]byte, 0, len(bufs))
	for _, b := range bufs {
		if n >= len(b) {
			n -= len(b)
			continue
		}
		out = append(out, b[n:])
		n = 0
	}
	return out
}
