// Package stream is the format of thinblk's send/receive streams: a
// snapshot's blocks (all of them, or those changed since an older
// snapshot of the same lineage) as a sequence of checksummed records. It
// knows bytes and block ranges only, not pools: package thin produces and
// applies streams over any io.Writer / io.Reader (a pipe, ssh, a socket).
//
// # Format (version 1)
//
// A stream is the 8 bytes "THINBLKS", a 2-byte big-endian version, then
// records. Every record is
//
//	type(1) seq(8) length(4) payload(length) crc32c(4)
//
// integers big-endian; seq counts records from 0; the CRC-32C (Castagnoli)
// covers type, seq, length and payload. Records, in this order:
//
//	'H' header   flags(1: bit 0 incremental) block-size(4) volume-size(8)
//	             id(16) base-id(16) data-blocks(8) provision-blocks(8)
//	             discard-blocks(8) provisioned-data-blocks(8) name-len(1) name
//	             base-len(1) base-name
//	'D' data     first-block(8) count(4) flags(1: bit 0 provisioned) bytes:
//	             the blocks' contents (the last block of the volume may be
//	             short: the volume size is a multiple of 512)
//	'P' provision first-block(8) count(8): provisioned, not written (reads zeros)
//	'Z' discard  first-block(8) count(8): no data, not provisioned (reads zeros)
//	'E' end      records-before(8) data-blocks(8) provision-blocks(8) discard-blocks(8)
//
// Block ranges are in strictly increasing order and never overlap; they
// lie inside the volume; their totals match the header's counts, which
// is what lets a receiver reserve the space up front. Nothing may follow
// the end record. A reader checks all of it and reports the first
// violation (truncation, checksum, order, counts) as ErrBadStream with the
// record it found it in.
package stream

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
)

// Version is the format version written; readers refuse others.
const Version = 1

// magic opens every stream.
const magic = "THINBLKS"

// Record types.
const (
	TypeHeader    byte = 'H'
	TypeData      byte = 'D'
	TypeProvision byte = 'P'
	TypeDiscard   byte = 'Z'
	TypeEnd       byte = 'E'
)

// TypeName names a record type for errors.
func TypeName(t byte) string {
	switch t {
	case TypeHeader:
		return "header"
	case TypeData:
		return "data"
	case TypeProvision:
		return "provision"
	case TypeDiscard:
		return "discard"
	case TypeEnd:
		return "end"
	}
	return fmt.Sprintf("unknown type 0x%02x", t)
}

const (
	frameHead = 1 + 8 + 4
	frameTail = 4
	// MaxData bounds one data record's bytes; a writer puts at most
	// max(1, 1 MiB / block size) blocks in one.
	MaxData      = 16 << 20
	maxHeader    = 128
	dataHead     = 8 + 4 + 1
	rangeLen     = 8 + 8
	endLen       = 4 * 8
	maxNameLen   = 255
	runBytes     = 1 << 20
	minBlockSize = 4096
	maxBlockSize = 16 << 20
)

// ErrBadStream is what every malformed, truncated or corrupted stream
// fails with (errors.Is); the message says where and what.
var ErrBadStream = errors.New("bad thinblk stream")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ID identifies a snapshot's contents (see thin's send/receive).
type ID [16]byte

// IsZero reports whether no id was given.
func (id ID) IsZero() bool { return id == ID{} }

func (id ID) String() string { return fmt.Sprintf("%x", id[:]) }

// Header describes a stream: which snapshot it carries, on top of which
// base (incremental), and how much of each kind of record follows.
type Header struct {
	Incremental bool
	BlockSize   uint32
	VolumeSize  uint64 // bytes, a positive multiple of 512
	Name        string // the snapshot's name
	ID          ID     // the snapshot's id
	BaseName    string // incremental: the base snapshot's name
	BaseID      ID     // incremental: the base snapshot's id
	// Block totals of the data, provision and discard records.
	DataBlocks, ProvisionBlocks, DiscardBlocks uint64
	// ProvisionedDataBlocks are the data blocks that are provisioned too:
	// once snapshotted, each needs a block reserved for its copy-on-write.
	ProvisionedDataBlocks uint64
}

// Blocks is the volume's size in blocks (the last one may be partial).
func (h *Header) Blocks() uint64 {
	return (h.VolumeSize + uint64(h.BlockSize) - 1) / uint64(h.BlockSize)
}

// DataBytes is how many bytes of block contents the stream carries, at
// most (the volume's last block may be short).
func (h *Header) DataBytes() uint64 { return h.DataBlocks * uint64(h.BlockSize) }

// RunBlocks is how many blocks a writer puts in one data record.
func (h *Header) RunBlocks() uint64 { return max(1, runBytes/uint64(h.BlockSize)) }

// blockBytes is the length of count blocks from first (the volume's last
// block may be short).
func (h *Header) blockBytes(first, count uint64) uint64 {
	end := min((first+count)*uint64(h.BlockSize), h.VolumeSize)
	return end - first*uint64(h.BlockSize)
}

func (h *Header) validate() error {
	switch {
	case h.BlockSize < minBlockSize || h.BlockSize > maxBlockSize || h.BlockSize&(h.BlockSize-1) != 0:
		return fmt.Errorf("block size %d is not a power of two from 4 KiB to 16 MiB", h.BlockSize)
	case h.VolumeSize == 0 || h.VolumeSize%512 != 0 || h.VolumeSize > math.MaxInt64/2:
		return fmt.Errorf("volume size %d is not a positive multiple of 512", h.VolumeSize)
	case h.Name == "" || len(h.Name) > maxNameLen || len(h.BaseName) > maxNameLen:
		return fmt.Errorf("snapshot name %q / base %q: empty or too long", h.Name, h.BaseName)
	case h.ID.IsZero():
		return errors.New("snapshot id missing")
	case h.Incremental != !h.BaseID.IsZero() || h.Incremental != (h.BaseName != ""):
		return errors.New("base id and name must be given exactly for an incremental stream")
	}
	n := h.Blocks()
	if h.ProvisionedDataBlocks > h.DataBlocks {
		return fmt.Errorf("%d provisioned data blocks of %d data blocks", h.ProvisionedDataBlocks, h.DataBlocks)
	}
	if h.DataBlocks > n || h.ProvisionBlocks > n-h.DataBlocks || h.DiscardBlocks > n-h.DataBlocks-h.ProvisionBlocks {
		return fmt.Errorf("block counts %d data + %d provision + %d discard exceed the volume's %d blocks",
			h.DataBlocks, h.ProvisionBlocks, h.DiscardBlocks, n)
	}
	return nil
}

func (h *Header) marshal() []byte {
	b := make([]byte, 0, maxHeader+2*maxNameLen)
	var flags byte
	if h.Incremental {
		flags = 1
	}
	b = append(b, flags)
	b = binary.BigEndian.AppendUint32(b, h.BlockSize)
	b = binary.BigEndian.AppendUint64(b, h.VolumeSize)
	b = append(b, h.ID[:]...)
	b = append(b, h.BaseID[:]...)
	b = binary.BigEndian.AppendUint64(b, h.DataBlocks)
	b = binary.BigEndian.AppendUint64(b, h.ProvisionBlocks)
	b = binary.BigEndian.AppendUint64(b, h.DiscardBlocks)
	b = binary.BigEndian.AppendUint64(b, h.ProvisionedDataBlocks)
	b = append(b, byte(len(h.Name)))
	b = append(b, h.Name...)
	b = append(b, byte(len(h.BaseName)))
	b = append(b, h.BaseName...)
	return b
}

const headerFixed = 1 + 4 + 8 + 16 + 16 + 4*8

func unmarshalHeader(b []byte) (Header, error) {
	var h Header
	if len(b) < headerFixed+2 {
		return h, errors.New("header too short")
	}
	if b[0]&^1 != 0 {
		return h, fmt.Errorf("unknown header flags 0x%02x", b[0])
	}
	h.Incremental = b[0]&1 != 0
	h.BlockSize = binary.BigEndian.Uint32(b[1:])
	h.VolumeSize = binary.BigEndian.Uint64(b[5:])
	copy(h.ID[:], b[13:29])
	copy(h.BaseID[:], b[29:45])
	h.DataBlocks = binary.BigEndian.Uint64(b[45:])
	h.ProvisionBlocks = binary.BigEndian.Uint64(b[53:])
	h.DiscardBlocks = binary.BigEndian.Uint64(b[61:])
	h.ProvisionedDataBlocks = binary.BigEndian.Uint64(b[69:])
	rest := b[headerFixed:]
	name := func() (string, bool) {
		if len(rest) < 1 || len(rest) < 1+int(rest[0]) {
			return "", false
		}
		s := string(rest[1 : 1+int(rest[0])])
		rest = rest[1+int(rest[0]):]
		return s, true
	}
	var ok1, ok2 bool
	h.Name, ok1 = name()
	h.BaseName, ok2 = name()
	if !ok1 || !ok2 || len(rest) != 0 {
		return h, errors.New("header names malformed")
	}
	return h, h.validate()
}

// Record is one record after the header. Data aliases the reader's
// buffer until the next call to Next.
type Record struct {
	Type        byte
	First       uint64 // first block
	Count       uint64 // blocks
	Provisioned bool   // data records: the blocks are provisioned too
	Data        []byte // data records: the blocks' contents
}

// totals tracks what records carried so far, to check order and counts.
type totals struct {
	seq                    uint64 // next record's number
	next                   uint64 // lowest block the next range may start at
	data, provision, disc  uint64
	provData               uint64
	dataBytes, streamBytes uint64
}

// check validates a range record against the header and what came
// before, and counts it.
func (t *totals) check(h *Header, typ byte, first, count uint64) error {
	if count == 0 {
		return errors.New("empty block range")
	}
	if first < t.next {
		return fmt.Errorf("out of order: blocks from %d after blocks up to %d", first, t.next-1)
	}
	if first >= h.Blocks() || count > h.Blocks()-first {
		return fmt.Errorf("blocks %d+%d outside the volume's %d blocks", first, count, h.Blocks())
	}
	var c, limit *uint64
	switch typ {
	case TypeData:
		c, limit = &t.data, &h.DataBlocks
	case TypeProvision:
		c, limit = &t.provision, &h.ProvisionBlocks
	default:
		c, limit = &t.disc, &h.DiscardBlocks
	}
	if count > *limit-*c {
		return fmt.Errorf("more %s blocks than the header's %d", TypeName(typ), *limit)
	}
	*c += count
	t.next = first + count
	return nil
}

// Writer writes a stream. Its methods must be called with ranges in
// increasing order and totals matching the header; Close writes the end
// record.
type Writer struct {
	w       io.Writer
	h       Header
	t       totals
	pending []byte // small records not written yet
	err     error
	closed  bool
}

// NewWriter writes the stream's opening and header.
func NewWriter(w io.Writer, h Header) (*Writer, error) {
	if err := h.validate(); err != nil {
		return nil, fmt.Errorf("stream header: %w", err)
	}
	sw := &Writer{w: w, h: h}
	start := binary.BigEndian.AppendUint16([]byte(magic), Version)
	if _, err := w.Write(start); err != nil {
		return nil, err
	}
	sw.t.streamBytes = uint64(len(start))
	if err := sw.record(TypeHeader, h.marshal(), nil); err != nil {
		return nil, err
	}
	return sw, nil
}

// Bytes is how many bytes were written so far.
func (w *Writer) Bytes() uint64 { return w.t.streamBytes }

func (w *Writer) record(typ byte, payload, data []byte) error {
	if w.err != nil {
		return w.err
	}
	n := len(payload) + len(data)
	// Small records collect in pending and go out with the next data
	// record (or at Close): one write per record would wake the reader
	// for a few bytes each.
	b := w.pending
	at := len(b)
	b = append(b, typ)
	b = binary.BigEndian.AppendUint64(b, w.t.seq)
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = append(b, payload...)
	crc := crc32.Update(0, castagnoli, b[at:])
	crc = crc32.Update(crc, castagnoli, data)
	if len(data) > 0 {
		// The data goes out as it is (no copy into a buffer).
		if err := w.write(b); err != nil {
			return err
		}
		if err := w.write(data); err != nil {
			return err
		}
		b = b[:0]
	}
	b = binary.BigEndian.AppendUint32(b, crc)
	w.pending = b
	w.t.seq++
	w.t.streamBytes += uint64(frameHead + n + frameTail)
	if len(w.pending) >= 64<<10 {
		return w.flush()
	}
	return nil
}

func (w *Writer) write(b []byte) error {
	if w.err != nil {
		return w.err
	}
	if _, err := w.w.Write(b); err != nil {
		w.err = err
	}
	return w.err
}

func (w *Writer) flush() error {
	if len(w.pending) == 0 {
		return w.err
	}
	err := w.write(w.pending)
	w.pending = w.pending[:0]
	return err
}

// DataHeadroom and DataTailroom are the bytes a frame given to DataFrame
// keeps free around its data, for the record's framing.
const (
	DataHeadroom = frameHead + dataHead
	DataTailroom = frameTail
)

// DataFrame is Data for contents read into frame[DataHeadroom :
// len(frame)-DataTailroom]: the record is framed in place and written
// with one call, without copying the data.
func (w *Writer) DataFrame(first, count uint64, provisioned bool, frame []byte) error {
	if len(frame) < DataHeadroom+DataTailroom {
		return fmt.Errorf("write data record: frame of %d bytes", len(frame))
	}
	data := frame[DataHeadroom : len(frame)-DataTailroom]
	if err := w.checkData(first, count, provisioned, data); err != nil {
		return err
	}
	if err := w.flush(); err != nil {
		return err
	}
	h := frame[:0]
	h = append(h, TypeData)
	h = binary.BigEndian.AppendUint64(h, w.t.seq)
	h = binary.BigEndian.AppendUint32(h, uint32(dataHead+len(data)))
	h = binary.BigEndian.AppendUint64(h, first)
	h = binary.BigEndian.AppendUint32(h, uint32(count))
	var flags byte
	if provisioned {
		flags = 1
	}
	h = append(h, flags)
	end := len(frame) - DataTailroom
	binary.BigEndian.PutUint32(frame[end:], crc32.Checksum(frame[:end], castagnoli))
	if err := w.write(frame); err != nil {
		return err
	}
	w.t.seq++
	w.t.streamBytes += uint64(len(frame))
	return nil
}

func (w *Writer) rangeRecord(typ byte, first, count uint64) error {
	if err := w.t.check(&w.h, typ, first, count); err != nil {
		return fmt.Errorf("write %s record: %w", TypeName(typ), err)
	}
	var p [rangeLen]byte
	binary.BigEndian.PutUint64(p[:], first)
	binary.BigEndian.PutUint64(p[8:], count)
	return w.record(typ, p[:], nil)
}

// Data writes the contents of count blocks from first (at most
// RunBlocks of them); data must be exactly their length.
func (w *Writer) Data(first, count uint64, provisioned bool, data []byte) error {
	if err := w.checkData(first, count, provisioned, data); err != nil {
		return err
	}
	var p [dataHead]byte
	binary.BigEndian.PutUint64(p[:], first)
	binary.BigEndian.PutUint32(p[8:], uint32(count))
	if provisioned {
		p[12] = 1
	}
	return w.record(TypeData, p[:], data)
}

// checkData validates and counts a data record.
func (w *Writer) checkData(first, count uint64, provisioned bool, data []byte) error {
	if w.err != nil {
		return w.err
	}
	if count > w.h.RunBlocks() {
		return fmt.Errorf("write data record: %d blocks, at most %d in one", count, w.h.RunBlocks())
	}
	if err := w.t.check(&w.h, TypeData, first, count); err != nil {
		return fmt.Errorf("write data record: %w", err)
	}
	if want := w.h.blockBytes(first, count); uint64(len(data)) != want {
		w.err = fmt.Errorf("write data record: %d bytes for %d blocks from %d, want %d", len(data), count, first, want)
		return w.err
	}
	if provisioned {
		if count > w.h.ProvisionedDataBlocks-w.t.provData {
			w.err = fmt.Errorf("write data record: more provisioned data blocks than the header's %d", w.h.ProvisionedDataBlocks)
			return w.err
		}
		w.t.provData += count
	}
	w.t.dataBytes += uint64(len(data))
	return nil
}

// Provision records blocks that are provisioned and not written.
func (w *Writer) Provision(first, count uint64) error {
	return w.rangeRecord(TypeProvision, first, count)
}

// Discard records blocks that read as zeros and are not provisioned.
func (w *Writer) Discard(first, count uint64) error {
	return w.rangeRecord(TypeDiscard, first, count)
}

// Close writes the end record. It fails when the records written do not
// add up to the header's counts (the stream is then unusable).
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	w.closed = true
	if w.t.data != w.h.DataBlocks || w.t.provision != w.h.ProvisionBlocks || w.t.disc != w.h.DiscardBlocks || w.t.provData != w.h.ProvisionedDataBlocks {
		return fmt.Errorf("write end record: wrote %d data (%d provisioned), %d provision, %d discard blocks; the header promised %d (%d), %d, %d",
			w.t.data, w.t.provData, w.t.provision, w.t.disc, w.h.DataBlocks, w.h.ProvisionedDataBlocks, w.h.ProvisionBlocks, w.h.DiscardBlocks)
	}
	var p [endLen]byte
	binary.BigEndian.PutUint64(p[:], w.t.seq)
	binary.BigEndian.PutUint64(p[8:], w.t.data)
	binary.BigEndian.PutUint64(p[16:], w.t.provision)
	binary.BigEndian.PutUint64(p[24:], w.t.disc)
	if err := w.record(TypeEnd, p[:], nil); err != nil {
		return err
	}
	return w.flush()
}

// Reader reads and checks a stream.
type Reader struct {
	r    *bufio.Reader
	h    Header
	t    totals
	buf  []byte
	done bool
}

// NewReader reads the stream's opening and header. r is read through a
// buffer of its own.
func NewReader(r io.Reader) (*Reader, error) {
	sr := &Reader{r: bufio.NewReaderSize(r, 64<<10)}
	var start [len(magic) + 2]byte
	if _, err := io.ReadFull(sr.r, start[:]); err != nil {
		if err == io.EOF {
			return nil, fmt.Errorf("%w: empty input", ErrBadStream)
		}
		return nil, fmt.Errorf("%w: truncated at its start: %v", ErrBadStream, err)
	}
	if string(start[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w: not a thinblk stream (it starts with %q)", ErrBadStream, start[:len(magic)])
	}
	if v := binary.BigEndian.Uint16(start[len(magic):]); v != Version {
		return nil, fmt.Errorf("%w: format version %d, this thinblk reads version %d", ErrBadStream, v, Version)
	}
	sr.t.streamBytes = uint64(len(start))
	typ, payload, err := sr.frame(maxHeader + 2*maxNameLen)
	if err != nil {
		return nil, err
	}
	if typ != TypeHeader {
		return nil, sr.bad(typ, "the first record must be the header")
	}
	if sr.h, err = unmarshalHeader(payload); err != nil {
		return nil, sr.bad(typ, err.Error())
	}
	sr.t.seq++
	return sr, nil
}

// Header is the stream's header.
func (r *Reader) Header() Header { return r.h }

// Bytes is how many bytes were read so far; DataBytes how many of them
// were block contents.
func (r *Reader) Bytes() uint64     { return r.t.streamBytes }
func (r *Reader) DataBytes() uint64 { return r.t.dataBytes }

func (r *Reader) bad(typ byte, what string) error {
	return fmt.Errorf("%w: record %d (%s): %s", ErrBadStream, r.t.seq, TypeName(typ), what)
}

// frame reads one record whose payload may be up to max bytes and checks
// its number and checksum.
func (r *Reader) frame(max int) (byte, []byte, error) {
	var head [frameHead]byte
	if _, err := io.ReadFull(r.r, head[:]); err != nil {
		if err == io.EOF {
			return 0, nil, fmt.Errorf("%w: truncated: it ends after record %d without an end record", ErrBadStream, r.t.seq-min(r.t.seq, 1))
		}
		return 0, nil, fmt.Errorf("%w: truncated inside record %d: %v", ErrBadStream, r.t.seq, err)
	}
	typ := head[0]
	n := binary.BigEndian.Uint32(head[9:])
	if n > uint32(max) {
		return 0, nil, r.bad(typ, fmt.Sprintf("length %d exceeds %d (corrupt or not this format)", n, max))
	}
	// The buffer grows as bytes arrive, so a corrupt length costs no
	// more memory than the input really has.
	want := int(n) + frameTail
	b := r.buf[:0]
	for len(b) < want {
		if len(b) == cap(b) {
			b = append(b, make([]byte, min(want-len(b), 1<<20))...)[:len(b)]
		}
		k, err := io.ReadFull(r.r, b[len(b):min(want, cap(b))])
		b = b[:len(b)+k]
		if err != nil {
			r.buf = b[:0]
			return 0, nil, fmt.Errorf("%w: truncated inside record %d (%s): %v", ErrBadStream, r.t.seq, TypeName(typ), err)
		}
	}
	r.buf = b[:0]
	crc := crc32.Update(0, castagnoli, head[:])
	crc = crc32.Update(crc, castagnoli, b[:n])
	if want := binary.BigEndian.Uint32(b[n:]); crc != want {
		return 0, nil, r.bad(typ, fmt.Sprintf("checksum mismatch (crc32c %08x, the record says %08x): corrupted", crc, want))
	}
	if seq := binary.BigEndian.Uint64(head[1:]); seq != r.t.seq {
		return 0, nil, r.bad(typ, fmt.Sprintf("out of order: it is numbered %d", seq))
	}
	r.t.streamBytes += uint64(frameHead + int(n) + frameTail)
	return typ, b[:n], nil
}

// Next returns the next record, or io.EOF after a valid end record that
// nothing follows.
func (r *Reader) Next() (Record, error) {
	if r.done {
		return Record{}, io.EOF
	}
	typ, p, err := r.frame(dataHead + MaxData)
	if err != nil {
		return Record{}, err
	}
	var rec Record
	rec.Type = typ
	switch typ {
	case TypeData:
		if len(p) < dataHead {
			return rec, r.bad(typ, "too short")
		}
		rec.First = binary.BigEndian.Uint64(p)
		rec.Count = uint64(binary.BigEndian.Uint32(p[8:]))
		if p[12]&^1 != 0 {
			return rec, r.bad(typ, fmt.Sprintf("unknown flags 0x%02x", p[12]))
		}
		rec.Provisioned = p[12]&1 != 0
		rec.Data = p[dataHead:]
		if err := r.t.check(&r.h, typ, rec.First, rec.Count); err != nil {
			return rec, r.bad(typ, err.Error())
		}
		if rec.Provisioned {
			if rec.Count > r.h.ProvisionedDataBlocks-r.t.provData {
				return rec, r.bad(typ, fmt.Sprintf("more provisioned data blocks than the header's %d", r.h.ProvisionedDataBlocks))
			}
			r.t.provData += rec.Count
		}
		if want := r.h.blockBytes(rec.First, rec.Count); uint64(len(rec.Data)) != want {
			return rec, r.bad(typ, fmt.Sprintf("%d bytes for %d blocks (want %d)", len(rec.Data), rec.Count, want))
		}
		r.t.dataBytes += uint64(len(rec.Data))
	case TypeProvision, TypeDiscard:
		if len(p) != rangeLen {
			return rec, r.bad(typ, fmt.Sprintf("length %d, want %d", len(p), rangeLen))
		}
		rec.First = binary.BigEndian.Uint64(p)
		rec.Count = binary.BigEndian.Uint64(p[8:])
		if err := r.t.check(&r.h, typ, rec.First, rec.Count); err != nil {
			return rec, r.bad(typ, err.Error())
		}
	case TypeEnd:
		if len(p) != endLen {
			return rec, r.bad(typ, fmt.Sprintf("length %d, want %d", len(p), endLen))
		}
		got := [4]uint64{binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:]), binary.BigEndian.Uint64(p[16:]), binary.BigEndian.Uint64(p[24:])}
		want := [4]uint64{r.t.seq, r.t.data, r.t.provision, r.t.disc}
		if got != want || r.t.data != r.h.DataBlocks || r.t.provision != r.h.ProvisionBlocks || r.t.disc != r.h.DiscardBlocks || r.t.provData != r.h.ProvisionedDataBlocks {
			return rec, r.bad(typ, fmt.Sprintf("totals (records, data, provision, discard) %v; read %v; header %v",
				got, want, [3]uint64{r.h.DataBlocks, r.h.ProvisionBlocks, r.h.DiscardBlocks}))
		}
		if _, err := r.r.ReadByte(); err != io.EOF {
			return rec, r.bad(typ, "bytes follow the end record")
		}
		r.done = true
		r.t.seq++
		return Record{}, io.EOF
	default:
		return rec, r.bad(typ, "unknown record type")
	}
	r.t.seq++
	return rec, nil
}
