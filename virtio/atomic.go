package virtio

import (
	"sync/atomic"
	"unsafe"
)

// Ring indices and flags are 16-bit fields shared with the driver, which
// reads and writes them concurrently. Go has no 16-bit atomics, so these
// helpers operate on the naturally aligned 32-bit word that holds the field.
// A 2-byte aligned field never straddles two such words, and a word that
// holds any byte of a mapping lies wholly inside it (mappings are page
// aligned), so touching the other half of the word is safe. Stores use
// compare-and-swap so that the other half, which may belong to the driver,
// is never clobbered.
//
// The sequentially consistent Go atomics also act as the memory barriers
// the virtio ring protocol needs (including store-load ordering between
// publishing the used index and reading used_event).
//
// The word is interpreted in host byte order; virtio 1.x rings are
// little-endian, so this assumes a little-endian host (amd64, arm64).

// wordOf returns the aligned 32-bit word holding the 16-bit field that
// starts at b[0], and the shift of the field inside it. b must have at least
// 2 bytes and start at an even address.
func wordOf(b []byte) (*uint32, uint) {
	p := unsafe.Pointer(unsafe.SliceData(b[:2]))
	mis := uintptr(p) & 3
	return (*uint32)(unsafe.Add(p, -int(mis))), uint(mis) * 8
}

// Load16 atomically loads the little-endian 16-bit ring field at b[0:2]. b
// must start at an even address.
func Load16(b []byte) uint16 {
	w, shift := wordOf(b)
	return uint16(atomic.LoadUint32(w) >> shift)
}

// Store16 atomically stores v in the little-endian 16-bit ring field at
// b[0:2], leaving the neighbouring bytes of its word as they are. b must
// start at an even address.
func Store16(b []byte, v uint16) {
	w, shift := wordOf(b)
	mask := uint32(0xffff) << shift
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^mask|uint32(v)<<shift) {
			return
		}
	}
}

// aligned reports whether b starts at a multiple of n bytes (n a power of
// two).
func aligned(b []byte, n uintptr) bool {
	if len(b) == 0 {
		return true
	}
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))&(n-1) == 0
}
