package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/virtio"
)

// The in-flight area (INFLIGHT_SHMFD, vhost-user.rst "Inflight I/O
// tracking") is shared memory the back-end creates (GET_INFLIGHT_FD) and
// the front-end keeps across back-end restarts (SET_INFLIGHT_FD): one
// queue region per queue, each a QueueRegionSplit, recording which heads
// were taken from the available ring and not yet completed, so that a new
// back-end process can finish them.
//
//	QueueRegionSplit: features u64, version u16, desc_num u16,
//	                  last_batch_head u16, used_idx u16, desc[desc_num]
//	DescStateSplit:   inflight u8, padding [5]u8, next u16, counter u64
//
// Every field this back-end writes is written with an aligned 32- or 64-bit
// atomic store, in the order the spec gives: a process killed at any
// instant leaves the area in a state the next one can repair.
const (
	inflightVersion    = 1
	inflightHeaderSize = 16
	inflightDescSize   = 16
	// inflightAlign keeps every queue region (and so every 64-bit field)
	// aligned, and queue regions on separate cache lines.
	inflightAlign = 64
	// maxInflightArea bounds what SET_INFLIGHT_FD may ask us to map.
	maxInflightArea = 64 << 20
)

// Offsets inside a queue region and a descriptor state.
const (
	qrFeatures = 0
	qrVersion  = 8  // version u16, desc_num u16 in one 32-bit word
	qrBatch    = 12 // last_batch_head u16, used_idx u16 in one 32-bit word
	dsFlags    = 0  // inflight u8, padding, next u16 in one 64-bit word
	dsCounter  = 8
)

// inflightQueueSize is the size of one queue region for a ring of n
// descriptors.
func inflightQueueSize(n uint16) uint64 {
	size := uint64(inflightHeaderSize) + uint64(n)*inflightDescSize
	return (size + inflightAlign - 1) &^ (inflightAlign - 1)
}

// validateInflight checks an Inflight payload from the front-end against
// this session's limits: numQueues rings at most, maxSize descriptors per
// ring. For SET_INFLIGHT_FD (set) the area's size and offset are checked
// too.
func validateInflight(in Inflight, numQueues, maxSize int, set bool) error {
	switch {
	case in.NumQueues == 0 || int(in.NumQueues) > numQueues:
		return fmt.Errorf("%d queues (1..%d allowed)", in.NumQueues, numQueues)
	case in.QueueSize == 0 || in.QueueSize&(in.QueueSize-1) != 0 || int(in.QueueSize) > maxSize:
		return fmt.Errorf("queue size %d is not a power of two in 1..%d", in.QueueSize, maxSize)
	}
	if !set {
		return nil
	}
	need := uint64(in.NumQueues) * inflightQueueSize(in.QueueSize)
	switch {
	case in.MmapSize != need:
		return fmt.Errorf("area of %d bytes for %d queues of %d, want %d", in.MmapSize, in.NumQueues, in.QueueSize, need)
	case in.MmapOffset%uint64(os.Getpagesize()) != 0 || in.MmapOffset > maxInflightArea:
		return fmt.Errorf("area offset %#x is not a page multiple below %#x", in.MmapOffset, maxInflightArea)
	}
	return nil
}

// inflightArea is a mapped in-flight area.
type inflightArea struct {
	// desc and file describe the area as SET_INFLIGHT_FD would (file is
	// this process's own descriptor), for a hand-over to the next process.
	desc      Inflight
	file      *os.File
	mapping   []byte
	queueSize uint16
	queues    []*inflightRing
}

func newInflightArea(mapping []byte, numQueues int, queueSize uint16) *inflightArea {
	a := &inflightArea{mapping: mapping, queueSize: queueSize, queues: make([]*inflightRing, numQueues)}
	step := inflightQueueSize(queueSize)
	for i := range a.queues {
		a.queues[i] = &inflightRing{region: mapping[uint64(i)*step : uint64(i+1)*step : uint64(i+1)*step], size: queueSize}
	}
	return a
}

func (a *inflightArea) unmap() {
	if a != nil && a.mapping != nil {
		unix.Munmap(a.mapping)
		a.mapping, a.queues = nil, nil
	}
	if a != nil && a.file != nil {
		a.file.Close()
		a.file = nil
	}
}

// createInflightArea makes a zeroed area in a new memfd, sealed so that
// its size can never change (neither process can then fault on it), and
// maps it.
func createInflightArea(numQueues int, queueSize uint16) (*inflightArea, *os.File, error) {
	size := uint64(numQueues) * inflightQueueSize(queueSize)
	fd, err := unix.MemfdCreate("thinblk-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, nil, fmt.Errorf("memfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "thinblk-inflight")
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("size the area: %w", err)
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("seal the area: %w", err)
	}
	m, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("map the area: %w", err)
	}
	a := newInflightArea(m, numQueues, queueSize)
	for _, q := range a.queues {
		q.init()
	}
	a.desc = Inflight{MmapSize: size, NumQueues: uint16(numQueues), QueueSize: queueSize}
	if a.file, err = dupFile(f); err != nil {
		a.unmap()
		f.Close()
		return nil, nil, fmt.Errorf("dup the area: %w", err)
	}
	return a, f, nil
}

// mapInflightArea maps the area the front-end handed back. The file must
// be sealed against shrinking and cover the area (as the ones
// createInflightArea makes are): touching a shared mapping past the end of
// its file would kill the process with SIGBUS, and a front-end could
// otherwise truncate the file under a running ring.
func mapInflightArea(in Inflight, f *os.File) (*inflightArea, error) {
	if f == nil {
		return nil, errors.New("no file descriptor")
	}
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("file seals: %w", err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return nil, errors.New("the area's file is not sealed against shrinking")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat: %w", err)
	}
	if uint64(st.Size) < in.MmapOffset+in.MmapSize {
		return nil, fmt.Errorf("area [%#x,+%#x) exceeds the file's %d bytes", in.MmapOffset, in.MmapSize, st.Size)
	}
	dup, err := dupFile(f)
	if err != nil {
		return nil, fmt.Errorf("dup the area: %w", err)
	}
	m, err := unix.Mmap(int(f.Fd()), int64(in.MmapOffset), int(in.MmapSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		dup.Close()
		return nil, fmt.Errorf("map the area: %w", err)
	}
	a := newInflightArea(m, int(in.NumQueues), in.QueueSize)
	a.desc, a.file = in, dup
	return a, nil
}

// inflightRing is one ring's queue region. It implements
// virtio.InflightLog; the runner calls it under its completion lock (one
// caller at a time), and Pending only before it serves.
type inflightRing struct {
	region []byte // the queue region, 64-byte aligned
	size   uint16 // desc_num this back-end lays out

	counter  uint64 // next submission counter
	batch    uint16 // last_batch_head as written
	usedIdx  uint16 // used_idx as written
	resubmit []uint16
}

var _ virtio.InflightLog = (*inflightRing)(nil)

func (q *inflightRing) word32(off int) *uint32 {
	return (*uint32)(unsafe.Pointer(&q.region[off]))
}

func (q *inflightRing) word64(off int) *uint64 {
	return (*uint64)(unsafe.Pointer(&q.region[off]))
}

func (q *inflightRing) desc(head uint16) int {
	return inflightHeaderSize + int(head)*inflightDescSize
}

// init lays out an empty queue region.
func (q *inflightRing) init() {
	clear(q.region)
	atomic.StoreUint32(q.word32(qrVersion), inflightVersion|uint32(q.size)<<16)
}

// check validates the region's header for a ring of n descriptors and
// lays out a region the front-end never had initialized (version 0).
func (q *inflightRing) check(n uint16) error {
	if n != q.size {
		return fmt.Errorf("in-flight region for %d descriptors, ring has %d", q.size, n)
	}
	w := atomic.LoadUint32(q.word32(qrVersion))
	version, descNum := uint16(w), uint16(w>>16)
	switch {
	case version == 0:
		q.init()
	case version != inflightVersion:
		return fmt.Errorf("in-flight region version %d, want %d", version, inflightVersion)
	case descNum != n:
		return fmt.Errorf("in-flight region holds %d descriptors, ring has %d", descNum, n)
	case binary.LittleEndian.Uint64(q.region[qrFeatures:]) != 0:
		return fmt.Errorf("in-flight region features %#x unknown", binary.LittleEndian.Uint64(q.region[qrFeatures:]))
	}
	return nil
}

// Pending implements virtio.InflightLog: it repairs a batch that was
// published on the used ring (whose index is usedIdx) but not yet cleared
// from the region, and returns the heads still in flight, oldest first.
func (q *inflightRing) Pending(usedIdx uint16) ([]uint16, error) {
	w := atomic.LoadUint32(q.word32(qrBatch))
	q.batch, q.usedIdx = uint16(w), uint16(w>>16)
	if usedIdx != q.usedIdx {
		// The used index moved by the batch's size; the batch is the list
		// that starts at last_batch_head.
		count := usedIdx - q.usedIdx
		if count > q.size {
			// Not a batch of this ring: a region left over from before a
			// reset. Only an empty one can be reused.
			if q.anyInflight() {
				return nil, fmt.Errorf("in-flight region: used index %d, ring's %d, %d heads apart with requests in flight", q.usedIdx, usedIdx, count)
			}
		} else {
			head := q.batch
			for range count {
				if head >= q.size {
					return nil, fmt.Errorf("in-flight region: batch list names head %d of %d", head, q.size)
				}
				p := q.word64(q.desc(head) + dsFlags)
				flags := atomic.LoadUint64(p)
				atomic.StoreUint64(p, flags&^0xff)
				head = uint16(flags >> 48)
			}
		}
		q.usedIdx = usedIdx
		atomic.StoreUint32(q.word32(qrBatch), uint32(q.batch)|uint32(usedIdx)<<16)
	}
	q.resubmit = q.resubmit[:0]
	var maxCounter uint64
	for head := range q.size {
		off := q.desc(head)
		c := atomic.LoadUint64(q.word64(off + dsCounter))
		maxCounter = max(maxCounter, c)
		switch q.region[off] {
		case 0:
		case 1:
			q.resubmit = append(q.resubmit, head)
		default:
			return nil, fmt.Errorf("in-flight region: head %d has in-flight flag %d", head, q.region[off])
		}
	}
	slices.SortFunc(q.resubmit, func(a, b uint16) int {
		ca := atomic.LoadUint64(q.word64(q.desc(a) + dsCounter))
		cb := atomic.LoadUint64(q.word64(q.desc(b) + dsCounter))
		switch {
		case ca < cb:
			return -1
		case ca > cb:
			return 1
		}
		return int(a) - int(b)
	})
	q.counter = maxCounter + 1
	return q.resubmit, nil
}

func (q *inflightRing) anyInflight() bool {
	for head := range q.size {
		if q.region[q.desc(head)] != 0 {
			return true
		}
	}
	return false
}

// Popped implements virtio.InflightLog: the counter first, then the flag,
// so that a head marked in flight always has its place in the order.
func (q *inflightRing) Popped(head uint16) {
	off := q.desc(head)
	atomic.StoreUint64(q.word64(off+dsCounter), q.counter)
	q.counter++
	atomic.StoreUint64(q.word64(off+dsFlags), 1)
}

// Pushing implements virtio.InflightLog: head joins the batch (a batch of
// one: the runner publishes each completion on its own).
func (q *inflightRing) Pushing(head uint16) {
	atomic.StoreUint64(q.word64(q.desc(head)+dsFlags), 1|uint64(q.batch)<<48)
	q.batch = head
	atomic.StoreUint32(q.word32(qrBatch), uint32(head)|uint32(q.usedIdx)<<16)
}

// Pushed implements virtio.InflightLog: the used index that includes head
// is published; clear its flag, then record the index.
func (q *inflightRing) Pushed(head uint16, usedIdx uint16) {
	p := q.word64(q.desc(head) + dsFlags)
	atomic.StoreUint64(p, atomic.LoadUint64(p)&^0xff)
	q.usedIdx = usedIdx
	atomic.StoreUint32(q.word32(qrBatch), uint32(q.batch)|uint32(usedIdx)<<16)
}
