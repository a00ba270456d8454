// Package nulldisk is storage that does no I/O: reads leave the guest's
// buffers as they are (as Linux's null_blk does), writes and flushes are
// dropped, and every request succeeds. Served through virtio/blk it shows
// what the vhost-user path and the driver can carry on a machine, with no
// disk and no storage engine in the way: `thinblk serve --null SIZE` and
// the benchmark's null target.
package nulldisk

import (
	"fmt"

	"github.com/thinblk/thinblk/internal/blockdev"
)

// Disk is a null disk of a fixed size.
type Disk struct{ size uint64 }

// New returns a null disk of size bytes (a positive multiple of 512).
func New(size uint64) (*Disk, error) {
	if size == 0 || size%blockdev.SectorSize != 0 {
		return nil, fmt.Errorf("null disk size %d: want a positive multiple of %d", size, blockdev.SectorSize)
	}
	return &Disk{size: size}, nil
}

var _ blockdev.AsyncStorage = (*Disk)(nil)

func (d *Disk) Size() uint64                                    { return d.size }
func (d *Disk) ReadAt(bufs [][]byte, off int64) error           { return nil }
func (d *Disk) WriteAt(bufs [][]byte, off int64) error          { return nil }
func (d *Disk) Flush() error                                    { return nil }
func (d *Disk) Discard(off, length int64) error                 { return nil }
func (d *Disk) WriteZeroes(off, length int64, unmap bool) error { return nil }

// OpenQueue returns a queue that completes, in Submit, every request
// started since the last Submit: on the submitter's goroutine, in the same
// pass over the ring, so that a request costs no hand-off at all.
func (d *Disk) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	if depth < 1 || depth > 1<<16 {
		return nil, fmt.Errorf("null disk queue depth %d: want 1 to 65536", depth)
	}
	return &queue{done: done, batch: make([]blockdev.Completion, 0, depth)}, nil
}

type queue struct {
	done  func([]blockdev.Completion)
	batch []blockdev.Completion
}

func (q *queue) start(tag uint16) error {
	if len(q.batch) == cap(q.batch) {
		// More than depth requests started: a caller bug, refused so
		// that the caller serves it synchronously.
		return fmt.Errorf("null disk queue full (%d requests)", cap(q.batch))
	}
	q.batch = append(q.batch, blockdev.Completion{Tag: tag})
	return nil
}

func (q *queue) ReadAt(tag uint16, bufs [][]byte, off int64) error  { return q.start(tag) }
func (q *queue) WriteAt(tag uint16, bufs [][]byte, off int64) error { return q.start(tag) }
func (q *queue) Flush(tag uint16) error                             { return q.start(tag) }

func (q *queue) Submit() {
	if len(q.batch) == 0 {
		return
	}
	b := q.batch
	q.batch = q.batch[:0]
	q.done(b)
}

func (q *queue) Close() error { return nil }
