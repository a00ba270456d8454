// Package virtiotest is a driver-side model of a split virtqueue over a
// byte-slice guest memory, for testing devices without a VM: it builds
// descriptor chains (direct, indirect, or deliberately malformed), makes
// them available, and reads completions from the used ring.
package virtiotest

import (
	"encoding/binary"
	"fmt"
	"os"

	"github.com/thinblk/thinblk/virtio"
	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/eventfd"
)

var le = binary.LittleEndian

// Memory is guest memory made of one region of ordinary Go memory starting
// at guest-physical address Base. It implements virtio.Memory.
type Memory struct {
	Base uint64
	Buf  []byte
}

// NewMemory returns size bytes of guest memory at guest address base.
func NewMemory(base uint64, size int) *Memory {
	// Go allocations of this size are at least 8-byte aligned, which the
	// ring atomics need.
	return &Memory{Base: base, Buf: make([]byte, size)}
}

// Range implements virtio.Memory.
func (m *Memory) Range(addr, size uint64) ([]byte, error) {
	end := addr + size
	if addr < m.Base || end < addr || end-m.Base > uint64(len(m.Buf)) {
		return nil, fmt.Errorf("guest range [%#x, +%#x) outside memory [%#x, +%#x)", addr, size, m.Base, len(m.Buf))
	}
	off := addr - m.Base
	return m.Buf[off : end-m.Base : end-m.Base], nil
}

// Bytes is Range for addresses the test knows to be valid.
func (m *Memory) Bytes(addr, size uint64) []byte {
	b, err := m.Range(addr, size)
	if err != nil {
		panic(err)
	}
	return b
}

// Buf describes one buffer of a chain: guest address, length, and whether
// the device writes it.
type Buf struct {
	Addr  uint64
	Len   uint32
	Write bool
}

// Driver is the driver side of one split virtqueue.
type Driver struct {
	Mem      *Memory
	Size     uint16
	Features uint64

	DescAddr, AvailAddr, UsedAddr uint64
	desc, avail, used             []byte

	next      uint64 // bump allocator for buffers
	limit     uint64
	freeHead  uint16
	numFree   int
	availIdx  uint16
	lastUsed  uint16
	chainLens map[uint16]int // head -> descriptors used (direct chains)

	Kick, Call *eventfd.FD // eventfds, when made by WithEventfds
	callFd     int
	kickFd     int
	pollFds    []unix.PollFd
	readBuf    [8]byte
}

var one = [8]byte{1}

// NewDriver lays out a queue of size entries at the start of mem (after a
// guard page) and keeps the rest for buffers.
func NewDriver(mem *Memory, size uint16, features uint64) *Driver {
	d := &Driver{Mem: mem, Size: size, Features: features, chainLens: map[uint16]int{}}
	d.DescAddr = mem.Base + 0x1000
	d.AvailAddr = d.DescAddr + virtio.DescTableSize(size)
	d.UsedAddr = alignUp(d.AvailAddr+virtio.AvailRingSize(size), 4096)
	d.desc = mem.Bytes(d.DescAddr, virtio.DescTableSize(size))
	d.avail = mem.Bytes(d.AvailAddr, virtio.AvailRingSize(size))
	d.used = mem.Bytes(d.UsedAddr, virtio.UsedRingSize(size))
	d.next = alignUp(d.UsedAddr+virtio.UsedRingSize(size), 4096)
	d.limit = mem.Base + uint64(len(mem.Buf))
	d.resetFree()
	return d
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

func (d *Driver) resetFree() {
	for i := uint16(0); i < d.Size; i++ {
		le.PutUint16(d.desc[int(i)*virtio.DescSize+14:], i+1)
	}
	d.freeHead, d.numFree = 0, int(d.Size)
}

// Setup returns the device's view of the queue.
func (d *Driver) Setup(index int) virtio.QueueSetup {
	return virtio.QueueSetup{
		Index: index, Size: d.Size,
		Desc: d.desc, Avail: d.avail, Used: d.used,
		Features: d.Features, Mem: d.Mem,
		Kick: d.Kick, Call: d.Call,
	}
}

// WithEventfds creates kick and call eventfds (closed by Close).
func (d *Driver) WithEventfds() error {
	// Non-blocking, as QEMU's event notifiers are.
	k, err := eventfd.New()
	if err != nil {
		return fmt.Errorf("kick: %w", err)
	}
	c, err := eventfd.New()
	if err != nil {
		k.Close()
		return fmt.Errorf("call: %w", err)
	}
	d.Kick, d.Call = k, c
	d.callFd, d.kickFd = c.Fd(), k.Fd()
	d.pollFds = []unix.PollFd{{Fd: int32(d.callFd), Events: unix.POLLIN}}
	return nil
}

// Close closes the eventfds.
func (d *Driver) Close() {
	if d.Kick != nil {
		d.Kick.Close()
	}
	if d.Call != nil {
		d.Call.Close()
	}
}

// Alloc returns n bytes of guest memory (8-byte aligned).
func (d *Driver) Alloc(n uint64) uint64 {
	a := alignUp(d.next, 8)
	if a+n > d.limit {
		panic("virtiotest: out of guest memory")
	}
	d.next = a + n
	return a
}

// AllocBuf allocates n bytes filled with data (if given) and returns a Buf.
func (d *Driver) AllocBuf(n uint32, write bool, data []byte) Buf {
	a := d.Alloc(uint64(n))
	copy(d.Mem.Bytes(a, uint64(n)), data)
	return Buf{Addr: a, Len: n, Write: write}
}

// SetDesc writes descriptor i of the table at tableAddr.
func (d *Driver) SetDesc(tableAddr uint64, i uint16, addr uint64, length uint32, flags, next uint16) {
	b := d.Mem.Bytes(tableAddr+uint64(i)*virtio.DescSize, virtio.DescSize)
	le.PutUint64(b[0:], addr)
	le.PutUint32(b[8:], length)
	le.PutUint16(b[12:], flags)
	le.PutUint16(b[14:], next)
}

// Desc reads descriptor i of the ring's table.
func (d *Driver) Desc(i uint16) (addr uint64, length uint32, flags, next uint16) {
	b := d.desc[int(i)*virtio.DescSize:]
	return le.Uint64(b), le.Uint32(b[8:]), le.Uint16(b[12:]), le.Uint16(b[14:])
}

// AddChain puts bufs in free descriptors as one chain, makes it available
// and returns its head.
func (d *Driver) AddChain(bufs ...Buf) uint16 {
	head := d.WriteChain(bufs...)
	d.Publish(head)
	return head
}

// WriteChain puts bufs in free descriptors as one chain without making it
// available.
func (d *Driver) WriteChain(bufs ...Buf) uint16 {
	if len(bufs) == 0 || len(bufs) > d.numFree {
		panic(fmt.Sprintf("virtiotest: chain of %d with %d free", len(bufs), d.numFree))
	}
	head := d.freeHead
	i := head
	for k, b := range bufs {
		_, _, _, next := d.Desc(i)
		var flags uint16
		if b.Write {
			flags |= virtio.DescFlagWrite
		}
		if k < len(bufs)-1 {
			flags |= virtio.DescFlagNext
		}
		d.SetDesc(d.DescAddr, i, b.Addr, b.Len, flags, next)
		if k == len(bufs)-1 {
			d.freeHead = next
		}
		i = next
	}
	d.numFree -= len(bufs)
	d.chainLens[head] = len(bufs)
	return head
}

// AddIndirect writes bufs into a new indirect table, points one ring
// descriptor at it, makes it available and returns its head.
func (d *Driver) AddIndirect(bufs ...Buf) uint16 {
	table := d.IndirectTable(bufs...)
	head := d.WriteChain(Buf{Addr: table, Len: uint32(len(bufs)) * virtio.DescSize})
	_, l, _, next := d.Desc(head)
	d.SetDesc(d.DescAddr, head, table, l, virtio.DescFlagIndirect, next)
	d.Publish(head)
	return head
}

// IndirectTable allocates and fills an indirect descriptor table.
func (d *Driver) IndirectTable(bufs ...Buf) uint64 {
	table := d.Alloc(uint64(len(bufs)) * virtio.DescSize)
	for k, b := range bufs {
		var flags uint16
		if b.Write {
			flags |= virtio.DescFlagWrite
		}
		if k < len(bufs)-1 {
			flags |= virtio.DescFlagNext
		}
		d.SetDesc(table, uint16(k), b.Addr, b.Len, flags, uint16(k+1))
	}
	return table
}

// Publish puts head on the available ring and publishes the new index.
func (d *Driver) Publish(head uint16) {
	le.PutUint16(d.avail[4+2*int(d.availIdx%d.Size):], head)
	d.availIdx++
	virtio.Store16(d.avail[2:], d.availIdx)
}

// SetAvailIdx publishes an arbitrary available index (for malformed-ring
// tests).
func (d *Driver) SetAvailIdx(v uint16) {
	d.availIdx = v
	virtio.Store16(d.avail[2:], v)
}

// SetAvailEntry writes avail ring slot i directly.
func (d *Driver) SetAvailEntry(i uint16, head uint16) {
	le.PutUint16(d.avail[4+2*int(i%d.Size):], head)
}

// AvailIdx is the driver's available index.
func (d *Driver) AvailIdx() uint16 { return d.availIdx }

// SetAvailFlags sets the available ring's flags (NO_INTERRUPT).
func (d *Driver) SetAvailFlags(v uint16) { virtio.Store16(d.avail[0:], v) }

// SetUsedEvent sets used_event (EVENT_IDX).
func (d *Driver) SetUsedEvent(v uint16) { virtio.Store16(d.avail[4+2*int(d.Size):], v) }

// UsedFlags reads the used ring's flags (NO_NOTIFY).
func (d *Driver) UsedFlags() uint16 { return virtio.Load16(d.used[0:]) }

// AvailEvent reads avail_event (EVENT_IDX).
func (d *Driver) AvailEvent() uint16 { return virtio.Load16(d.used[4+8*int(d.Size):]) }

// UsedIdx reads the device's used index.
func (d *Driver) UsedIdx() uint16 { return virtio.Load16(d.used[2:]) }

// NeedKick reports whether the driver must kick after publishing up to
// the current available index, having last kicked at old.
func (d *Driver) NeedKick(old uint16) bool {
	if d.Features&(1<<virtio.FeatureEventIdx) != 0 {
		return virtio.NeedEvent(d.AvailEvent(), d.availIdx, old)
	}
	return d.UsedFlags()&virtio.UsedFlagNoNotify == 0
}

// KickNow signals the kick eventfd.
func (d *Driver) KickNow() error {
	_, err := unix.Write(d.kickFd, one[:])
	return err
}

// Used is one element of the used ring.
type Used struct {
	ID, Len uint32
}

// PopUsed returns the next used element, if the device published one, and
// returns direct-chain descriptors to the free list.
func (d *Driver) PopUsed() (Used, bool) {
	if d.UsedIdx() == d.lastUsed {
		return Used{}, false
	}
	e := d.used[4+8*int(d.lastUsed%d.Size):]
	u := Used{ID: le.Uint32(e), Len: le.Uint32(e[4:])}
	d.lastUsed++
	if n, ok := d.chainLens[uint16(u.ID)]; ok && u.ID < uint32(d.Size) {
		d.freeChain(uint16(u.ID), n)
	}
	return u, true
}

func (d *Driver) freeChain(head uint16, n int) {
	delete(d.chainLens, head)
	last := head
	for k := 1; k < n; k++ {
		_, _, _, last = d.Desc(last)
	}
	a, l, f, _ := d.Desc(last)
	d.SetDesc(d.DescAddr, last, a, l, f, d.freeHead)
	d.freeHead = head
	d.numFree += n
}

// WaitCall waits up to timeoutMs for the device to signal the call
// eventfd and clears it.
func (d *Driver) WaitCall(timeoutMs int) (bool, error) {
	for {
		n, err := unix.Poll(d.pollFds, timeoutMs)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return false, err
		}
		_, err = unix.Read(d.callFd, d.readBuf[:])
		if err == unix.EAGAIN {
			return false, nil
		}
		return err == nil, err
	}
}

// CallPending reports (and clears) whether the call eventfd was signalled.
func (d *Driver) CallPending() bool {
	ok, _ := d.WaitCall(0)
	return ok
}

// CallCount returns how many times the device signalled the call eventfd
// since the last read, and clears it.
func (d *Driver) CallCount() uint64 {
	ok, _ := d.WaitCall(0)
	if !ok {
		return 0
	}
	return le.Uint64(d.readBuf[:])
}

// NewMemfdMemory returns guest memory in a shared memfd mapping, as QEMU
// provides it, and the memfd (which a test may truncate to make the memory
// fault). unmap releases the mapping.
func NewMemfdMemory(base uint64, size int) (mem *Memory, fd *os.File, unmap func(), err error) {
	n, err := unix.MemfdCreate("virtiotest-guest", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("memfd: %w", err)
	}
	f := os.NewFile(uintptr(n), "guest-memory")
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, nil, nil, fmt.Errorf("size memfd: %w", err)
	}
	b, err := unix.Mmap(n, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, nil, nil, fmt.Errorf("mmap memfd: %w", err)
	}
	return &Memory{Base: base, Buf: b}, f, func() { unix.Munmap(b); f.Close() }, nil
}

// EventfdsNonblocking reports whether the kick and call eventfds are still
// in non-blocking mode (a device must not change the mode of descriptors
// it shares with the front-end).
func (d *Driver) EventfdsNonblocking() (bool, error) {
	for _, fd := range []int{d.kickFd, d.callFd} {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil || fl&unix.O_NONBLOCK == 0 {
			return false, err
		}
	}
	return true, nil
}
