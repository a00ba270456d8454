package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
)

var le = binary.LittleEndian

// ErrNeedsReset means the driver broke the ring in a way that leaves no
// chain to complete (a head index out of range, the available index
// jumping by more than the queue size, a head handed out twice). The queue
// stops consuming; the device should be reset by the driver.
var ErrNeedsReset = errors.New("virtqueue needs reset")

// ErrBadChain wraps every reason a descriptor chain is rejected. Such a
// chain still has a valid head and is completed with an error status.
var ErrBadChain = errors.New("malformed descriptor chain")

// Chain is one descriptor chain taken from the available ring, with its
// buffers translated to host memory. A Chain is reused: Pop overwrites it,
// keeping the capacity of its segment list, so a steady state allocates
// nothing.
type Chain struct {
	Head uint16
	// Readable are the device-readable buffers in chain order, Writable the
	// device-writable ones (which all follow the readable ones). Zero-length
	// descriptors are left out. The slices point into guest memory and are
	// valid only while the memory map stays as it is.
	Readable, Writable [][]byte
	// ReadLen and WriteLen are the total lengths of Readable and Writable.
	ReadLen, WriteLen uint64
	// Err is non-nil (wrapping ErrBadChain) when the chain is malformed.
	// Readable and Writable then hold the buffers found before the fault;
	// the device must still complete Head, with an error.
	Err error

	segs  [][]byte
	addrs []uint64 // guest-physical address of each of segs, for dirty logging
	nRead int
}

func (c *Chain) reset(head uint16) {
	c.Head = head
	c.Readable, c.Writable = nil, nil
	c.ReadLen, c.WriteLen = 0, 0
	c.Err = nil
	clear(c.segs)
	c.segs = c.segs[:0]
	c.addrs = c.addrs[:0]
	c.nRead = 0
}

func (c *Chain) finish() {
	c.Readable = c.segs[:c.nRead:c.nRead]
	c.Writable = c.segs[c.nRead:]
}

// logWritable reports the chain's device-writable buffers to log.
func (c *Chain) logWritable(log DirtyLog) {
	for i := c.nRead; i < len(c.segs); i++ {
		log.LogWrite(c.addrs[i], uint64(len(c.segs[i])))
	}
}

func badChain(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadChain, fmt.Sprintf(format, args...))
}

// Queue is the device side of a split virtqueue.
//
// It has two sides that may run on different goroutines: the consumer
// (Pop, EnableNotify, DisableNotify, HasAvail, LastAvail) and the producer
// (Push, NeedsNotify, UsedIdx). Each side must be used by one goroutine at a
// time; the two sides share no mutable state.
//
// The state that survives a back-end restart is LastAvail, the used index
// (in guest memory) and the set of heads popped but not yet pushed; a
// shared-memory in-flight log (vhost-user INFLIGHT_SHMFD) would record heads
// at Pop and clear them at Push.
type Queue struct {
	size        uint16
	mask        uint16
	maxIndirect uint32
	desc        []byte
	avail       []byte
	used        []byte
	mem         Memory
	eventIdx    bool
	indirect    bool
	dirty       DirtyLog // nil: the transport never logs

	// consumer side
	lastAvail   uint16
	availShadow uint16 // last avail idx read from the ring
	broken      error

	// producer side
	usedIdx        uint16
	signalledUsed  uint16
	signalledValid bool
}

// Ring field offsets.
const (
	ringFlags = 0
	ringIdx   = 2
	ringStart = 4
)

// NewQueue checks a queue's setup and returns a queue ready to consume from
// s.LastAvail. Indirect tables may hold up to s.Size descriptors; see
// SetMaxIndirect.
func NewQueue(s QueueSetup) (*Queue, error) {
	n := s.Size
	if n == 0 || n&(n-1) != 0 || n > MaxQueueSize {
		return nil, fmt.Errorf("queue %d: size %d is not a power of two up to %d", s.Index, n, MaxQueueSize)
	}
	if s.Mem == nil {
		return nil, fmt.Errorf("queue %d: no guest memory", s.Index)
	}
	eventIdx := s.Features&(1<<FeatureEventIdx) != 0
	descSize, availSize, usedSize := DescTableSize(n), AvailRingSize(n), UsedRingSize(n)
	if !eventIdx {
		// used_event and avail_event exist only with EVENT_IDX.
		availSize -= 2
		usedSize -= 2
	}
	if uint64(len(s.Desc)) < descSize || uint64(len(s.Avail)) < availSize || uint64(len(s.Used)) < usedSize {
		return nil, fmt.Errorf("queue %d: ring areas too small for %d entries", s.Index, n)
	}
	// The spec's alignments (16, 2, 4); the atomics rely on the last two.
	if !aligned(s.Desc, 16) || !aligned(s.Avail, 2) || !aligned(s.Used, 4) {
		return nil, fmt.Errorf("queue %d: ring areas misaligned", s.Index)
	}
	q := &Queue{
		size:        n,
		mask:        n - 1,
		maxIndirect: uint32(n),
		desc:        s.Desc[:descSize:descSize],
		avail:       s.Avail[:availSize:availSize],
		used:        s.Used[:usedSize:usedSize],
		mem:         s.Mem,
		eventIdx:    eventIdx,
		indirect:    s.Features&(1<<FeatureIndirectDesc) != 0,
		dirty:       s.DirtyLog,
		lastAvail:   s.LastAvail,
		availShadow: s.LastAvail,
	}
	q.usedIdx = Load16(q.used[ringIdx:])
	q.signalledUsed = q.usedIdx
	return q, nil
}

// SetMaxIndirect sets how many descriptors an indirect table may hold (at
// least the queue size). A device that advertises a segment limit larger
// than the ring (virtio-blk's seg_max is read before the ring size is
// known) raises it so that drivers honouring that limit are served.
func (q *Queue) SetMaxIndirect(n int) {
	q.maxIndirect = uint32(max(n, int(q.size)))
}

// Size is the number of entries of the ring.
func (q *Queue) Size() uint16 { return q.size }

// LastAvail is the index of the next available entry to consume: the value
// GET_VRING_BASE reports once all popped chains are pushed.
func (q *Queue) LastAvail() uint16 { return q.lastAvail }

// resume makes the consumer continue at avail index idx.
func (q *Queue) resume(idx uint16) {
	q.lastAvail, q.availShadow = idx, idx
}

// UsedIdx is the next used index the device will publish.
func (q *Queue) UsedIdx() uint16 { return q.usedIdx }

// Broken returns the error that stopped the queue, if any (it wraps
// ErrNeedsReset).
func (q *Queue) Broken() error { return q.broken }

// HasAvail reports whether the driver has made chains available that Pop
// has not taken yet.
func (q *Queue) HasAvail() bool {
	if q.availShadow != q.lastAvail {
		return true
	}
	q.availShadow = Load16(q.avail[ringIdx:])
	return q.availShadow != q.lastAvail
}

func (q *Queue) fail(err error) error {
	q.broken = fmt.Errorf("%w: %w", ErrNeedsReset, err)
	return q.broken
}

// Pop takes the next available chain into c. It returns false when the
// ring is empty. A malformed chain is returned with c.Err set; an error
// (wrapping ErrNeedsReset) means the ring itself is unusable and the queue
// is stopped.
func (q *Queue) Pop(c *Chain) (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	if q.availShadow == q.lastAvail {
		// The atomic load orders the reads of ring entries and
		// descriptors below after the driver's writes.
		q.availShadow = Load16(q.avail[ringIdx:])
		if q.availShadow == q.lastAvail {
			return false, nil
		}
	}
	if pending := q.availShadow - q.lastAvail; pending > q.size {
		return false, q.fail(fmt.Errorf("avail idx %d is %d ahead of %d, queue size %d", q.availShadow, pending, q.lastAvail, q.size))
	}
	slot := int(q.lastAvail&q.mask) * 2
	head := le.Uint16(q.avail[ringStart+slot:])
	if head >= q.size {
		return false, q.fail(fmt.Errorf("avail ring entry %d: head %d out of range", q.lastAvail, head))
	}
	q.lastAvail++
	c.reset(head)
	c.Err = q.walk(c, head)
	c.finish()
	return true, nil
}

// ReadChain reads the chain at head into c without taking anything from
// the available ring: for resubmitting requests that were in flight when a
// previous back-end stopped (the vhost-user INFLIGHT_SHMFD log names their
// heads). A malformed chain is reported in c.Err, as by Pop.
func (q *Queue) ReadChain(head uint16, c *Chain) error {
	if head >= q.size {
		return fmt.Errorf("head %d out of range %d", head, q.size)
	}
	c.reset(head)
	c.Err = q.walk(c, head)
	c.finish()
	return nil
}

// walk follows the chain starting at head, collecting its buffers.
func (q *Queue) walk(c *Chain, head uint16) error {
	table := q.desc
	n := uint32(q.size)
	idx := uint32(head)
	inIndirect, sawWrite := false, false
	// Every descriptor is read once into locals: the driver may rewrite the
	// table while we look at it.
	for steps := uint32(0); ; {
		if idx >= n {
			return badChain("descriptor index %d out of range %d", idx, n)
		}
		steps++
		if steps > n {
			return badChain("chain longer than its table (%d): loop", n)
		}
		d := table[idx*DescSize : idx*DescSize+DescSize]
		addr := le.Uint64(d[0:])
		length := le.Uint32(d[8:])
		flags := le.Uint16(d[12:])
		next := le.Uint16(d[14:])

		if flags&DescFlagIndirect != 0 {
			switch {
			case !q.indirect:
				return badChain("indirect descriptor without INDIRECT_DESC")
			case inIndirect:
				return badChain("nested indirect descriptor")
			case flags&DescFlagNext != 0:
				return badChain("indirect descriptor with NEXT")
			case length == 0 || length%DescSize != 0:
				return badChain("indirect table length %d", length)
			case length/DescSize > q.maxIndirect:
				return badChain("indirect table of %d descriptors exceeds %d", length/DescSize, q.maxIndirect)
			}
			t, err := q.mem.Range(addr, uint64(length))
			if err != nil {
				return badChain("indirect table: %v", err)
			}
			table, n, idx, steps, inIndirect = t, length/DescSize, 0, 0, true
			continue
		}

		write := flags&DescFlagWrite != 0
		if write {
			sawWrite = true
		} else if sawWrite {
			return badChain("readable descriptor %d after a writable one", idx)
		}
		if length > 0 {
			buf, err := q.mem.Range(addr, uint64(length))
			if err != nil {
				return badChain("descriptor %d: %v", idx, err)
			}
			c.segs = append(c.segs, buf)
			c.addrs = append(c.addrs, addr)
			if write {
				c.WriteLen += uint64(length)
			} else {
				c.ReadLen += uint64(length)
				c.nRead++
			}
		}
		if flags&DescFlagNext == 0 {
			return nil
		}
		idx = uint32(next)
	}
}

// Push puts a completed chain on the used ring and publishes it.
func (q *Queue) Push(head uint16, written uint32) {
	off := ringStart + int(q.usedIdx&q.mask)*UsedElemSize
	q.putUsed(head, written)
	q.usedIdx++
	// The atomic store orders the element before the index.
	Store16(q.used[ringIdx:], q.usedIdx)
	// Logged after the writes: a migration that copies the page between
	// our mark and our write would miss the write.
	q.logUsed(off, UsedElemSize)
	q.logUsed(ringIdx, 2)
}

// logUsed reports a write of size bytes at offset off of the used ring.
func (q *Queue) logUsed(off, size int) {
	if q.dirty != nil && q.dirty.Logging() {
		q.dirty.LogUsed(uint64(off), uint64(size))
	}
}

// logChain reports the device-writable buffers of c, which the device has
// finished writing, before c goes on the used ring.
func (q *Queue) logChain(c *Chain) {
	if q.dirty != nil && q.dirty.Logging() {
		c.logWritable(q.dirty)
	}
}

// putUsed writes the used element for head at the next used index
// without publishing it.
func (q *Queue) putUsed(head uint16, written uint32) {
	e := q.used[ringStart+int(q.usedIdx&q.mask)*UsedElemSize:]
	le.PutUint32(e[0:], uint32(head))
	le.PutUint32(e[4:], written)
}

// NeedsNotify reports whether the driver wants an interrupt for the chains
// pushed since the last call that returned true (or since the queue
// started). It honours used_event with EVENT_IDX and the NO_INTERRUPT flag
// without it.
func (q *Queue) NeedsNotify() bool {
	old, valid := q.signalledUsed, q.signalledValid
	if old == q.usedIdx {
		return false // nothing new
	}
	q.signalledUsed, q.signalledValid = q.usedIdx, true
	if !q.eventIdx {
		return Load16(q.avail[ringFlags:])&AvailFlagNoInterrupt == 0
	}
	if !valid {
		// No interrupt since the queue started: used_event may predate
		// us, so do not trust it to suppress this one.
		return true
	}
	// Push's atomic store precedes this load (store-load order).
	event := Load16(q.avail[ringStart+2*int(q.size):])
	return NeedEvent(event, q.usedIdx, old)
}

// NeedEvent is the virtio event-index test: whether moving an index from
// old to new passes event (all modulo 2^16).
func NeedEvent(event, new, old uint16) bool {
	return new-event-1 < new-old
}

// DisableNotify asks the driver not to kick while the device is busy
// draining the ring. With EVENT_IDX there is nothing to do: avail_event
// stays behind, so the driver kicks at most once.
func (q *Queue) DisableNotify() {
	if !q.eventIdx {
		Store16(q.used[ringFlags:], UsedFlagNoNotify)
		q.logUsed(ringFlags, 2)
	}
}

// EnableNotify asks the driver to kick for the next chain it makes
// available. The caller must check HasAvail afterwards, before sleeping:
// the driver may have added a chain before it saw the request.
func (q *Queue) EnableNotify() {
	if q.eventIdx {
		off := ringStart + UsedElemSize*int(q.size)
		Store16(q.used[off:], q.lastAvail)
		q.logUsed(off, 2)
	} else {
		Store16(q.used[ringFlags:], 0)
		q.logUsed(ringFlags, 2)
	}
}
