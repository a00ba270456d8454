// Package blk implements a virtio-blk device: request parsing and
// validation, status codes, config space, and dispatch to a Storage (the
// contract in internal/blockdev, which rawdisk and thin implement).
//
// A Device (New) serves the queues a vhost-user server starts on it; each
// queue has a virtio.Runner that pops descriptor chains and a pool of
// workers that execute them against the Storage, many in flight at once.
// Storage that also implements AsyncStorage (rawdisk and thin volumes, on
// internal/uring's engine) gets
// reads, writes and flushes without workers: the runner starts every such
// request of a pass over the available ring and submits them as one batch,
// and the storage's completion goroutine puts them on the used ring,
// interrupting the driver once per batch.
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
