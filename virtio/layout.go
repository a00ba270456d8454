package virtio

// Split virtqueue layout (virtio 1.2, 2.7). All fields are little-endian.
const (
	DescSize = 16 // struct virtq_desc: addr u64, len u32, flags u16, next u16

	DescFlagNext     = 1 // the chain continues at next
	DescFlagWrite    = 2 // device writes this buffer (otherwise reads it)
	DescFlagIndirect = 4 // the buffer holds a table of descriptors

	AvailFlagNoInterrupt = 1 // driver: don't interrupt me (without EVENT_IDX)
	UsedFlagNoNotify     = 1 // device: don't kick me (without EVENT_IDX)

	UsedElemSize = 8 // struct virtq_used_elem: id u32, len u32

	MaxQueueSize = 32768
)

// DescTableSize, AvailRingSize and UsedRingSize are the byte sizes of the
// three ring areas for a queue of n entries, including the event-index
// fields (used_event at the end of the avail ring, avail_event at the end
// of the used ring).
func DescTableSize(n uint16) uint64 { return DescSize * uint64(n) }
func AvailRingSize(n uint16) uint64 { return 4 + 2*uint64(n) + 2 }
func UsedRingSize(n uint16) uint64  { return 4 + UsedElemSize*uint64(n) + 2 }
