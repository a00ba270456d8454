package thin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/vio"
)

// dataFile is the pool's block store. The real one is an *os.File; the
// crash tests use an overlay that forgets unsynced writes.
type dataFile interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// WriteVAt writes bufs to consecutive bytes at off, all of them or
	// fails: one system call where one data file write used to be many.
	WriteVAt(bufs [][]byte, off int64) error
	// ZeroRange makes [off, off+n) read as zeros (keeping it allocated).
	ZeroRange(off, n int64) error
	// PunchHole makes [off, off+n) read as zeros and gives its space
	// back to the host; errors.ErrUnsupported where it cannot.
	PunchHole(off, n int64) error
	// Allocate makes the host allocate [off, off+n) without changing
	// what it reads (fallocate with KEEP_SIZE), so that later writes
	// there need no new host space; an error wrapping unix.ENOSPC when
	// the host file system cannot, errors.ErrUnsupported where it has no
	// such call.
	Allocate(off, n int64) error
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	Truncate(size int64) error
	Size() (int64, error)
	Close() error
}

type osDataFile struct {
	f          *os.File
	noZeroFast atomic.Bool // fallocate ZERO_RANGE unsupported here
	device     bool        // a block device (the pool's data file is a symlink to it)
}

func openOSDataFile(path string, create bool) (dataFile, error) {
	flag := os.O_RDWR
	if create {
		flag |= os.O_CREATE | os.O_EXCL
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeDevice != 0 {
			flag = os.O_RDWR // Create linked it to a block device
		}
	}
	f, err := os.OpenFile(path, flag, 0o600)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &osDataFile{f: f, device: fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0}, nil
}

// isDevice reports whether the data is a block device: all of its space
// is the pool's, so the host cannot run out under it.
func (d *osDataFile) isDevice() bool { return d.device }

// fd is the file's descriptor, for I/O submitted to the kernel directly
// (io_uring; see async.go).
func (d *osDataFile) fd() int { return int(d.f.Fd()) }

func (d *osDataFile) ReadAt(p []byte, off int64) (int, error)  { return d.f.ReadAt(p, off) }
func (d *osDataFile) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }
func (d *osDataFile) Close() error                             { return d.f.Close() }

// Truncate sets a file's size; a block device keeps its size, which must
// be enough.
func (d *osDataFile) Truncate(size int64) error {
	if !d.device {
		return d.f.Truncate(size)
	}
	have, err := d.Size()
	if err != nil {
		return err
	}
	if have < size {
		return fmt.Errorf("block device %s has %d bytes, the pool needs %d: %w", d.f.Name(), have, size, ErrInvalid)
	}
	return nil
}

func (d *osDataFile) WriteVAt(bufs [][]byte, off int64) error {
	err := vio.Vectored(bufs, off, func(iov [][]byte, off int64) (int, error) {
		return unix.Pwritev(int(d.f.Fd()), iov, off)
	}, false)
	if err != nil {
		return fmt.Errorf("write %s at %d: %w", d.f.Name(), off, err)
	}
	return nil
}

func (d *osDataFile) Sync() error {
	for {
		err := unix.Fdatasync(int(d.f.Fd()))
		if err != unix.EINTR {
			if err != nil {
				return fmt.Errorf("fdatasync %s: %w", d.f.Name(), err)
			}
			return nil
		}
	}
}

// hostBytes is the space the file takes on its file system.
func (d *osDataFile) hostBytes() (uint64, error) {
	if d.device {
		return 0, errors.ErrUnsupported
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(d.f.Fd()), &st); err != nil {
		return 0, err
	}
	return uint64(st.Blocks) * 512, nil
}

func (d *osDataFile) Size() (int64, error) {
	if d.device {
		var n uint64
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, d.f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); e != 0 {
			return 0, fmt.Errorf("size of block device %s: %w", d.f.Name(), e)
		}
		return int64(n), nil
	}
	fi, err := d.f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// PunchHole on a block device is the kernel's zero-out by unmapping
// (fallocate PUNCH_HOLE on a block device: BLKZEROOUT without fallback),
// so the blocks read as zeros and the device (a thin LV, a loop device's
// sparse file) gets the discard; a device that cannot gets
// errors.ErrUnsupported, and the pool stops punching.
func (d *osDataFile) PunchHole(off, n int64) error {
	for {
		err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		switch {
		case err == nil:
			return nil
		case err == unix.EINTR:
			continue
		case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS):
			return fmt.Errorf("punch hole in %s: %w (%w)", d.f.Name(), errors.ErrUnsupported, err)
		default:
			return fmt.Errorf("punch hole in %s: %w", d.f.Name(), err)
		}
	}
}

func (d *osDataFile) Allocate(off, n int64) error {
	if d.device {
		return nil // a device's blocks are its own
	}
	for {
		err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_KEEP_SIZE, off, n)
		switch {
		case err == nil:
			return nil
		case err == unix.EINTR:
			continue
		case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS):
			return fmt.Errorf("allocate %d+%d in %s: %w (%w)", off, n, d.f.Name(), errors.ErrUnsupported, err)
		default:
			return fmt.Errorf("allocate %d+%d in %s: %w", off, n, d.f.Name(), err)
		}
	}
}

// hostFree is the space left on the data file's file system for this
// process (statfs: available blocks, or free blocks for root, who may use
// the reserved ones), and its total size.
func (d *osDataFile) hostFree() (free, total uint64, err error) {
	if d.device {
		return 0, 0, errors.ErrUnsupported
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(d.f.Fd()), &st); err != nil {
		return 0, 0, err
	}
	free = statfsFree(&st)
	if os.Geteuid() == 0 {
		free -= min(free, ext4Reserved(int(d.f.Fd()), &st))
	}
	return free, st.Blocks * uint64(st.Bsize), nil
}

// statfsFree is the space a file system has left for this process.
func statfsFree(st *unix.Statfs_t) uint64 {
	if os.Geteuid() == 0 {
		return st.Bfree * uint64(st.Bsize) // root may use the reserved blocks
	}
	return st.Bavail * uint64(st.Bsize)
}

// ext4Reserved is the space ext4 keeps back from every file, root's
// included: its reserved clusters (2% of the file system, at most 4096
// clusters: 16 MiB of 4 KiB blocks), which statfs counts in the free
// blocks. Without it a full ext4 looks to root like one with space, and a
// request waiting for host space would wake, fail and wait again for
// ever, flapping the out-of-space events. 0 on other file systems or when
// sysfs does not say (bigalloc, whose clusters are larger than blocks, is
// under-counted).
func ext4Reserved(fd int, st *unix.Statfs_t) uint64 {
	if st.Type != unix.EXT4_SUPER_MAGIC {
		return 0
	}
	var fst unix.Stat_t
	if unix.Fstat(fd, &fst) != nil {
		return 0
	}
	dev, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(fst.Dev), unix.Minor(fst.Dev)))
	if err != nil {
		return 0
	}
	b, err := os.ReadFile("/sys/fs/ext4/" + filepath.Base(dev) + "/reserved_clusters")
	if err != nil {
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0
	}
	return n * uint64(st.Bsize)
}

// fsIocFiemap is FS_IOC_FIEMAP (_IOWR('f', 11, struct fiemap)).
const fsIocFiemap = 0xC020660B

// hostAllocated reports whether every byte of [off, off+n) is allocated
// on the host (FIEMAP; unwritten extents count), errors.ErrUnsupported
// where the file system has no FIEMAP (tmpfs).
func (d *osDataFile) hostAllocated(off, n int64) (bool, error) {
	const extents = 32
	const extSize = 56
	buf := make([]byte, 32+extents*extSize)
	pos, end := off, off+n
	for pos < end {
		clear(buf)
		binary.NativeEndian.PutUint64(buf[0:], uint64(pos))
		binary.NativeEndian.PutUint64(buf[8:], uint64(end-pos))
		binary.NativeEndian.PutUint32(buf[24:], extents)
		_, _, e := unix.Syscall(unix.SYS_IOCTL, d.f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0])))
		if e != 0 {
			if e == unix.EOPNOTSUPP || e == unix.ENOTTY {
				return false, fmt.Errorf("fiemap %s: %w (%w)", d.f.Name(), errors.ErrUnsupported, e)
			}
			return false, fmt.Errorf("fiemap %s: %w", d.f.Name(), e)
		}
		mapped := binary.NativeEndian.Uint32(buf[20:])
		if mapped == 0 {
			return false, nil
		}
		for i := range int(mapped) {
			x := buf[32+i*extSize:]
			logical, length := int64(binary.NativeEndian.Uint64(x[0:])), int64(binary.NativeEndian.Uint64(x[16:]))
			if logical > pos {
				return false, nil // a hole before this extent
			}
			pos = max(pos, logical+length)
			if pos >= end {
				return true, nil
			}
		}
	}
	return true, nil
}

var zeroBlock = make([]byte, 1<<20)

func (d *osDataFile) ZeroRange(off, n int64) error {
	if !d.noZeroFast.Load() {
		err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("zero range of %s: %w", d.f.Name(), err)
		}
		d.noZeroFast.Store(true)
	}
	return writeZeros(d.f, off, n)
}

func writeZeros(w interface {
	WriteAt([]byte, int64) (int, error)
}, off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroBlock)))
		if _, err := w.WriteAt(zeroBlock[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}
