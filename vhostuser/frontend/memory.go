package frontend

import (
	"fmt"
	"os"
	"sort"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Memory is the driver's "guest RAM": a memfd shared with the back-end and
// mapped into this process. Guest-physical addresses run from 0 to Size();
// the front-end's user address of guest-physical address a is Base()+a.
type Memory struct {
	file *os.File
	mem  []byte

	mu   sync.Mutex
	free []span // sorted by addr, coalesced
}

type span struct{ addr, size uint64 }

// Buffer is a piece of guest memory: its guest-physical address and the
// bytes behind it (outside the Go heap; do not use after Disk.Close).
type Buffer struct {
	Addr  uint64
	Bytes []byte
}

// Len is the buffer's length in bytes.
func (b Buffer) Len() int { return len(b.Bytes) }

// Slice returns the sub-buffer [from, to).
func (b Buffer) Slice(from, to int) Buffer {
	return Buffer{Addr: b.Addr + uint64(from), Bytes: b.Bytes[from:to:to]}
}

func newMemory(size uint64) (*Memory, error) {
	if size == 0 || size%uint64(os.Getpagesize()) != 0 {
		return nil, fmt.Errorf("guest memory size %d is not a positive multiple of the page size", size)
	}
	fd, err := unix.MemfdCreate("thinblk-frontend-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "guest-ram")
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, fmt.Errorf("size guest memory to %d bytes: %w", size, err)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("mmap guest memory: %w", err)
	}
	return &Memory{file: f, mem: mem, free: []span{{0, size}}}, nil
}

// Size is the guest memory size in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.mem)) }

// Base is the user (virtual) address at which guest-physical 0 is mapped;
// it is what SET_MEM_TABLE and SET_VRING_ADDR call the user address.
func (m *Memory) Base() uint64 { return uint64(uintptrOf(m.mem)) }

// Bytes returns guest memory [addr, addr+n). It panics when the range is
// outside guest memory: the driver's own addresses are trusted.
func (m *Memory) Bytes(addr, n uint64) []byte {
	return m.mem[addr : addr+n : addr+n]
}

// Alloc returns size bytes of zeroed guest memory aligned to align (a
// power of two, 0 meaning 16).
func (m *Memory) Alloc(size, align uint64) (Buffer, error) {
	if align == 0 {
		align = 16
	}
	if align&(align-1) != 0 {
		return Buffer{}, fmt.Errorf("alignment %d is not a power of two", align)
	}
	want := size
	// Round sizes so that freed spans stay usefully aligned.
	size = roundSize(size)
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, s := range m.free {
		start := (s.addr + align - 1) &^ (align - 1)
		if start+size > s.addr+s.size {
			continue
		}
		end := start + size
		var repl []span
		if start > s.addr {
			repl = append(repl, span{s.addr, start - s.addr})
		}
		if end < s.addr+s.size {
			repl = append(repl, span{end, s.addr + s.size - end})
		}
		m.free = append(m.free[:i], append(repl, m.free[i+1:]...)...)
		b := Buffer{Addr: start, Bytes: m.Bytes(start, want)}
		clear(b.Bytes)
		return b, nil
	}
	return Buffer{}, fmt.Errorf("guest memory exhausted: no %d bytes free (size %d)", size, len(m.mem))
}

// Free returns a buffer from Alloc.
func (m *Memory) Free(b Buffer) {
	size := roundSize(uint64(len(b.Bytes)))
	m.mu.Lock()
	defer m.mu.Unlock()
	i := sort.Search(len(m.free), func(i int) bool { return m.free[i].addr > b.Addr })
	m.free = append(m.free, span{})
	copy(m.free[i+1:], m.free[i:])
	m.free[i] = span{b.Addr, size}
	// Coalesce with the neighbours.
	if i+1 < len(m.free) && m.free[i].addr+m.free[i].size == m.free[i+1].addr {
		m.free[i].size += m.free[i+1].size
		m.free = append(m.free[:i+1], m.free[i+2:]...)
	}
	if i > 0 && m.free[i-1].addr+m.free[i-1].size == m.free[i].addr {
		m.free[i-1].size += m.free[i].size
		m.free = append(m.free[:i], m.free[i+1:]...)
	}
}

func (m *Memory) close() error {
	var err error
	if m.mem != nil {
		err = unix.Munmap(m.mem)
		m.mem = nil
	}
	if cerr := m.file.Close(); err == nil {
		err = cerr
	}
	return err
}

func roundSize(n uint64) uint64 {
	if n == 0 {
		return 16
	}
	return (n + 15) &^ 15
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
