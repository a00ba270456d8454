package vhostuser

import (
	"github.com/thinblk/thinblk/internal/eventfd"
	"github.com/thinblk/thinblk/virtio"
)

// Device is the virtio device behind a vhost-user back-end. The queue
// methods (StartQueue, StopQueue, SetQueueCall) are called by one
// connection's goroutine at a time; during a live migration two front-ends
// are connected, and ReadConfig and WriteConfig may then be called
// concurrently.
type Device interface {
	// Features are the virtio device feature bits offered (including
	// VERSION_1, EVENT_IDX, INDIRECT_DESC); the server adds
	// PROTOCOL_FEATURES itself.
	Features() uint64
	// NumQueues is the number of queues offered (GET_QUEUE_NUM).
	NumQueues() int
	// MaxQueueSize is the largest ring accepted (SET_VRING_NUM).
	MaxQueueSize() int
	// ReadConfig copies the config space at offset into p.
	ReadConfig(p []byte, offset uint32)
	// WriteConfig writes p to config space at offset (SET_CONFIG).
	WriteConfig(p []byte, offset uint32) error
	// StartQueue starts serving a ring. The server has validated the
	// setup (sizes, addresses inside guest memory).
	StartQueue(q virtio.QueueSetup) error
	// StopQueue stops serving ring idx after the requests in flight have
	// completed and returns the available index to resume from.
	StopQueue(idx int) (lastAvail uint16, err error)
	// SetQueueCall makes running ring idx interrupt the driver through
	// call (nil: drop interrupts) from now on, without stopping it. When
	// it returns the device no longer writes the old call fd.
	SetQueueCall(idx int, call *eventfd.FD) error
	// SetConfigChangeNotifier hands the device a function that tells the
	// front-end its config space changed (e.g. capacity grew). nil
	// disables it (the front-end disconnected). The function may be
	// called from any goroutine except from inside a Device method the
	// server is running: QEMU answers by reading the config space over
	// the main connection, which waits for that method to return (the
	// call would then fail after a 5 s timeout). It returns an error when
	// the front-end did not acknowledge the change.
	SetConfigChangeNotifier(notify func() error)
}
