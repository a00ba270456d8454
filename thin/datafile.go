package thin

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

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
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	Truncate(size int64) error
	Size() (int64, error)
	Close() error
}

type osDataFile struct {
	f          *os.File
	noZeroFast atomic.Bool // fallocate ZERO_RANGE unsupported here
}

func openOSDataFile(path string, create bool) (dataFile, error) {
	flag := os.O_RDWR
	if create {
		flag |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(path, flag, 0o600)
	if err != nil {
		return nil, err
	}
	return &osDataFile{f: f}, nil
}

// fd is the file's descriptor, for I/O submitted to the kernel directly
// (io_uring; see async.go).
func (d *osDataFile) fd() int { return int(d.f.Fd()) }

func (d *osDataFile) ReadAt(p []byte, off int64) (int, error)  { return d.f.ReadAt(p, off) }
func (d *osDataFile) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }
func (d *osDataFile) Close() error                             { return d.f.Close() }
func (d *osDataFile) Truncate(size int64) error                { return d.f.Truncate(size) }

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
	var st unix.Stat_t
	if err := unix.Fstat(int(d.f.Fd()), &st); err != nil {
		return 0, err
	}
	return uint64(st.Blocks) * 512, nil
}

func (d *osDataFile) Size() (int64, error) {
	fi, err := d.f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

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
