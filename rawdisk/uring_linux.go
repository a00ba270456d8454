package rawdisk

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring: one submission ring filled by one goroutine, one
// completion ring drained by one other goroutine. Only what rawdisk needs
// (READV, WRITEV, FSYNC, NOP), written against the kernel ABI in
// include/uapi/linux/io_uring.h.

// Kernel ABI constants.
const (
	uringOffSQRing = 0
	uringOffCQRing = 0x8000000
	uringOffSQEs   = 0x10000000

	uringFeatSingleMmap = 1 << 0

	uringEnterGetEvents = 1 << 0

	uringOpNop    = 0
	uringOpReadv  = 1
	uringOpWritev = 2
	uringOpFsync  = 3

	uringFsyncDatasync = 1 << 0

	sqeSize = 64
	cqeSize = 16
)

// uringParams is struct io_uring_params.
type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// uring is one io_uring instance.
type uring struct {
	fd             int
	sqMap, cqMap   []byte // cqMap aliases sqMap if single
	single         bool   // IORING_FEAT_SINGLE_MMAP
	sqeMap         []byte
	sqHead, sqTail *uint32
	sqMask         uint32
	sqEntries      uint32
	sqArray        unsafe.Pointer // [sqEntries]uint32
	sqes           unsafe.Pointer // [sqEntries]sqe
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           unsafe.Pointer // [cqEntries]cqe

	// Submission side (one goroutine): tail not yet published.
	localTail uint32
}

// cqe is struct io_uring_cqe.
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

func newUring(entries uint32) (*uring, error) {
	var p uringParams
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	u := &uring{fd: int(fd)}
	if err := u.mapRings(&p); err != nil {
		u.close()
		return nil, err
	}
	return u, nil
}

func (u *uring) mapRings(p *uringParams) error {
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*cqeSize)
	single := p.features&uringFeatSingleMmap != 0
	u.single = single
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	u.sqMap, err = unix.Mmap(u.fd, uringOffSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap io_uring SQ ring: %w", err)
	}
	if single {
		u.cqMap = u.sqMap
	} else {
		u.cqMap, err = unix.Mmap(u.fd, uringOffCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("mmap io_uring CQ ring: %w", err)
		}
	}
	u.sqeMap, err = unix.Mmap(u.fd, uringOffSQEs, int(p.sqEntries*sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap io_uring SQEs: %w", err)
	}
	sq, cq := unsafe.Pointer(&u.sqMap[0]), unsafe.Pointer(&u.cqMap[0])
	u.sqHead = (*uint32)(unsafe.Add(sq, p.sqOff.head))
	u.sqTail = (*uint32)(unsafe.Add(sq, p.sqOff.tail))
	u.sqMask = *(*uint32)(unsafe.Add(sq, p.sqOff.ringMask))
	u.sqEntries = p.sqEntries
	u.sqArray = unsafe.Add(sq, p.sqOff.array)
	u.sqes = unsafe.Pointer(&u.sqeMap[0])
	u.cqHead = (*uint32)(unsafe.Add(cq, p.cqOff.head))
	u.cqTail = (*uint32)(unsafe.Add(cq, p.cqOff.tail))
	u.cqMask = *(*uint32)(unsafe.Add(cq, p.cqOff.ringMask))
	u.cqes = unsafe.Add(cq, p.cqOff.cqes)
	u.localTail = atomic.LoadUint32(u.sqTail)
	return nil
}

func (u *uring) close() {
	if u.sqeMap != nil {
		_ = unix.Munmap(u.sqeMap)
	}
	if u.cqMap != nil && !u.single {
		_ = unix.Munmap(u.cqMap)
	}
	if u.sqMap != nil {
		_ = unix.Munmap(u.sqMap)
	}
	u.sqMap, u.cqMap, u.sqeMap = nil, nil, nil
	if u.fd >= 0 {
		unix.Close(u.fd)
		u.fd = -1
	}
}

// errRingFull means every submission slot holds an entry the kernel has
// not consumed yet.
var errRingFull = errors.New("io_uring submission ring full")

// prep fills the next submission entry. It is not visible to the kernel
// until submit.
func (u *uring) prep(op uint8, fd int, addr uintptr, length uint32, off uint64, opFlags uint32, userData uint64) error {
	if u.localTail-atomic.LoadUint32(u.sqHead) >= u.sqEntries {
		return errRingFull
	}
	idx := u.localTail & u.sqMask
	sqe := (*[sqeSize]byte)(unsafe.Add(u.sqes, uintptr(idx)*sqeSize))
	*sqe = [sqeSize]byte{}
	sqe[0] = op
	*(*int32)(unsafe.Pointer(&sqe[4])) = int32(fd)
	*(*uint64)(unsafe.Pointer(&sqe[8])) = off
	*(*uint64)(unsafe.Pointer(&sqe[16])) = uint64(addr)
	*(*uint32)(unsafe.Pointer(&sqe[24])) = length
	*(*uint32)(unsafe.Pointer(&sqe[28])) = opFlags
	*(*uint64)(unsafe.Pointer(&sqe[32])) = userData
	*(*uint32)(unsafe.Add(u.sqArray, uintptr(idx)*4)) = idx
	u.localTail++
	return nil
}

// submit publishes the prepared entries and has the kernel consume them.
func (u *uring) submit() error {
	// The release store orders the entries before the tail.
	atomic.StoreUint32(u.sqTail, u.localTail)
	for {
		pending := u.localTail - atomic.LoadUint32(u.sqHead)
		if pending == 0 {
			return nil
		}
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(u.fd), uintptr(pending), 0, 0, 0, 0)
		switch errno {
		case 0, unix.EINTR:
		case unix.EAGAIN, unix.EBUSY:
			// Out of kernel resources or completions backed up: the
			// reaper frees them; try again.
			unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		default:
			return fmt.Errorf("io_uring_enter submit: %w", errno)
		}
	}
}

// waitCQE blocks until at least one completion is available.
func (u *uring) waitCQE() error {
	for {
		if atomic.LoadUint32(u.cqTail) != *u.cqHead {
			return nil
		}
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(u.fd), 0, 1, uringEnterGetEvents, 0, 0)
		switch errno {
		case 0, unix.EINTR, unix.EAGAIN, unix.EBUSY:
		default:
			return fmt.Errorf("io_uring_enter wait: %w", errno)
		}
	}
}

// reap copies available completions into dst (up to its capacity) and
// releases their slots to the kernel.
func (u *uring) reap(dst []cqe) []cqe {
	head := *u.cqHead
	tail := atomic.LoadUint32(u.cqTail) // acquire: entries before tail are written
	for head != tail && len(dst) < cap(dst) {
		dst = append(dst, *(*cqe)(unsafe.Add(u.cqes, uintptr(head&u.cqMask)*cqeSize)))
		head++
	}
	atomic.StoreUint32(u.cqHead, head)
	return dst
}
