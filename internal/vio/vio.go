// Package vio does positioned vectored I/O to the end, for the raw disk
// and the thin pool's data file.
package vio

import (
	"io"

	"golang.org/x/sys/unix"
)

// MaxIOV is IOV_MAX, the most buffers one preadv or pwritev takes.
const MaxIOV = 1024

// Vectored repeats a positioned vectored call (preadv, pwritev) until
// every buffer is done, since the kernel may transfer less than asked
// (signals, IOV_MAX). isRead picks the error for a call that transfers
// nothing: io.ErrUnexpectedEOF or io.ErrShortWrite.
func Vectored(bufs [][]byte, off int64, op func([][]byte, int64) (int, error), isRead bool) error {
	// Skip leading empty buffers without copying the slice header array:
	// the common case (one pass, everything transferred) must not allocate.
	for len(bufs) > 0 {
		if len(bufs[0]) == 0 {
			bufs = bufs[1:]
			continue
		}
		iov := bufs
		if len(iov) > MaxIOV {
			iov = iov[:MaxIOV]
		}
		n, err := op(iov, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			if isRead {
				return io.ErrUnexpectedEOF
			}
			return io.ErrShortWrite
		}
		off += int64(n)
		c := NewCursor(bufs)
		c.Skip(int64(n))
		bufs = c.Rest()
	}
	return nil
}
