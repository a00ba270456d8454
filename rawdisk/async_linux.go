package rawdisk

import (
	"errors"
	"fmt"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/uring"
)

var _ blockdev.AsyncStorage = (*Disk)(nil)

// errSyncPath tells the device to serve a request synchronously.
var errSyncPath = errors.New("rawdisk: request not suited to io_uring")

// probeUring reports whether this process may use io_uring.
func probeUring() error { return uring.Probe() }

// OpenQueue implements blockdev.AsyncStorage with one io_uring per queue
// (uring.Queue): the caller's goroutine fills and submits it, a reaper
// goroutine collects completions and hands them to done in batches.
func (d *Disk) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	if d.uringErr != nil {
		return nil, fmt.Errorf("rawdisk: io_uring unavailable (%w): %w", d.uringErr, errors.ErrUnsupported)
	}
	q, err := uring.NewQueue(uring.QueueOptions{
		Depth: depth, Entries: depth + 1, Fd: d.fd,
		Sync:   d.syncOp,
		Finish: wrapErr,
		Done:   done,
	})
	if err != nil {
		return nil, fmt.Errorf("rawdisk: %w", err)
	}
	return &uringQueue{Queue: q, d: d}, nil
}

// syncOp finishes a short transfer (or an interrupted one) synchronously.
func (d *Disk) syncOp(op uint8, bufs [][]byte, off int64) error {
	switch op {
	case uring.OpReadv:
		return d.ReadAt(bufs, off)
	case uring.OpWritev:
		return d.WriteAt(bufs, off)
	}
	return d.Flush()
}

func wrapErr(_ uint16, err error) error {
	if err != nil {
		return fmt.Errorf("rawdisk: %w", err)
	}
	return nil
}

// uringQueue is one virtqueue's io_uring.
type uringQueue struct {
	*uring.Queue
	d *Disk
}

func (q *uringQueue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	return q.rw(uring.OpReadv, tag, bufs, off)
}

// WriteAt writes through io_uring with O_DIRECT. Buffered writes are done
// on the caller's goroutine and complete through a NOP: ext4 has no
// non-blocking buffered writes, so io_uring hands each to a kernel worker
// thread, which measured several times the CPU of the write itself (the
// thin pool's data path does the same, see thin's asyncQueue.WriteAt).
func (q *uringQueue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	if q.d.readOnly {
		return ErrReadOnly
	}
	if q.d.direct {
		return q.rw(uring.OpWritev, tag, bufs, off)
	}
	if !q.Begin(tag) || !q.Room(1, 0) {
		return errSyncPath
	}
	q.Complete(tag, q.d.WriteAt(bufs, off))
	return nil
}

func (q *uringQueue) rw(op uint8, tag uint16, bufs [][]byte, off int64) error {
	if !q.Begin(tag) {
		return errSyncPath
	}
	for _, b := range bufs {
		q.Add(op, off, b)
		off += int64(len(b))
	}
	if !q.Start() {
		return errSyncPath
	}
	return nil
}

func (q *uringQueue) Flush(tag uint16) error {
	if q.d.readOnly || !q.Begin(tag) {
		return errSyncPath
	}
	q.AddFdatasync()
	if !q.Start() {
		return errSyncPath
	}
	return nil
}
