package frontend

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/thinblk/thinblk/virtio"
)

// ring is the driver side of one split virtqueue (virtio 1.2, 2.7) in
// guest memory. The back-end is another party (often another process): the
// descriptor table and the available ring are published with atomic stores
// of the index words, and the used ring is read after an atomic load of its
// index, so that plain reads and writes of ring entries are ordered around
// them. Go's atomics are sequentially consistent, which also gives the full
// barrier needed between publishing the available index and reading the
// device's notification state (avail_event / used flags).
type ring struct {
	size     uint16
	eventIdx bool

	desc, avail, used Buffer

	// Driver-private shadow state: never read back from shared memory.
	freeStack []uint16 // free descriptor indexes
	next      []uint16 // chain links of descriptors in flight
	chainLen  []uint16 // per head: descriptors the chain holds (0: not in flight)
	availIdx  uint16   // next available index to publish
	kickedIdx uint16   // available index at the last notification check
	lastUsed  uint16   // next used index to consume
}

// ringAreas are the allocations of a ring; padding keeps the 32-bit atomic
// accesses to the 16-bit event fields inside the area.
func newRing(m *Memory, size uint16, eventIdx bool) (*ring, error) {
	if size < 2 || size&(size-1) != 0 || size > virtio.MaxQueueSize {
		return nil, fmt.Errorf("queue size %d: want a power of two in [2, %d]", size, virtio.MaxQueueSize)
	}
	r := &ring{size: size, eventIdx: eventIdx}
	var err error
	if r.desc, err = m.Alloc(virtio.DescTableSize(size), 4096); err != nil {
		return nil, fmt.Errorf("allocate descriptor table: %w", err)
	}
	if r.avail, err = m.Alloc(virtio.AvailRingSize(size)+2, 4096); err != nil {
		return nil, fmt.Errorf("allocate available ring: %w", err)
	}
	if r.used, err = m.Alloc(virtio.UsedRingSize(size)+2, 4096); err != nil {
		return nil, fmt.Errorf("allocate used ring: %w", err)
	}
	r.freeStack = make([]uint16, size)
	for i := range r.freeStack {
		r.freeStack[i] = size - 1 - uint16(i)
	}
	r.next = make([]uint16, size)
	r.chainLen = make([]uint16, size)
	return r, nil
}

func (r *ring) free(m *Memory) {
	m.Free(r.desc)
	m.Free(r.avail)
	m.Free(r.used)
}

func u32At(b []byte, off int) *uint32 {
	return (*uint32)(unsafe.Pointer(&b[off : off+4][0]))
}

// numFree is the number of descriptors available for new chains.
func (r *ring) numFree() int { return len(r.freeStack) }

// desc is one descriptor to be written.
type desc struct {
	addr  uint64
	len   uint32
	flags uint16
}

func putDesc(table []byte, i int, d desc, next uint16) {
	b := table[i*virtio.DescSize : (i+1)*virtio.DescSize]
	binary.LittleEndian.PutUint64(b[0:], d.addr)
	binary.LittleEndian.PutUint32(b[8:], d.len)
	binary.LittleEndian.PutUint16(b[12:], d.flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

// add writes a chain of descriptors and queues its head on the available
// ring without publishing it. ds' flags may carry WRITE (and, to build
// malformed chains, anything else); NEXT links are added here.
func (r *ring) add(ds []desc) (head uint16, err error) {
	if len(ds) == 0 {
		return 0, fmt.Errorf("empty descriptor chain")
	}
	if len(ds) > len(r.freeStack) {
		return 0, fmt.Errorf("chain of %d descriptors: only %d free", len(ds), len(r.freeStack))
	}
	n := len(ds)
	idx := r.freeStack[len(r.freeStack)-n:]
	r.freeStack = r.freeStack[:len(r.freeStack)-n]
	for i := n - 1; i >= 0; i-- {
		d := ds[i]
		var next uint16
		if i+1 < n {
			d.flags |= virtio.DescFlagNext
			next = idx[i+1]
		}
		r.next[idx[i]] = next
		putDesc(r.desc.Bytes, int(idx[i]), d, next)
	}
	head = idx[0]
	r.chainLen[head] = uint16(n)
	slot := 4 + 2*int(r.availIdx%r.size)
	binary.LittleEndian.PutUint16(r.avail.Bytes[slot:], head)
	r.availIdx++
	return head, nil
}

// publish makes every added chain visible to the device and reports
// whether the device wants a kick.
func (r *ring) publish() bool {
	old := r.kickedIdx
	// flags (0: interrupts wanted) and idx share one aligned word.
	atomic.StoreUint32(u32At(r.avail.Bytes, 0), uint32(r.availIdx)<<16)
	r.kickedIdx = r.availIdx
	if old == r.availIdx {
		return false
	}
	if r.eventIdx {
		availEvent := uint16(atomic.LoadUint32(u32At(r.used.Bytes, 4+8*int(r.size))))
		// vring_need_event: kick if availEvent lies in (old, new].
		return r.availIdx-availEvent-1 < r.availIdx-old
	}
	flags := uint16(atomic.LoadUint32(u32At(r.used.Bytes, 0)))
	return flags&virtio.UsedFlagNoNotify == 0
}

// usedIdx reads the device's used index.
func (r *ring) usedIdx() uint16 { return uint16(atomic.LoadUint32(u32At(r.used.Bytes, 0)) >> 16) }

// pending reports whether the device has used chains not yet reaped.
func (r *ring) pending() bool { return r.usedIdx() != r.lastUsed }

// pop takes the next used element. The element comes from the device:
// an id that is not a chain in flight is an error, not a crash.
func (r *ring) pop() (head uint16, length uint32, ok bool, err error) {
	if r.usedIdx() == r.lastUsed {
		return 0, 0, false, nil
	}
	e := r.used.Bytes[4+virtio.UsedElemSize*int(r.lastUsed%r.size):]
	id := binary.LittleEndian.Uint32(e[0:])
	length = binary.LittleEndian.Uint32(e[4:])
	if id >= uint32(r.size) || r.chainLen[id] == 0 {
		return 0, 0, false, fmt.Errorf("device used descriptor %d at used index %d, which is not a chain in flight", id, r.lastUsed)
	}
	r.lastUsed++
	head = uint16(id)
	for i, d := 0, head; i < int(r.chainLen[head]); i++ {
		r.freeStack = append(r.freeStack, d)
		d = r.next[d]
	}
	r.chainLen[head] = 0
	return head, length, true, nil
}

// armInterrupt asks the device for an interrupt at the next used entry and
// reports whether entries arrived meanwhile (the caller must then reap
// instead of sleeping).
func (r *ring) armInterrupt() bool {
	if r.eventIdx {
		// used_event (u16) and our padding share one aligned word.
		atomic.StoreUint32(u32At(r.avail.Bytes, 4+2*int(r.size)), uint32(r.lastUsed))
	}
	return r.pending()
}

// state describes the ring indexes, for diagnosing stalls.
func (r *ring) state() string {
	availEvent := uint16(atomic.LoadUint32(u32At(r.used.Bytes, 4+8*int(r.size))))
	usedEvent := uint16(atomic.LoadUint32(u32At(r.avail.Bytes, 4+2*int(r.size))))
	usedFlags := uint16(atomic.LoadUint32(u32At(r.used.Bytes, 0)))
	return fmt.Sprintf("avail idx %d, used idx %d, reaped up to %d, used_event %d, avail_event %d, used flags %#x",
		r.availIdx, r.usedIdx(), r.lastUsed, usedEvent, availEvent, usedFlags)
}
