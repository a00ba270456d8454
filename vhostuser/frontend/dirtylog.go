package frontend

import (
	"fmt"
	"math/bits"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/vhostuser"
)

// DirtyLog is the bitmap a live migration shares with the back-end
// (SET_LOG_BASE): one bit per 4 KiB page of guest memory, which the
// back-end sets for every page it writes while logging is on.
type DirtyLog struct {
	file *os.File
	mem  []byte // a multiple of 8 bytes
}

// StartDirtyLog does what QEMU does when a migration starts: it shares a
// new log covering guest memory (SET_LOG_BASE, whose reply it waits for),
// turns VHOST_F_LOG_ALL on and asks every ring to log its used ring
// (SET_VRING_ADDR with VHOST_VRING_F_LOG and the used ring's guest
// address), all while the rings run. A log from an earlier call is
// replaced.
func (d *Disk) StartDirtyLog() (*DirtyLog, error) {
	if d.protoFeatures&(1<<vhostuser.ProtoLogShmfd) == 0 {
		return nil, fmt.Errorf("back-end does not offer LOG_SHMFD (protocol features %#x)", d.offeredProto)
	}
	if d.offered&(1<<vhostuser.FeatureLogAll) == 0 {
		return nil, fmt.Errorf("back-end does not offer VHOST_F_LOG_ALL (features %#x)", d.offered)
	}
	// As QEMU sizes it: whole 64-bit words, one bit per page.
	pages := (d.mem.Size() + vhostuser.LogPageSize - 1) / vhostuser.LogPageSize
	size := (pages + 63) / 64 * 8
	fd, err := unix.MemfdCreate("thinblk-frontend-dirty-log", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	l := &DirtyLog{file: os.NewFile(uintptr(fd), "dirty-log")}
	if err := l.file.Truncate(int64(size)); err != nil {
		l.close()
		return nil, fmt.Errorf("size dirty log: %w", err)
	}
	if l.mem, err = unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		l.close()
		return nil, fmt.Errorf("mmap dirty log: %w", err)
	}
	if err := d.setLogBase(l, size); err != nil {
		l.close()
		return nil, err
	}
	if d.dirtyLog != nil {
		d.dirtyLog.close()
	}
	d.dirtyLog = l
	if err := d.setLogging(true); err != nil {
		return nil, err
	}
	return l, nil
}

func (d *Disk) setLogBase(l *DirtyLog, size uint64) error {
	d.ctrl.Lock()
	defer d.ctrl.Unlock()
	d.deadline()
	h := vhostuser.Header{Request: vhostuser.ReqSetLogBase}
	if err := d.conn.Write(h, vhostuser.LogBase{MmapSize: size}.Encode(), l.file); err != nil {
		return err
	}
	// The reply comes whether or not REPLY_ACK was negotiated. Its value
	// means nothing (libvhost-user echoes the size), as QEMU knows.
	_, err := d.readReply(vhostuser.ReqSetLogBase)
	return err
}

// StopDirtyLog turns logging off again (LOG_ALL and the rings' flags) as
// QEMU does when a migration ends or is cancelled. The log stays mapped
// here, so that a test can check nothing more is written to it.
func (d *Disk) StopDirtyLog() error { return d.setLogging(false) }

func (d *Disk) setLogging(on bool) error {
	features := d.features
	var flags uint32
	if on {
		features |= 1 << vhostuser.FeatureLogAll
		flags = vhostuser.VringFlagLog
	}
	if err := d.send(vhostuser.ReqSetFeatures, vhostuser.EncodeU64(features)); err != nil {
		return err
	}
	for i, q := range d.queues {
		r := q.ring
		a := vhostuser.VringAddr{
			Index:     uint32(i),
			Flags:     flags,
			DescUser:  d.mem.Base() + r.desc.Addr,
			UsedUser:  d.mem.Base() + r.used.Addr,
			AvailUser: d.mem.Base() + r.avail.Addr,
			LogGuest:  r.used.Addr,
		}
		if err := d.send(vhostuser.ReqSetVringAddr, a.Encode()); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return nil
}

// UsedRing is queue i's used ring in guest memory (what a back-end that
// logs marks on every completion).
func (d *Disk) UsedRing(i int) Buffer { return d.queues[i].ring.used }

// TakeDirty returns the pages marked since the last call, in increasing
// order, and clears them, a word at a time and atomically as QEMU does
// while the back-end keeps marking.
func (l *DirtyLog) TakeDirty() []uint64 {
	var pages []uint64
	for w := 0; w+8 <= len(l.mem); w += 8 {
		p := (*uint64)(unsafe.Pointer(&l.mem[w]))
		if atomic.LoadUint64(p) == 0 {
			continue
		}
		v := atomic.SwapUint64(p, 0)
		for v != 0 {
			b := bits.TrailingZeros64(v)
			pages = append(pages, uint64(w)*8+uint64(b))
			v &= v - 1
		}
	}
	return pages
}

func (l *DirtyLog) close() {
	if l.mem != nil {
		unix.Munmap(l.mem)
		l.mem = nil
	}
	l.file.Close()
}
