// Package rawdisk is a blockdev.Storage over a raw image file or block device:
// vectored pread/pwrite, fdatasync for FLUSH, punch-hole for DISCARD and
// WRITE_ZEROES with unmap, zero-range for WRITE_ZEROES without unmap.
//
// Where the kernel allows io_uring (checked once, at Open), the disk is
// also a blockdev.AsyncStorage: each virtqueue gets its own ring, filled and
// submitted in batches by the queue's runner and drained by one reaper
// goroutine (READV, WRITEV, FSYNC with DATASYNC). A synchronous system
// call per request costs a goroutine and, for blocking I/O, an OS thread
// hand-off; the ring costs one submit per batch and one wake-up per batch
// of completions. Without io_uring (ENOSYS, EPERM, Options.NoUring) every
// request takes the synchronous path.
package rawdisk

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/vio"
)

// Options control how the image is opened.
type Options struct {
	ReadOnly bool
	// Direct opens the image with O_DIRECT (bypassing the host page
	// cache). Buffers must then be aligned to the device's logical block
	// size, which guest memory pages are.
	Direct bool
	// NoUring serves every request with synchronous system calls, even
	// where io_uring is available.
	NoUring bool
}

// Disk is an open raw image. It is safe for concurrent use: every call is a
// positioned system call.
type Disk struct {
	f        *os.File
	fd       int
	uringErr error // why OpenQueue is unavailable, or nil
	size     uint64
	readOnly bool
	direct   bool
	isBlock  bool
	geometry blockdev.Geometry
}

var _ blockdev.Storage = (*Disk)(nil)
var _ blockdev.GeometryReporter = (*Disk)(nil)

// ErrReadOnly is returned for writes to a read-only disk.
var ErrReadOnly = errors.New("read-only disk")

// Open opens a raw image file or block device. The capacity is the file's
// size rounded down to whole 512-byte sectors; an image smaller than one
// sector is refused.
func Open(path string, opts Options) (*Disk, error) {
	flags := unix.O_RDWR
	if opts.ReadOnly {
		flags = unix.O_RDONLY
	}
	if opts.Direct {
		flags |= unix.O_DIRECT
	}
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open raw image: %w", err)
	}
	d := &Disk{f: f, fd: int(f.Fd()), readOnly: opts.ReadOnly, direct: opts.Direct}
	if err := d.probe(); err != nil {
		f.Close()
		return nil, fmt.Errorf("open raw image %s: %w", path, err)
	}
	if opts.NoUring {
		d.uringErr = errors.New("disabled by option")
	} else {
		// Decided once, here: ENOSYS (old kernel), EPERM (seccomp,
		// io_uring_disabled) and the like mean the synchronous path.
		d.uringErr = probeUring()
	}
	return d, nil
}

func (d *Disk) probe() error {
	var st unix.Stat_t
	if err := unix.Fstat(int(d.f.Fd()), &st); err != nil {
		return err
	}
	var size uint64
	physical := uint32(4096)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		size = uint64(st.Size)
		if st.Blksize > 0 && st.Blksize <= 1<<20 {
			physical = uint32(st.Blksize)
		}
	case unix.S_IFBLK:
		d.isBlock = true
		n, err := blockDeviceSize(int(d.f.Fd()))
		if err != nil {
			return fmt.Errorf("block device size: %w", err)
		}
		size = n
		if p, err := unix.IoctlGetUint32(int(d.f.Fd()), unix.BLKPBSZGET); err == nil && p >= 512 {
			physical = p
		}
	default:
		return errors.New("not a regular file or block device")
	}
	size &^= blockdev.SectorSize - 1
	if size == 0 {
		return errors.New("image is smaller than one 512-byte sector")
	}
	d.size = size
	d.geometry = blockdev.Geometry{
		LogicalBlockSize:   blockdev.SectorSize,
		PhysicalBlockSize:  physical,
		DiscardGranularity: physical,
	}
	return nil
}

// Uring reports whether OpenQueue serves requests through io_uring, and if
// not, why.
func (d *Disk) Uring() (bool, error) { return d.uringErr == nil, d.uringErr }

// Close closes the image. Queues from OpenQueue must be closed first.
func (d *Disk) Close() error { return d.f.Close() }

// Size is the capacity in bytes.
func (d *Disk) Size() uint64 { return d.size }

// Geometry reports block sizes for the device's config space.
func (d *Disk) Geometry() blockdev.Geometry { return d.geometry }

// ReadAt reads consecutive bytes at off into bufs.
func (d *Disk) ReadAt(bufs [][]byte, off int64) error {
	return vio.Vectored(bufs, off, func(iov [][]byte, off int64) (int, error) {
		return unix.Preadv(int(d.f.Fd()), iov, off)
	}, true)
}

// WriteAt writes bufs to consecutive bytes at off.
func (d *Disk) WriteAt(bufs [][]byte, off int64) error {
	if d.readOnly {
		return ErrReadOnly
	}
	return vio.Vectored(bufs, off, func(iov [][]byte, off int64) (int, error) {
		return unix.Pwritev(int(d.f.Fd()), iov, off)
	}, false)
}

// Flush makes completed writes durable.
func (d *Disk) Flush() error {
	if d.readOnly {
		return nil
	}
	for {
		err := unix.Fdatasync(int(d.f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}

// Discard releases [off, off+length); it reads as zeros afterwards.
func (d *Disk) Discard(off, length int64) error {
	return d.WriteZeroes(off, length, true)
}

// WriteZeroes zeroes [off, off+length). With unmap the space is released
// (punch hole, BLKDISCARD-then-zero on devices); without it the range
// stays allocated (zero range, BLKZEROOUT).
func (d *Disk) WriteZeroes(off, length int64, unmap bool) error {
	if d.readOnly {
		return ErrReadOnly
	}
	if length == 0 {
		return nil
	}
	fd := int(d.f.Fd())
	if d.isBlock {
		// BLKZEROOUT guarantees zeros; the kernel may unmap when the
		// device supports it. BLKDISCARD alone does not guarantee zeros.
		r := [2]uint64{uint64(off), uint64(length)}
		return ioctlRange(fd, unix.BLKZEROOUT, &r)
	}
	mode := uint32(unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_ZERO_RANGE)
	if unmap {
		mode = unix.FALLOC_FL_KEEP_SIZE | unix.FALLOC_FL_PUNCH_HOLE
	}
	err := fallocate(fd, mode, off, length)
	if err == unix.EOPNOTSUPP || err == unix.ENOSYS {
		// File systems without these modes: write zeros for real.
		return d.writeZeroBuffers(off, length)
	}
	return err
}

func fallocate(fd int, mode uint32, off, length int64) error {
	for {
		err := unix.Fallocate(fd, mode, off, length)
		if err != unix.EINTR {
			return err
		}
	}
}

var zeroChunk = make([]byte, 1<<20)

func (d *Disk) writeZeroBuffers(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroChunk)))
		if err := d.WriteAt([][]byte{zeroChunk[:n]}, off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}
