package vhostuser

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Dirty logging for live migration (vhost-user.rst, "Migration"): while
// VHOST_F_LOG_ALL is negotiated, every byte the back-end writes into guest
// memory sets bit gpa/LogPageSize of a bitmap that the front-end shares
// (SET_LOG_BASE) and reads to find the pages to copy again.

// FeatureLogAll is the virtio feature bit (in GET/SET_FEATURES) that turns
// dirty logging on (VHOST_F_LOG_ALL).
const FeatureLogAll = 26

// VringFlagLog in SET_VRING_ADDR's flags asks for the used ring's writes to
// be logged at log_guest_addr (VHOST_VRING_F_LOG).
const VringFlagLog = 1 << 0

// LogPageSize is the guest memory one bit of the dirty log stands for.
const LogPageSize = 4096

// maxLogSize bounds the log: one bit per page of a 47-bit guest-physical
// space (maxRegionSize) is 4 GiB of bitmap; nothing real comes close.
const maxLogSize = maxRegionSize / LogPageSize / 8

// LogBase is the payload of SET_LOG_BASE: where the bitmap is in the
// descriptor that comes with the message.
type LogBase struct {
	MmapSize   uint64
	MmapOffset uint64
}

const logBaseSize = 16

func (l LogBase) Encode() []byte { return encodeFixed(l) }

// DecodeLogBase parses a SET_LOG_BASE payload and checks it on its own:
// a size that the log's bit count can address, an offset that keeps the
// bitmap's words aligned for atomic updates.
func DecodeLogBase(b []byte) (LogBase, error) {
	l, err := decodeFixed[LogBase](b)
	if err != nil {
		return l, err
	}
	switch {
	case l.MmapSize == 0:
		return l, errors.New("empty dirty log")
	case l.MmapSize > maxLogSize:
		return l, fmt.Errorf("dirty log of %d bytes exceeds %d", l.MmapSize, uint64(maxLogSize))
	case l.MmapOffset > maxRegionSize:
		return l, fmt.Errorf("dirty log offset %#x is too large", l.MmapOffset)
	case l.MmapOffset%8 != 0:
		return l, fmt.Errorf("dirty log offset %#x is not 8-byte aligned", l.MmapOffset)
	}
	return l, nil
}

// logBytesFor is the bitmap size that covers guest-physical [0, end).
func logBytesFor(end uint64) uint64 {
	pages := (end + LogPageSize - 1) / LogPageSize
	return (pages + 7) / 8
}

// dirtyLog is a session's log: the mapped bitmap and whether LOG_ALL is
// on. The session's goroutine changes it; queues mark it from theirs.
type dirtyLog struct {
	// on is LOG_ALL negotiated with a bitmap mapped: the one check a
	// completion makes while logging is off.
	on atomic.Bool
	// mu guards the mapping against unmapping while a mark uses it
	// (SET_LOG_BASE may replace the log while rings run).
	mu      sync.RWMutex
	mapping []byte // the whole mmap, for munmap
	bits    []byte // the bitmap, a multiple of 4 bytes, 4-byte aligned
	// outside counts marks beyond the bitmap (front-end's log too small
	// for its memory table); logged, never written.
	outside atomic.Uint64
	call    *os.File // SET_LOG_FD: signalled after a mark
	callFd  int      // call's descriptor, taken without os.File.Fd (which may make it blocking)

	// Session goroutine only.
	logAll bool
}

// mapLog maps the bitmap lb describes in f (not closed: the mapping
// outlives the descriptor).
func mapLog(lb LogBase, f *os.File) (mapping, bits []byte, err error) {
	if f == nil {
		return nil, nil, errors.New("dirty log without a file descriptor")
	}
	fd := int(f.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, nil, fmt.Errorf("stat dirty log fd: %w", err)
	}
	// A shared mapping touched past the end of its file raises SIGBUS.
	if st.Mode&unix.S_IFMT != unix.S_IFREG || uint64(st.Size) < lb.MmapOffset+lb.MmapSize {
		return nil, nil, fmt.Errorf("dirty log [%#x,+%#x) of its fd exceeds the file (%d bytes, mode %#o)",
			lb.MmapOffset, lb.MmapSize, st.Size, st.Mode&unix.S_IFMT)
	}
	page := uint64(os.Getpagesize())
	delta := lb.MmapOffset % page
	m, err := unix.Mmap(fd, int64(lb.MmapOffset-delta), int(lb.MmapSize+delta), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("mmap dirty log of %d bytes: %w", lb.MmapSize, err)
	}
	// Whole 32-bit words only: a trailing partial word is never marked
	// (QEMU's logs are whole 64-bit words anyway).
	n := lb.MmapSize &^ 3
	return m, m[delta : delta+n : delta+n], nil
}

// replace installs a new bitmap (nil to drop it) and unmaps the old one
// once no mark uses it.
func (l *dirtyLog) replace(mapping, bits []byte) {
	l.mu.Lock()
	old := l.mapping
	l.mapping, l.bits = mapping, bits
	l.on.Store(l.logAll && bits != nil)
	l.mu.Unlock()
	if old != nil {
		unix.Munmap(old)
	}
}

// mapped reports whether a log is mapped.
func (l *dirtyLog) mapped() bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.mapping != nil
}

// migrating reports whether LOG_ALL is negotiated (a live migration is
// under way). Session goroutine only.
func (l *dirtyLog) migrating() bool { return l.logAll }

// setLogAll records whether LOG_ALL is negotiated. Turning it off drops
// the bitmap: the front-end frees its log then and sends a new one before
// logging again.
func (l *dirtyLog) setLogAll(on bool) {
	l.mu.Lock()
	l.logAll = on
	l.on.Store(on && l.bits != nil)
	l.mu.Unlock()
	if !on {
		l.replace(nil, nil)
	}
}

// covers reports whether the bitmap has a bit for every page below end.
func (l *dirtyLog) covers(end uint64) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.bits == nil || logBytesFor(end) <= uint64(len(l.bits))
}

func (l *dirtyLog) setCall(f *os.File) {
	fd := -1
	if f != nil {
		// The eventfd's file description is shared with the front-end:
		// leave its blocking mode alone.
		if rc, err := f.SyscallConn(); err == nil {
			rc.Control(func(u uintptr) { fd = int(u) })
		}
	}
	l.mu.Lock()
	old := l.call
	l.call, l.callFd = f, fd
	l.mu.Unlock()
	if old != nil {
		old.Close()
	}
}

// mark sets the bit of every page of guest-physical [addr, addr+size),
// one atomic OR per 32 pages: a migration thread reads and clears words
// concurrently.
func (l *dirtyLog) mark(addr, size uint64) {
	if size == 0 || !l.on.Load() {
		return
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.bits == nil {
		return
	}
	first := addr / LogPageSize
	last := first
	if addr+size-1 >= addr { // no wrap (a checked address never wraps)
		last = (addr + size - 1) / LogPageSize
	}
	words := uint64(len(l.bits)) / 4
	for w := first / 32; w <= last/32; w++ {
		if w >= words {
			l.outside.Add(1)
			return
		}
		lo, hi := uint64(0), uint64(31)
		if w == first/32 {
			lo = first % 32
		}
		if w == last/32 {
			hi = last % 32
		}
		mask := uint32(0xffffffff) >> (31 - hi) &^ (1<<lo - 1)
		atomic.OrUint32((*uint32)(unsafe.Pointer(&l.bits[w*4])), mask)
	}
	if l.callFd >= 0 && l.call != nil {
		one := [8]byte{1}
		_, _ = unix.Write(l.callFd, one[:])
	}
}

// close unmaps the bitmap and closes the log call fd.
func (l *dirtyLog) close() {
	l.mu.Lock()
	l.logAll = false
	l.mu.Unlock()
	l.replace(nil, nil)
	l.setCall(nil)
}

// ringDirtyLog is one ring's view of the session's log; it implements
// virtio.DirtyLog. The used ring's guest address and whether its writes
// are logged come from SET_VRING_ADDR, which may change them while the
// ring runs (QEMU turns the flag on when a migration starts).
type ringDirtyLog struct {
	log     *dirtyLog
	used    atomic.Uint64 // log_guest_addr
	usedLog atomic.Bool   // VHOST_VRING_F_LOG
}

func (r *ringDirtyLog) Logging() bool              { return r.log.on.Load() }
func (r *ringDirtyLog) LogWrite(addr, size uint64) { r.log.mark(addr, size) }

func (r *ringDirtyLog) LogUsed(off, size uint64) {
	if r.usedLog.Load() {
		r.log.mark(r.used.Load()+off, size)
	}
}

// set records SET_VRING_ADDR's logging fields.
func (r *ringDirtyLog) set(a VringAddr) {
	r.used.Store(a.LogGuest)
	r.usedLog.Store(a.Flags&VringFlagLog != 0)
}
