// Package blk implements a virtio-blk device: request parsing and
// validation, status codes, config space, and dispatch to a Storage.
//
// A Device (New) serves the queues a vhost-user server starts on it; each
// queue has a virtio.Runner that pops descriptor chains and a pool of
// workers that execute them against the Storage, many in flight at once.
// Requests follow QEMU's block/export/virtio-blk-handler.c:
//
//   - header: the first 16 readable bytes; status: the last writable byte;
//     data: the readable bytes after the header (OUT, DISCARD,
//     WRITE_ZEROES) or the writable bytes before the status (IN, GET_ID),
//     laid out over descriptors in any way.
//   - UNSUPP: unknown types (and GET_LIFETIME, SECURE_ERASE), more than one
//     discard/write-zeroes segment, reserved segment flags, the unmap flag
//     on DISCARD.
//   - IOERR: lengths not a multiple of 512, a start not aligned to the
//     logical block, ranges beyond the capacity, more than 2 GiB in one
//     read/write or more than the advertised sectors in one discard/write
//     zeroes segment, writes to a read-only device, storage errors, and
//     malformed chains (written to their last writable byte, if any).
//   - The used length is the number of bytes written: data plus status.
package blk

// Storage is what a virtio-blk device reads and writes. The device checks
// every request before it reaches Storage: offsets and lengths are multiples
// of 512 bytes and lie inside Size(). Implementations must be safe for
// concurrent use: requests from several queues and many in flight per queue
// arrive at once.
//
// The buffers passed to ReadAt and WriteAt are guest memory (mapped outside
// the Go heap, shared with the guest, which may change it concurrently);
// they must not be retained after the call returns. An error makes the
// request fail with VIRTIO_BLK_S_IOERR.
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
