package blk

import (
	"errors"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/virtio"
)

// typeBarrier is the legacy barrier bit of the request type, ignored as
// QEMU does.
const typeBarrier = 1 << 31

// serve executes one request and returns the number of bytes written to
// the chain's writable buffers (the used element's length) and the status
// it completes with; r.op and r.n say what it was, for the statistics.
//
// The layout is free (VIRTIO_F_ANY_LAYOUT): the header is the first 16
// readable bytes, the status the last writable byte; for reads the data is
// every writable byte before the status, for writes every readable byte
// after the header.
//
// withdrawn reports a request given up while it waited (blockdev.ErrWithdrawn): it
// has no status and must not be completed.
func (d *Device) serve(c *virtio.Chain, r *request) (written uint32, st byte, withdrawn bool) {
	r.op, r.n = OpOther, 0
	status := statusByte(c)
	if c.Err != nil {
		d.logRequestError("malformed descriptor chain", "head", c.Head, "err", c.Err)
		if status == nil {
			return 0, StatusIOErr, false
		}
		// Best effort: the last writable byte is where a well-formed
		// request keeps its status.
		*status = StatusIOErr
		return 1, StatusIOErr, false
	}
	if status == nil {
		d.logRequestError("request without a writable status byte", "head", c.Head)
		return 0, StatusIOErr, false
	}
	if c.ReadLen < RequestHeaderSize {
		d.logRequestError("request header too short", "head", c.Head, "bytes", c.ReadLen)
		*status = StatusIOErr
		return 1, StatusIOErr, false
	}
	var hdr [RequestHeaderSize]byte
	gather(hdr[:], c.Readable, 0)
	typ := le.Uint32(hdr[0:]) &^ typeBarrier
	sector := le.Uint64(hdr[8:])

	r.op = opOf(typ)
	st, n := d.execute(c, r, typ, sector)
	clear(r.bufs)
	r.bufs = r.bufs[:0]
	if st == statusWithdrawn {
		return 0, st, true
	}
	*status = st
	return uint32(n) + 1, st, false
}

// statusWithdrawn is execute's answer for a withdrawn request; never
// written to a driver.
const statusWithdrawn = 0xff

// startAsync starts a read, write or flush on aq and returns true, or
// returns false for requests the workers serve synchronously: every other
// type, anything malformed or out of range (the synchronous path reports
// those), writes while the write cache is off, and whatever aq declines.
func (d *Device) startAsync(aq blockdev.AsyncQueue, c *virtio.Chain, r *request) bool {
	if c.Err != nil || len(c.Writable) == 0 || c.ReadLen < RequestHeaderSize {
		return false
	}
	var hdr [RequestHeaderSize]byte
	gather(hdr[:], c.Readable, 0)
	typ := le.Uint32(hdr[0:]) &^ typeBarrier
	sector := le.Uint64(hdr[8:])
	off := int64(sector * SectorSize)
	// Set before the request starts: it may complete at once.
	r.typ, r.status = typ, statusByte(c)
	var err error
	switch typ {
	case TypeIn:
		length := c.WriteLen - 1
		if length == 0 || length > maxRequestBytes || !d.rangeOK(sector, length) {
			return false
		}
		r.bufs = writableData(r.bufs, c)
		r.written = uint32(length) + 1
		r.op, r.n = OpRead, length
		err = aq.ReadAt(c.Head, r.bufs, off)
	case TypeOut:
		length := c.ReadLen - RequestHeaderSize
		if d.opts.ReadOnly || !d.writeback.Load() || length == 0 || length > maxRequestBytes || !d.rangeOK(sector, length) {
			return false
		}
		r.bufs = readableData(r.bufs, c)
		r.written = 1
		r.op, r.n = OpWrite, length
		err = aq.WriteAt(c.Head, r.bufs, off)
	case TypeFlush:
		r.written = 1
		r.op, r.n = OpFlush, 0
		err = aq.Flush(c.Head)
	default:
		return false
	}
	if err != nil {
		clear(r.bufs)
		r.bufs = r.bufs[:0]
		r.status = nil
		return false
	}
	return true
}

// execute runs a parsed request and returns its status and the number of
// data bytes written to the driver's buffers.
func (d *Device) execute(c *virtio.Chain, r *request, typ uint32, sector uint64) (byte, uint64) {
	switch typ {
	case TypeIn:
		length := c.WriteLen - 1
		if length > maxRequestBytes || !d.rangeOK(sector, length) {
			return StatusIOErr, 0
		}
		if length == 0 {
			return StatusOK, 0
		}
		r.bufs = writableData(r.bufs, c)
		if err := d.storage.ReadAt(r.bufs, int64(sector*SectorSize)); err != nil {
			d.logRequestError("read failed", "sector", sector, "bytes", length, "err", err)
			return StatusIOErr, 0
		}
		r.n = length
		return StatusOK, length

	case TypeOut:
		length := c.ReadLen - RequestHeaderSize
		if d.opts.ReadOnly || length > maxRequestBytes || !d.rangeOK(sector, length) {
			return StatusIOErr, 0
		}
		if length == 0 {
			return StatusOK, 0
		}
		r.bufs = readableData(r.bufs, c)
		var err error
		if ws, ok := d.storage.(blockdev.WithdrawableStorage); ok && r.withdraw != nil {
			err = ws.WriteAtOrWithdraw(r.bufs, int64(sector*SectorSize), r.withdraw)
		} else {
			err = d.storage.WriteAt(r.bufs, int64(sector*SectorSize))
		}
		if errors.Is(err, blockdev.ErrWithdrawn) {
			return statusWithdrawn, 0
		}
		if err != nil {
			d.logRequestError("write failed", "sector", sector, "bytes", length, "err", err)
			return StatusIOErr, 0
		}
		r.n = length
		return d.writeThrough(), 0

	case TypeFlush:
		if err := d.storage.Flush(); err != nil {
			d.logRequestError("flush failed", "err", err)
			return StatusIOErr, 0
		}
		return StatusOK, 0

	case TypeGetID:
		n := min(c.WriteLen-1, IDBytes)
		var id [IDBytes]byte
		copy(id[:], d.opts.Serial)
		r.bufs = writableData(r.bufs, c)
		scatter(r.bufs, id[:n])
		r.n = n
		return StatusOK, n

	case TypeDiscard, TypeWriteZeroes:
		if d.opts.ReadOnly {
			return StatusIOErr, 0
		}
		st, n := d.discardWriteZeroes(c, r, typ)
		r.n = n
		return st, 0

	default:
		return StatusUnsupp, 0
	}
}

// discardWriteZeroes checks and runs a DISCARD or WRITE_ZEROES request,
// in QEMU's order of checks (block/export/virtio-blk-handler.c), and
// returns its status and, when it succeeded, the bytes of its range.
func (d *Device) discardWriteZeroes(c *virtio.Chain, r *request, typ uint32) (byte, uint64) {
	length := c.ReadLen - RequestHeaderSize
	if length > DiscardSegmentSize { // more segments than max_*_seg (1)
		return StatusUnsupp, 0
	}
	if length < DiscardSegmentSize {
		return StatusIOErr, 0
	}
	var seg [DiscardSegmentSize]byte
	gather(seg[:], c.Readable, RequestHeaderSize)
	sector := le.Uint64(seg[0:])
	sectors := le.Uint32(seg[8:])
	flags := le.Uint32(seg[12:])
	limit := d.opts.MaxDiscardSectors
	if typ == TypeWriteZeroes {
		limit = d.opts.MaxWriteZeroesSectors
	}
	if sectors > limit || !d.rangeOK(sector, uint64(sectors)*SectorSize) {
		return StatusIOErr, 0
	}
	if flags&^DiscardFlagUnmap != 0 {
		return StatusUnsupp, 0
	}
	if sectors == 0 {
		return StatusOK, 0
	}
	off, n := int64(sector*SectorSize), int64(sectors)*SectorSize
	if typ == TypeDiscard {
		if flags&DiscardFlagUnmap != 0 { // the spec reserves unmap for write zeroes
			return StatusUnsupp, 0
		}
		if err := d.storage.Discard(off, n); err != nil {
			d.logRequestError("discard failed", "sector", sector, "sectors", sectors, "err", err)
			return errorStatus(err), 0
		}
		return StatusOK, uint64(n)
	}
	unmap := flags&DiscardFlagUnmap != 0
	var err error
	if ws, ok := d.storage.(blockdev.WithdrawableStorage); ok && r.withdraw != nil {
		err = ws.WriteZeroesOrWithdraw(off, n, unmap, r.withdraw)
	} else {
		err = d.storage.WriteZeroes(off, n, unmap)
	}
	if errors.Is(err, blockdev.ErrWithdrawn) {
		return statusWithdrawn, 0
	}
	if err != nil {
		d.logRequestError("write zeroes failed", "sector", sector, "sectors", sectors, "unmap", unmap, "err", err)
		return errorStatus(err), 0
	}
	return d.writeThrough(), uint64(n)
}

// errorStatus maps a discard or write zeroes failure to a status: storage
// that cannot do it at all (errors.ErrUnsupported) says so, so that the
// guest stops asking; anything else is an I/O error.
func errorStatus(err error) byte {
	if errors.Is(err, errors.ErrUnsupported) {
		return StatusUnsupp
	}
	return StatusIOErr
}

// writeThrough flushes after a write when the driver disabled the write
// cache.
func (d *Device) writeThrough() byte {
	if d.writeback.Load() {
		return StatusOK
	}
	if err := d.storage.Flush(); err != nil {
		d.logRequestError("write-through flush failed", "err", err)
		return StatusIOErr
	}
	return StatusOK
}

// rangeOK checks length bytes at sector: whole sectors, aligned to the
// logical block, inside the capacity.
func (d *Device) rangeOK(sector, length uint64) bool {
	if length%SectorSize != 0 {
		return false
	}
	if sector%d.sectorsPerBlock != 0 {
		return false
	}
	total := d.storage.Size() / SectorSize
	return sector <= total && length/SectorSize <= total-sector
}

// statusByte returns the last writable byte of the chain, or nil.
func statusByte(c *virtio.Chain) *byte {
	if len(c.Writable) == 0 {
		return nil
	}
	last := c.Writable[len(c.Writable)-1]
	return &last[len(last)-1]
}

// writableData appends the writable buffers minus the status byte to dst.
func writableData(dst [][]byte, c *virtio.Chain) [][]byte {
	w := c.Writable
	dst = append(dst, w...)
	last := dst[len(dst)-1]
	if len(last) == 1 {
		return dst[:len(dst)-1]
	}
	dst[len(dst)-1] = last[:len(last)-1]
	return dst
}

// readableData appends the readable buffers after the header to dst.
func readableData(dst [][]byte, c *virtio.Chain) [][]byte {
	skip := RequestHeaderSize
	for _, b := range c.Readable {
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		dst = append(dst, b[skip:])
		skip = 0
	}
	return dst
}

// gather copies len(dst) bytes from segs, starting at byte off, into dst.
// The caller has checked that segs hold enough bytes.
func gather(dst []byte, segs [][]byte, off int) {
	for _, b := range segs {
		if len(dst) == 0 {
			return
		}
		if off >= len(b) {
			off -= len(b)
			continue
		}
		n := copy(dst, b[off:])
		dst, off = dst[n:], 0
	}
}

// scatter copies src into consecutive bytes of bufs.
func scatter(bufs [][]byte, src []byte) {
	for _, b := range bufs {
		if len(src) == 0 {
			return
		}
		n := copy(b, src)
		src = src[n:]
	}
}
