// Package blockdev is the contract between a block device and the storage
// behind it: what virtio/blk calls, and what rawdisk and thin implement.
// It holds only interfaces and small value types, so that every side can
// import it without importing another.
package blockdev

import "errors"

// SectorSize is the unit of every offset and length a device passes to
// Storage.
const SectorSize = 512

// Storage is what a block device reads and writes. The device checks
// every request before it reaches Storage: offsets and lengths are multiples
// of 512 bytes and lie inside Size(). Implementations must be safe for
// concurrent use: requests from several queues and many in flight per queue
// arrive at once.
//
// The buffers passed to ReadAt and WriteAt are guest memory (mapped outside
// the Go heap, shared with the guest, which may change it concurrently);
// they must not be retained after the call returns. An error makes the
// request fail (VIRTIO_BLK_S_IOERR for a virtio-blk device).
type Storage interface {
	// Size is the capacity in bytes, a multiple of 512. It may grow while
	// serving (the device then announces a config change).
	Size() uint64
	// ReadAt fills bufs, in order, from consecutive bytes starting at off.
	ReadAt(bufs [][]byte, off int64) error
	// WriteAt writes bufs, in order, to consecutive bytes starting at off.
	WriteAt(bufs [][]byte, off int64) error
	// Flush makes every write completed before it durable.
	Flush() error
	// Discard tells the storage that [off, off+length) is no longer needed.
	// Afterwards the range reads as zeros. Storage that cannot discard
	// returns an error wrapping errors.ErrUnsupported (the guest then sees
	// VIRTIO_BLK_S_UNSUPP); the same holds for WriteZeroes.
	Discard(off, length int64) error
	// WriteZeroes makes [off, off+length) read as zeros. With unmap the
	// storage may release the space; without it the space stays (or
	// becomes) allocated, so later writes there cannot fail for lack of
	// space.
	WriteZeroes(off, length int64, unmap bool) error
}

// WithdrawableStorage is Storage whose writes may wait without bound (a
// thin pool out of space). When a queue that has an in-flight log stops,
// its requests waiting that way are withdrawn instead of waited for: they
// give up having changed nothing, are not completed, stay recorded in the
// log, and run again when the queue starts (in this process or the next).
type WithdrawableStorage interface {
	Storage
	// WriteAtOrWithdraw is WriteAt; while it waits, closing withdraw makes
	// it return an error wrapping ErrWithdrawn with nothing written.
	WriteAtOrWithdraw(bufs [][]byte, off int64, withdraw <-chan struct{}) error
	// WriteZeroesOrWithdraw is WriteZeroes, withdrawn the same way.
	WriteZeroesOrWithdraw(off, length int64, unmap bool, withdraw <-chan struct{}) error
}

// ErrWithdrawn is what WithdrawableStorage returns (wrapped) for a
// withdrawn request.
var ErrWithdrawn = errors.New("virtio-blk: request withdrawn while waiting")

// Geometry describes storage limits that the device publishes in its config
// space. Storage may implement GeometryReporter; otherwise defaults apply.
type Geometry struct {
	LogicalBlockSize  uint32 // bytes, power of two >= 512 (default 512)
	PhysicalBlockSize uint32 // bytes (default LogicalBlockSize)
	OptimalIOSize     uint32 // bytes, 0 if unknown
	// DiscardGranularity is the unit (bytes) in which discard releases
	// space, e.g. a thin pool's block size.
	DiscardGranularity uint32
}

// GeometryReporter is implemented by storage that knows its geometry.
type GeometryReporter interface {
	Geometry() Geometry
}

// AsyncStorage is Storage that can also run reads, writes and flushes
// without a goroutine per request (io_uring, for instance). A device serves
// IN, OUT and FLUSH through an AsyncQueue per virtqueue when the storage
// offers one, and everything else (and everything when OpenQueue fails)
// through the synchronous calls.
type AsyncStorage interface {
	Storage
	// OpenQueue returns a queue for up to depth requests in flight,
	// tagged 0 to depth-1. done receives completions in batches, on a
	// goroutine of the storage's; the slice is reused once done returns.
	// done may call the queue's submitting methods only if it is the
	// queue's one submitter. An error (errors.ErrUnsupported when the
	// kernel lacks what the queue needs) means: use the synchronous path.
	OpenQueue(depth int, done func([]Completion)) (AsyncQueue, error)
}

// Completion is the outcome of one asynchronous request.
type Completion struct {
	Tag uint16
	Err error // nil, or why the request failed
}

// AsyncQueue starts requests asynchronously. Its methods are called from
// one goroutine at a time (a virtqueue's runner). The buffers are guest
// memory, as for Storage, and must stay untouched by the caller until
// their request completes; the storage must not use them afterwards.
//
// An error from ReadAt, WriteAt or Flush means the request was not
// started and will not complete through done: the caller serves it
// synchronously instead.
type AsyncQueue interface {
	// ReadAt starts reading consecutive bytes at off into bufs.
	ReadAt(tag uint16, bufs [][]byte, off int64) error
	// WriteAt starts writing bufs to consecutive bytes at off.
	WriteAt(tag uint16, bufs [][]byte, off int64) error
	// Flush starts making every write completed before the call
	// durable.
	Flush(tag uint16) error
	// Submit hands the requests started since the last Submit to the
	// storage; they may wait for it. Requests it cannot hand over are
	// completed with an error.
	Submit()
	// Close waits until every started request has completed, then
	// releases the queue. No other method may run during or after it.
	Close() error
}

// InlineQueue is an AsyncQueue that can do without a goroutine of its
// own: once Inline returns true, done runs on the caller's goroutine,
// inside Submit, Wait, Poll and Settle, and the caller sleeps in Wait,
// which watches its eventfds (a virtqueue's kick) and the queue's I/O at
// once. The caller's goroutine stays locked to its OS thread from its
// first Submit on, and calls Settle before Close while requests are in
// flight.
type InlineQueue interface {
	AsyncQueue
	// Inline switches the queue to this mode; false means it stays as
	// it was (a queue with no kernel ring behind it).
	Inline() bool
	// Wait blocks until one of fds is readable or failed (revents: each
	// one's poll events), completing requests meanwhile. After an error
	// the queue starts nothing more.
	Wait(fds []int32, revents []int16) error
	// Poll completes the requests that have finished, without blocking.
	Poll()
	// Settle completes every request in flight, waiting for them.
	Settle()
}
