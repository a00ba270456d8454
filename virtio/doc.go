// Package virtio implements the device side of split virtqueues over guest
// memory shared by a front-end (vhost-user) and the transport-independent
// parts of a virtio device: the queue runner that waits for kicks, drains the
// available ring and signals the guest.
//
// It knows rings, descriptors and eventfds, but nothing about sockets or the
// vhost-user protocol; package vhostuser translates the front-end's addresses
// into host memory and hands a QueueSetup to a device.
//
// Everything read from guest memory is hostile input: every address and
// length is checked against the memory map, chains are capped at the queue
// size, and loops are detected.
package virtio

import "github.com/thinblk/thinblk/internal/eventfd"

// Memory gives access to guest memory by guest-physical address. Guest
// memory is mapped outside the Go heap, so the returned slices must never be
// retained after the memory map changes (vhost-user stops every queue before
// it changes the map).
type Memory interface {
	// Range returns the host bytes for guest-physical [addr, addr+size). It
	// fails when the range is not wholly inside one mapped region, or wraps.
	Range(addr, size uint64) ([]byte, error)
}

// QueueSetup is everything a device needs to serve one split virtqueue.
type QueueSetup struct {
	Index int    // queue index
	Size  uint16 // number of descriptors, a power of two
	// Desc, Avail and Used are the ring areas in host memory, already
	// translated and bounds-checked by the transport to cover the sizes
	// that Size implies (the event-index fields included only when
	// EVENT_IDX is negotiated). They must be aligned as the spec requires
	// (16, 2 and 4 bytes).
	Desc, Avail, Used []byte
	// LastAvail is where to resume consuming the available ring
	// (SET_VRING_BASE); the used index is read from the used ring.
	LastAvail uint16
	// Features are the negotiated virtio feature bits (EVENT_IDX,
	// INDIRECT_DESC, ...).
	Features uint64
	Mem      Memory
	// Kick becomes readable (eventfd) when the driver has made buffers
	// available. Call is written (eventfd) to interrupt the driver. Either
	// may be nil: a nil Kick means the queue is polled, a nil Call means
	// notifications are dropped. The device owns neither: the transport
	// closes them after StopQueue returns.
	Kick, Call *eventfd.FD
	// Inflight, if not nil, is a log of the requests in flight kept where
	// it survives the back-end (vhost-user INFLIGHT_SHMFD). The runner
	// resubmits the heads it names before consuming the available ring,
	// resumes the available ring after them (at the used index plus their
	// number: LastAvail is then ignored), and keeps the log up to date.
	Inflight InflightLog
	// Migrating, if not nil, reports at stop whether a live migration is
	// under way: requests must then complete rather than be withdrawn
	// into the in-flight log, which does not travel to the destination.
	Migrating func() bool
	// DirtyLog, if not nil, is told about every write into guest memory
	// (live migration); see DirtyLog.
	DirtyLog DirtyLog
}

// DirtyLog records which guest pages the device wrote, so that a live
// migration copies them again (vhost-user.rst, "Migration"). The queue
// reports, after writing them: the device-writable buffers of every chain
// it completes (a device writes nothing else of a chain), and every write
// to the used ring (elements, index, flags, avail_event). It is called from
// several goroutines at once.
type DirtyLog interface {
	// Logging reports whether writes are being logged now; it is asked on
	// every completion, so it must be cheap. Logging may start and stop
	// while the queue runs.
	Logging() bool
	// LogWrite marks guest-physical [addr, addr+size) as written.
	LogWrite(addr, size uint64)
	// LogUsed marks bytes [offset, offset+size) of the used ring as
	// written (the transport knows where the ring is in guest memory).
	LogUsed(offset, size uint64)
}

// InflightLog records which chains are in flight, so that a restarted
// back-end can finish them (vhost-user.rst, "Inflight I/O tracking"). The
// runner calls it from one goroutine at a time, and never between
// Pushing and Pushed of one head for another head.
type InflightLog interface {
	// Pending returns the heads that were in flight when the previous
	// back-end stopped, oldest first, after repairing a batch that was
	// published on the used ring (whose index is usedIdx now) but not yet
	// cleared from the log. An error means the log cannot be trusted.
	Pending(usedIdx uint16) ([]uint16, error)
	// Popped records head as taken from the available ring, before its
	// request starts.
	Popped(head uint16)
	// Pushing is called just before head is put on the used ring, Pushed
	// just after the used index that includes it was published.
	Pushing(head uint16)
	Pushed(head uint16, usedIdx uint16)
}

// Feature bits common to all virtio devices.
const (
	FeatureIndirectDesc = 28
	FeatureEventIdx     = 29
	FeatureVersion1     = 32
	// FeatureRingReset etc. are not offered.
)
