package vhostuser

import (
	"errors"
	"fmt"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// MaxMemSlots is what GET_MAX_MEM_SLOTS answers: the most regions the
// memory table may hold with CONFIGURE_MEM_SLOTS. Lookups are binary
// searches, so the number only bounds the front-end's appetite.
const MaxMemSlots = 64

// maxRegionSize bounds one region (a 47-bit user address space cannot map
// more); it keeps offset arithmetic far from overflow.
const maxRegionSize = 1 << 46

// mappedRegion is one region of guest memory mapped into this process.
type mappedRegion struct {
	MemoryRegion
	mapping []byte // the whole mmap, page aligned, for munmap
	data    []byte // the region itself: len(data) == Size
	// file is a duplicate of the region's descriptor, kept so that a
	// hand-over can pass the region to the next process.
	file *os.File
}

// guestMemory is an immutable snapshot of the memory table. Queues get a
// snapshot when they start; the table is only changed (and regions only
// unmapped) while every queue is stopped, so a snapshot never refers to
// unmapped memory while a queue uses it. It implements virtio.Memory.
type guestMemory struct {
	regions []*mappedRegion // sorted by GuestPhysAddr, non-overlapping
}

var errOutsideMemory = errors.New("address range outside guest memory")

// Range implements virtio.Memory: host bytes for guest-physical
// [addr, addr+size), wholly inside one region.
func (m *guestMemory) Range(addr, size uint64) ([]byte, error) {
	regs := m.regions
	// Binary search for the last region starting at or below addr.
	lo, hi := 0, len(regs)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if regs[mid].GuestPhysAddr <= addr {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == 0 {
		return nil, errOutsideMemory
	}
	r := regs[lo-1]
	off := addr - r.GuestPhysAddr
	if off >= r.Size || size > r.Size-off {
		return nil, errOutsideMemory
	}
	return r.data[off : off+size : off+size], nil
}

// userRange translates a range of the front-end's virtual addresses (as in
// SET_VRING_ADDR) into host bytes, wholly inside one region.
func (m *guestMemory) userRange(uaddr, size uint64) ([]byte, error) {
	for _, r := range m.regions {
		if uaddr < r.UserAddr {
			continue
		}
		off := uaddr - r.UserAddr
		if off >= r.Size || size > r.Size-off {
			continue
		}
		return r.data[off : off+size : off+size], nil
	}
	return nil, fmt.Errorf("user address range [%#x,+%#x) outside guest memory", uaddr, size)
}

// userToGuest translates one of the front-end's virtual addresses into a
// guest-physical address.
func (m *guestMemory) userToGuest(uaddr uint64) (uint64, bool) {
	for _, r := range m.regions {
		if uaddr >= r.UserAddr && uaddr-r.UserAddr < r.Size {
			return r.GuestPhysAddr + (uaddr - r.UserAddr), true
		}
	}
	return 0, false
}

// with returns a new snapshot with r added, or an error if r overlaps an
// existing region (in guest-physical or user address space).
func (m *guestMemory) with(r *mappedRegion) (*guestMemory, error) {
	var regs []*mappedRegion
	if m != nil {
		regs = append(regs, m.regions...)
	}
	regs = append(regs, r)
	if err := checkRegions(regs); err != nil {
		return nil, err
	}
	return &guestMemory{regions: regs}, nil
}

// without returns a new snapshot without the region matching desc (same
// guest address, size and user address) and the removed region.
func (m *guestMemory) without(desc MemoryRegion) (*guestMemory, *mappedRegion, error) {
	if m != nil {
		for i, r := range m.regions {
			if r.GuestPhysAddr == desc.GuestPhysAddr && r.Size == desc.Size && r.UserAddr == desc.UserAddr {
				regs := append(append([]*mappedRegion(nil), m.regions[:i]...), m.regions[i+1:]...)
				return &guestMemory{regions: regs}, r, nil
			}
		}
	}
	return nil, nil, fmt.Errorf("no region at guest address %#x size %#x user address %#x",
		desc.GuestPhysAddr, desc.Size, desc.UserAddr)
}

// end is the guest-physical address just past the highest region (0
// without memory).
func (m *guestMemory) end() uint64 {
	if m.len() == 0 {
		return 0
	}
	r := m.regions[len(m.regions)-1] // sorted by guest address
	return r.GuestPhysAddr + r.Size
}

func (m *guestMemory) len() int {
	if m == nil {
		return 0
	}
	return len(m.regions)
}

// checkRegions sorts regs by guest address and rejects overlaps in either
// address space.
func checkRegions(regs []*mappedRegion) error {
	byUser := append([]*mappedRegion(nil), regs...)
	if err := sortApart(byUser, func(r *mappedRegion) uint64 { return r.UserAddr }, "user address space"); err != nil {
		return err
	}
	return sortApart(regs, func(r *mappedRegion) uint64 { return r.GuestPhysAddr }, "guest memory")
}

// sortApart sorts regs by where they start in one address space and
// rejects two that overlap there.
func sortApart(regs []*mappedRegion, start func(*mappedRegion) uint64, space string) error {
	sort.Slice(regs, func(i, j int) bool { return start(regs[i]) < start(regs[j]) })
	for i := 1; i < len(regs); i++ {
		a, b := regs[i-1], regs[i]
		if start(a)+a.Size > start(b) {
			return fmt.Errorf("regions overlap in %s: [%#x,+%#x) and [%#x,+%#x)", space, start(a), a.Size, start(b), b.Size)
		}
	}
	return nil
}

// validateRegion checks a region description on its own.
func validateRegion(r MemoryRegion) error {
	switch {
	case r.Size == 0:
		return errors.New("empty memory region")
	case r.Size > maxRegionSize:
		return fmt.Errorf("memory region of %#x bytes is too large", r.Size)
	case r.GuestPhysAddr > ^uint64(0)-r.Size || r.UserAddr > ^uint64(0)-r.Size:
		return fmt.Errorf("memory region [%#x,+%#x) wraps around", r.GuestPhysAddr, r.Size)
	case r.MmapOffset > maxRegionSize:
		return fmt.Errorf("memory region mmap offset %#x is too large", r.MmapOffset)
	}
	return nil
}

// mapRegion maps region r of file f shared and read-write. f is not
// closed (the caller closes it: the mapping outlives the descriptor).
func mapRegion(r MemoryRegion, f *os.File) (*mappedRegion, error) {
	if err := validateRegion(r); err != nil {
		return nil, err
	}
	if f == nil {
		return nil, errors.New("memory region without a file descriptor")
	}
	fd := int(f.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat memory region fd: %w", err)
	}
	// Touching a shared mapping past the end of a file raises SIGBUS,
	// which would kill the process: insist the file covers the region.
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < r.MmapOffset+r.Size {
		return nil, fmt.Errorf("memory region [%#x,+%#x) of its fd exceeds the file's %d bytes",
			r.MmapOffset, r.Size, st.Size)
	}
	page := uint64(os.Getpagesize())
	delta := r.MmapOffset % page
	length := r.Size + delta
	dup, err := dupFile(f)
	if err != nil {
		return nil, fmt.Errorf("memory region fd: %w", err)
	}
	m, err := unix.Mmap(fd, int64(r.MmapOffset-delta), int(length), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		dup.Close()
		return nil, fmt.Errorf("mmap memory region [%#x,+%#x): %w", r.GuestPhysAddr, r.Size, err)
	}
	return &mappedRegion{MemoryRegion: r, mapping: m, data: m[delta : delta+r.Size : delta+r.Size], file: dup}, nil
}

func (r *mappedRegion) unmap() {
	if r.mapping != nil {
		unix.Munmap(r.mapping)
		r.mapping, r.data = nil, nil
	}
	if r.file != nil {
		r.file.Close()
		r.file = nil
	}
}

// dupFile duplicates f's descriptor (close-on-exec), leaving f's blocking
// mode alone: the file description is shared with the front-end.
func dupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("dup: %w", derr)
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}

// unmapAll unmaps every region of the snapshot.
func (m *guestMemory) unmapAll() {
	if m == nil {
		return
	}
	for _, r := range m.regions {
		r.unmap()
	}
}
