package frontend

import (
	"encoding/binary"
	"fmt"

	"github.com/thinblk/thinblk/virtio/blk"
)

// Config is the decoded virtio-blk config space (struct virtio_blk_config).
// Fields whose feature was not negotiated hold whatever the back-end put
// there.
type Config struct {
	Capacity               uint64 // sectors of 512 bytes
	SizeMax                uint32
	SegMax                 uint32
	Cylinders              uint16
	Heads, Sectors         uint8
	BlkSize                uint32
	PhysicalBlockExp       uint8
	AlignmentOffset        uint8
	MinIOSize              uint16
	OptIOSize              uint32
	Writeback              uint8
	NumQueues              uint16
	MaxDiscardSectors      uint32
	MaxDiscardSeg          uint32
	DiscardSectorAlignment uint32
	MaxWriteZeroesSectors  uint32
	MaxWriteZeroesSeg      uint32
	WriteZeroesMayUnmap    uint8
}

func decodeConfig(b []byte) Config {
	le := binary.LittleEndian
	return Config{
		Capacity:               le.Uint64(b[blk.ConfigCapacity:]),
		SizeMax:                le.Uint32(b[blk.ConfigSizeMax:]),
		SegMax:                 le.Uint32(b[blk.ConfigSegMax:]),
		Cylinders:              le.Uint16(b[blk.ConfigGeometry:]),
		Heads:                  b[blk.ConfigGeometry+2],
		Sectors:                b[blk.ConfigGeometry+3],
		BlkSize:                le.Uint32(b[blk.ConfigBlkSize:]),
		PhysicalBlockExp:       b[blk.ConfigPhysicalBlockExp],
		AlignmentOffset:        b[blk.ConfigAlignmentOffset],
		MinIOSize:              le.Uint16(b[blk.ConfigMinIOSize:]),
		OptIOSize:              le.Uint32(b[blk.ConfigOptIOSize:]),
		Writeback:              b[blk.ConfigWritebackMode],
		NumQueues:              le.Uint16(b[blk.ConfigNumQueues:]),
		MaxDiscardSectors:      le.Uint32(b[blk.ConfigMaxDiscardSectors:]),
		MaxDiscardSeg:          le.Uint32(b[blk.ConfigMaxDiscardSeg:]),
		DiscardSectorAlignment: le.Uint32(b[blk.ConfigDiscardSectorAlign:]),
		MaxWriteZeroesSectors:  le.Uint32(b[blk.ConfigMaxWriteZeroesSectors:]),
		MaxWriteZeroesSeg:      le.Uint32(b[blk.ConfigMaxWriteZeroesSeg:]),
		WriteZeroesMayUnmap:    b[blk.ConfigWriteZeroesMayUnmap],
	}
}

// StatusError is a request that completed with a status other than OK.
type StatusError struct {
	Type   uint32
	Sector uint64
	Status byte
}

func (e *StatusError) Error() string {
	name := map[byte]string{blk.StatusIOErr: "IOERR", blk.StatusUnsupp: "UNSUPP"}[e.Status]
	if name == "" {
		name = fmt.Sprintf("status %d", e.Status)
	}
	return fmt.Sprintf("virtio-blk request type %d at sector %d: %s", e.Type, e.Sector, name)
}

// maxSyncChunk bounds the data of one synchronous request.
const maxSyncChunk = 1 << 20

// nextQueue picks queues round-robin for synchronous calls.
func (d *Disk) nextQueue() *Queue {
	return d.queues[int(d.rr.Add(1)-1)%len(d.queues)]
}

// Exec runs one request built from (typ, sector, data) on the next queue
// and returns its status. data is copied to guest memory (and back for
// device-writable types). It is the building block of the synchronous
// calls; a non-OK status is returned as the status, not as an error.
func (d *Disk) Exec(typ uint32, sector uint64, data []byte) (status byte, err error) {
	q := d.nextQueue()
	r, err := q.NewReq(1)
	if err != nil {
		return 0, err
	}
	defer r.Free()
	r.Type, r.Sector, r.Indirect = typ, sector, d.opts.Indirect && d.indirect
	var buf Buffer
	if len(data) > 0 {
		if buf, err = d.mem.Alloc(uint64(len(data)), 512); err != nil {
			return 0, err
		}
		defer d.mem.Free(buf)
		copy(buf.Bytes, data)
		r.Data = []Buffer{buf}
	}
	if err := q.Do(r); err != nil {
		return 0, err
	}
	if len(data) > 0 && (typ == blk.TypeIn || typ == blk.TypeGetID) {
		copy(data, buf.Bytes)
	}
	return r.Status, nil
}

func (d *Disk) exec(typ uint32, sector uint64, data []byte) error {
	st, err := d.Exec(typ, sector, data)
	if err != nil {
		return err
	}
	if st != blk.StatusOK {
		return &StatusError{Type: typ, Sector: sector, Status: st}
	}
	return nil
}

func checkAligned(what string, n int, off int64) error {
	if off < 0 || off%blk.SectorSize != 0 || n%blk.SectorSize != 0 {
		return fmt.Errorf("%s of %d bytes at %d: not in whole sectors", what, n, off)
	}
	return nil
}

// ReadAt reads len(p) bytes at byte offset off (both multiples of 512).
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	return d.rw(blk.TypeIn, p, off)
}

// WriteAt writes p at byte offset off (both multiples of 512).
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	return d.rw(blk.TypeOut, p, off)
}

func (d *Disk) rw(typ uint32, p []byte, off int64) (int, error) {
	if err := checkAligned("I/O", len(p), off); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		n := min(len(p)-done, maxSyncChunk)
		if err := d.exec(typ, uint64(off+int64(done))/blk.SectorSize, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// Flush sends a FLUSH request.
func (d *Disk) Flush() error { return d.exec(blk.TypeFlush, 0, nil) }

// GetID returns the device ID string (up to 20 bytes, NUL-trimmed).
func (d *Disk) GetID() (string, error) {
	b := make([]byte, blk.IDBytes)
	if err := d.exec(blk.TypeGetID, 0, b); err != nil {
		return "", err
	}
	n := 0
	for n < len(b) && b[n] != 0 {
		n++
	}
	return string(b[:n]), nil
}

// DiscardSegment is one struct virtio_blk_discard_write_zeroes.
type DiscardSegment struct {
	Sector     uint64
	NumSectors uint32
	Flags      uint32
}

// EncodeSegments builds the data of a DISCARD or WRITE_ZEROES request.
func EncodeSegments(segs ...DiscardSegment) []byte {
	b := make([]byte, blk.DiscardSegmentSize*len(segs))
	for i, s := range segs {
		e := b[i*blk.DiscardSegmentSize:]
		binary.LittleEndian.PutUint64(e[0:], s.Sector)
		binary.LittleEndian.PutUint32(e[8:], s.NumSectors)
		binary.LittleEndian.PutUint32(e[12:], s.Flags)
	}
	return b
}

// Discard discards length bytes at off (multiples of 512), split into
// requests that respect the device's max_discard_sectors.
func (d *Disk) Discard(off, length int64) error {
	return d.ranged(blk.TypeDiscard, off, length, 0, d.Config().MaxDiscardSectors)
}

// WriteZeroes zeroes length bytes at off; unmap allows the device to
// release the space.
func (d *Disk) WriteZeroes(off, length int64, unmap bool) error {
	var flags uint32
	if unmap {
		flags = blk.DiscardFlagUnmap
	}
	return d.ranged(blk.TypeWriteZeroes, off, length, flags, d.Config().MaxWriteZeroesSectors)
}

func (d *Disk) ranged(typ uint32, off, length int64, flags, maxSectors uint32) error {
	if length < 0 {
		return fmt.Errorf("negative length %d", length)
	}
	if err := checkAligned("range", int(length%blk.SectorSize), off); err != nil {
		return err
	}
	if maxSectors == 0 {
		maxSectors = 1 << 22
	}
	sector := uint64(off) / blk.SectorSize
	left := uint64(length) / blk.SectorSize
	for left > 0 {
		n := min(left, uint64(maxSectors))
		seg := EncodeSegments(DiscardSegment{Sector: sector, NumSectors: uint32(n), Flags: flags})
		if err := d.exec(typ, 0, seg); err != nil {
			return err
		}
		sector += n
		left -= n
	}
	return nil
}
