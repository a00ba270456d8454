// Package uring is a minimal io_uring: one submission ring filled by one
// goroutine, one completion ring drained by one other goroutine. It has
// only what thinblk's data paths need (READV, WRITEV, FSYNC, NOP), written
// against the kernel ABI in include/uapi/linux/io_uring.h.
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kernel ABI constants.
const (
	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	featSingleMmap = 1 << 0

	enterGetEvents = 1 << 0

	// Setup flags of a ring that one thread both submits to and waits
	// in: completions run when that thread enters the ring for them,
	// instead of interrupting it wherever it is (DEFER_TASKRUN, Linux
	// 6.1; it needs SINGLE_ISSUER). The ring starts disabled, so that
	// the issuer is the thread that enables it, not the one that made
	// it; TASKRUN_FLAG marks the ring when completions wait to be run.
	setupRDisabled    = 1 << 6
	setupTaskrunFlag  = 1 << 9
	setupSingleIssuer = 1 << 12
	setupDeferTaskrun = 1 << 13

	sqNeedWakeup = 1 << 0
	sqTaskrun    = 1 << 1

	registerEnableRings = 12

	sqeSize = 64
	cqeSize = 16
)

// Operations and their flags.
const (
	OpNop    = 0
	OpReadv  = 1
	OpWritev = 2
	OpFsync  = 3
	// OpPollAdd completes once its file is ready for the events given
	// as Prep's opFlags; Res is the ready events.
	OpPollAdd = 6

	FsyncDatasync = 1 << 0
)

// params is struct io_uring_params.
type params struct {
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

// Ring is one io_uring instance.
type Ring struct {
	fd             int
	sqMap, cqMap   []byte // cqMap aliases sqMap if single
	single         bool   // IORING_FEAT_SINGLE_MMAP
	sqeMap         []byte
	sqHead, sqTail *uint32
	sqFlags        *uint32
	sqMask         uint32
	sqEntries      uint32
	cqEntries      uint32
	sqArray        unsafe.Pointer // [sqEntries]uint32
	sqes           unsafe.Pointer // [sqEntries]sqe
	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           unsafe.Pointer // [cqEntries]cqe

	// Submission side (one goroutine): tail not yet published.
	localTail uint32
	// disabled until Enable (NewIssuer's rings).
	disabled bool
}

// CQE is struct io_uring_cqe.
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// New sets up a ring with at least entries submission slots.
func New(entries uint32) (*Ring, error) { return newRing(entries, 0) }

// NewIssuer sets up a ring that one thread alone submits to and reaps,
// the thread that calls Enable first; its completions run only when that
// thread enters the ring to wait for them (Wait, Submit). On a kernel
// without such rings (before 6.1) it returns an ordinary ring, on which
// Enable does nothing.
func NewIssuer(entries uint32) (*Ring, error) {
	u, err := newRing(entries, setupRDisabled|setupSingleIssuer|setupDeferTaskrun|setupTaskrunFlag)
	if err == nil {
		u.disabled = true
		return u, nil
	}
	return New(entries)
}

func newRing(entries, flags uint32) (*Ring, error) {
	p := params{flags: flags}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	u := &Ring{fd: int(fd)}
	if err := u.mapRings(&p); err != nil {
		u.Close()
		return nil, err
	}
	return u, nil
}

// Enable makes the calling thread a NewIssuer ring's one issuer; the
// ring takes no submission before. Call it on a goroutine locked to its
// thread (runtime.LockOSThread) and submit and wait only there.
func (u *Ring) Enable() error {
	if !u.disabled {
		return nil
	}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(u.fd), registerEnableRings, 0, 0, 0, 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_register enable rings: %w", errno)
	}
	u.disabled = false
	return nil
}

// Probe reports whether this process may use io_uring (it is missing
// before Linux 5.1, and seccomp or kernel.io_uring_disabled may forbid it).
func Probe() error {
	u, err := New(4)
	if err != nil {
		return err
	}
	u.Close()
	return nil
}

func (u *Ring) mapRings(p *params) error {
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*cqeSize)
	single := p.features&featSingleMmap != 0
	u.single = single
	if single {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	u.sqMap, err = unix.Mmap(u.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap io_uring SQ ring: %w", err)
	}
	if single {
		u.cqMap = u.sqMap
	} else {
		u.cqMap, err = unix.Mmap(u.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("mmap io_uring CQ ring: %w", err)
		}
	}
	u.sqeMap, err = unix.Mmap(u.fd, offSQEs, int(p.sqEntries*sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("mmap io_uring SQEs: %w", err)
	}
	sq, cq := unsafe.Pointer(&u.sqMap[0]), unsafe.Pointer(&u.cqMap[0])
	u.sqHead = (*uint32)(unsafe.Add(sq, p.sqOff.head))
	u.sqTail = (*uint32)(unsafe.Add(sq, p.sqOff.tail))
	u.sqFlags = (*uint32)(unsafe.Add(sq, p.sqOff.flags))
	u.sqMask = *(*uint32)(unsafe.Add(sq, p.sqOff.ringMask))
	u.sqEntries = p.sqEntries
	u.cqEntries = p.cqEntries
	u.sqArray = unsafe.Add(sq, p.sqOff.array)
	u.sqes = unsafe.Pointer(&u.sqeMap[0])
	u.cqHead = (*uint32)(unsafe.Add(cq, p.cqOff.head))
	u.cqTail = (*uint32)(unsafe.Add(cq, p.cqOff.tail))
	u.cqMask = *(*uint32)(unsafe.Add(cq, p.cqOff.ringMask))
	u.cqes = unsafe.Add(cq, p.cqOff.cqes)
	u.localTail = atomic.LoadUint32(u.sqTail)
	return nil
}

// Close unmaps the rings and closes the ring's descriptor.
func (u *Ring) Close() {
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

// SQEntries and CQEntries are the ring sizes the kernel chose.
func (u *Ring) SQEntries() uint32 { return u.sqEntries }
func (u *Ring) CQEntries() uint32 { return u.cqEntries }

// ErrRingFull means every submission slot holds an entry the kernel has
// not consumed yet.
var ErrRingFull = errors.New("io_uring submission ring full")

// Free is how many entries Prep can fill before ErrRingFull.
func (u *Ring) Free() uint32 {
	return u.sqEntries - (u.localTail - atomic.LoadUint32(u.sqHead))
}

// Prep fills the next submission entry. It is not visible to the kernel
// until Submit.
func (u *Ring) Prep(op uint8, fd int, addr uintptr, length uint32, off uint64, opFlags uint32, userData uint64) error {
	if u.localTail-atomic.LoadUint32(u.sqHead) >= u.sqEntries {
		return ErrRingFull
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

// Submit publishes the prepared entries and has the kernel consume them.
func (u *Ring) Submit() error {
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

// Unsubmitted calls fn with the user data of every prepared entry the
// kernel has not consumed (after a Submit error). They stay published.
func (u *Ring) Unsubmitted(fn func(userData uint64)) {
	for i := atomic.LoadUint32(u.sqHead); i != u.localTail; i++ {
		sqe := (*[sqeSize]byte)(unsafe.Add(u.sqes, uintptr(i&u.sqMask)*sqeSize))
		fn(*(*uint64)(unsafe.Pointer(&sqe[32])))
	}
}

// SubmitWait publishes the prepared entries and enters the ring once to
// submit them and, if wait, to sleep until a completion is available
// (with none visible yet); it also runs the completions of a NewIssuer
// ring. It returns after one enter: call it again while entries remain
// unsubmitted.
func (u *Ring) SubmitWait(wait bool) error {
	atomic.StoreUint32(u.sqTail, u.localTail)
	pending := u.localTail - atomic.LoadUint32(u.sqHead)
	minComplete := uintptr(0)
	if wait && atomic.LoadUint32(u.cqTail) == *u.cqHead {
		minComplete = 1
	}
	if pending == 0 && minComplete == 0 && atomic.LoadUint32(u.sqFlags)&sqTaskrun == 0 {
		return nil
	}
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(u.fd), uintptr(pending), minComplete, enterGetEvents, 0, 0)
	switch errno {
	case 0, unix.EINTR, unix.EAGAIN, unix.EBUSY:
		// EAGAIN, EBUSY: out of kernel resources, or completions backed
		// up; reaping frees them.
		return nil
	}
	return fmt.Errorf("io_uring_enter: %w", errno)
}

// TaskrunPending reports whether a ring of one issuer has completions
// waiting to be run (by the next enter).
func (u *Ring) TaskrunPending() bool { return atomic.LoadUint32(u.sqFlags)&sqTaskrun != 0 }

// Pending counts the prepared entries the kernel has not consumed.
func (u *Ring) Pending() uint32 { return u.localTail - atomic.LoadUint32(u.sqHead) }

// WaitCQE blocks until at least one completion is available.
func (u *Ring) WaitCQE() error {
	for {
		if atomic.LoadUint32(u.cqTail) != *u.cqHead {
			return nil
		}
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(u.fd), 0, 1, enterGetEvents, 0, 0)
		switch errno {
		case 0, unix.EINTR, unix.EAGAIN, unix.EBUSY:
		default:
			return fmt.Errorf("io_uring_enter wait: %w", errno)
		}
	}
}

// Reap copies available completions into dst (up to its capacity) and
// releases their slots to the kernel.
func (u *Ring) Reap(dst []CQE) []CQE {
	head := *u.cqHead
	tail := atomic.LoadUint32(u.cqTail) // acquire: entries before tail are written
	for head != tail && len(dst) < cap(dst) {
		dst = append(dst, *(*CQE)(unsafe.Add(u.cqes, uintptr(head&u.cqMask)*cqeSize)))
		head++
	}
	atomic.StoreUint32(u.cqHead, head)
	return dst
}
