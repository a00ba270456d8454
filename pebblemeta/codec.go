package pebblemeta

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unicode/utf8"
)

// Key layout. Every key starts with a one-byte kind so that each kind is one
// contiguous, prefix-iterable range; integers are big-endian so that byte
// order equals numeric order (a volume's map iterates in block order).
const (
	kindFormat = 'f' // "f": format version, written once at creation
	kindPool   = 'p' // "p": the pool record
	kindVolume = 'v' // "v" name: a volume record
	kindLayer  = 'l' // "l" layer(8): a layer's parent, frozen flag and counters (snapshots)
	kindMap    = 'm' // "m" layer(8) vblock(8): one block-map entry
	kindBitmap = 'b' // "b" chunk(8): one chunk of the allocation bitmap
	kindSpare  = 's' // "s" chunk(8): one chunk of the spare set (free blocks kept host-allocated)
)

var (
	formatKey = []byte{kindFormat}
	poolKey   = []byte{kindPool}
)

// ErrCorrupt is wrapped by every decoding error: the bytes are not what this
// format writes.
var ErrCorrupt = errors.New("corrupt metadata")

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// MaxVolumeNameLen bounds volume names (they become socket file names).
const MaxVolumeNameLen = 128

// MapKeyLen is the length of an encoded map key.
const MapKeyLen = 1 + 8 + 8

// AppendMapKey appends the key of block vblock in layer to dst.
func AppendMapKey(dst []byte, layer, vblock uint64) []byte {
	dst = append(dst, kindMap)
	dst = binary.BigEndian.AppendUint64(dst, layer)
	return binary.BigEndian.AppendUint64(dst, vblock)
}

// ParseMapKey is the inverse of AppendMapKey.
func ParseMapKey(k []byte) (layer, vblock uint64, err error) {
	if len(k) != MapKeyLen || k[0] != kindMap {
		return 0, 0, corruptf("map key %x", k)
	}
	return binary.BigEndian.Uint64(k[1:9]), binary.BigEndian.Uint64(k[9:17]), nil
}

// mapPrefix returns the key range [lo, hi) holding every entry of layer.
func mapLayerBounds(layer uint64) (lo, hi []byte) {
	lo = AppendMapKey(nil, layer, 0)
	if layer == math.MaxUint64 {
		return lo, []byte{kindMap + 1}
	}
	return lo, AppendMapKey(nil, layer+1, 0)
}

// Entry flags. A stored entry has at least one flag; an absent key means
// "unmapped, not provisioned".
const (
	// FlagMapped: the block has physical block PBlock.
	FlagMapped uint8 = 1 << 0
	// FlagProvisioned: the guest provisioned the block (WRITE_ZEROES
	// without unmap); without FlagMapped the block holds a reservation.
	FlagProvisioned uint8 = 1 << 1

	// FlagHole: the block reads as zeros here even though an ancestor
	// layer has an entry for it (a discard in a snapshot's descendant).
	// Never combined with the other flags.
	FlagHole uint8 = 1 << 2

	knownFlags = FlagMapped | FlagProvisioned | FlagHole
)

// Entry is one block-map value.
type Entry struct {
	Flags  uint8
	PBlock uint64 // physical block number; meaningful only with FlagMapped
}

// Mapped reports whether the entry points at a physical block.
func (e Entry) Mapped() bool { return e.Flags&FlagMapped != 0 }

// Provisioned reports whether the entry is provisioned.
func (e Entry) Provisioned() bool { return e.Flags&FlagProvisioned != 0 }

// Hole reports whether the entry hides its ancestors' entries (reads as
// zeros, holds nothing).
func (e Entry) Hole() bool { return e.Flags == FlagHole }

// Reserved reports whether the entry holds a reservation (provisioned but
// not yet given a physical block).
func (e Entry) Reserved() bool { return e.Flags&(FlagMapped|FlagProvisioned) == FlagProvisioned }

// AppendEntry appends the encoding of e: flags, then the physical block as
// a uvarint when mapped.
func AppendEntry(dst []byte, e Entry) []byte {
	dst = append(dst, e.Flags)
	if e.Mapped() {
		dst = binary.AppendUvarint(dst, e.PBlock)
	}
	return dst
}

// DecodeEntry is the inverse of AppendEntry; it rejects unknown flags,
// empty entries and trailing bytes.
func DecodeEntry(v []byte) (Entry, error) {
	if len(v) == 0 {
		return Entry{}, corruptf("empty map entry")
	}
	e := Entry{Flags: v[0]}
	if e.Flags == 0 || e.Flags&^knownFlags != 0 || e.Flags&FlagHole != 0 && e.Flags != FlagHole {
		return Entry{}, corruptf("map entry flags %#x", e.Flags)
	}
	rest := v[1:]
	if e.Mapped() {
		pb, n := binary.Uvarint(rest)
		if n <= 0 || n != uvarintLen(pb) {
			return Entry{}, corruptf("map entry block number %x", rest)
		}
		e.PBlock = pb
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return Entry{}, corruptf("map entry has %d trailing bytes", len(rest))
	}
	return e, nil
}

// ValidVolumeName reports why name cannot name a volume, or nil. Names
// become file names (SOCKDIR/NAME.sock) and map keys.
func ValidVolumeName(name string) error {
	switch {
	case name == "":
		return errors.New("volume name is empty")
	case len(name) > MaxVolumeNameLen:
		return fmt.Errorf("volume name is longer than %d bytes", MaxVolumeNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("volume name %q is reserved", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '-' || c == '_' || c == '.' || c == '+' || c == '@' || c == ':'
		if !ok {
			if c == '/' {
				return fmt.Errorf("volume name %q contains '/'", name)
			}
			// Name the character, not its first byte ('é', not 'Ã').
			bad := name[i : i+1]
			if r, n := utf8.DecodeRuneInString(name[i:]); r != utf8.RuneError {
				bad = name[i : i+n]
			}
			return fmt.Errorf("volume name %q contains %q (allowed: ASCII letters, digits, - _ . + @ :)", name, bad)
		}
	}
	return nil
}

// VolumeKey returns the key of the volume record of name.
func VolumeKey(name string) []byte {
	return append([]byte{kindVolume}, name...)
}

// ParseVolumeKey is the inverse of VolumeKey; it validates the name.
func ParseVolumeKey(k []byte) (string, error) {
	if len(k) < 1 || k[0] != kindVolume {
		return "", corruptf("volume key %x", k)
	}
	name := string(k[1:])
	if err := ValidVolumeName(name); err != nil {
		return "", corruptf("volume key: %v", err)
	}
	return name, nil
}

// AppendBitmapKey appends the key of bitmap chunk idx.
func AppendBitmapKey(dst []byte, idx uint64) []byte {
	return binary.BigEndian.AppendUint64(append(dst, kindBitmap), idx)
}

// ParseBitmapKey is the inverse of AppendBitmapKey.
func ParseBitmapKey(k []byte) (uint64, error) {
	if len(k) != 9 || k[0] != kindBitmap {
		return 0, corruptf("bitmap key %x", k)
	}
	return binary.BigEndian.Uint64(k[1:]), nil
}

// AppendSpareKey appends the key of spare-set chunk idx (same layout as
// the allocation bitmap's).
func AppendSpareKey(dst []byte, idx uint64) []byte {
	return binary.BigEndian.AppendUint64(append(dst, kindSpare), idx)
}

// ParseSpareKey is the inverse of AppendSpareKey.
func ParseSpareKey(k []byte) (uint64, error) {
	if len(k) != 9 || k[0] != kindSpare {
		return 0, corruptf("spare key %x", k)
	}
	return binary.BigEndian.Uint64(k[1:]), nil
}

// Records are encoded as a version byte followed by uvarint fields, so that
// later versions can append fields; decoders reject unknown versions and
// trailing garbage.

const recordV1 = 1

// PoolRecord is the pool's configuration and its persistent counters.
type PoolRecord struct {
	BlockSize  uint32 // bytes, power of two
	SizeBlocks uint64 // pool size in blocks (the data file is exactly this long)
	// NoSpace is the out-of-space policy (0 error, 1 queue; thin owns the
	// meaning).
	NoSpace        uint8
	NoSpaceTimeout uint64 // nanoseconds
	LowWaterPPM    uint32 // low-water mark, parts per million of the pool size
	NextLayer      uint64 // next unused layer id
	Allocated      uint64 // blocks with a physical owner (bitmap population)
	Reserved       uint64 // blocks reserved but not allocated
	// ZeroFrom: no block at or above it was ever written, so it reads as
	// zeros in the data file. Optional on decode (absent: SizeBlocks, i.e.
	// nothing known).
	ZeroFrom uint64
	// Flags: PoolPreallocated. Optional on decode (absent: 0), and
	// encoded only when set, so older readers open pools without them.
	Flags uint64
}

// PoolPreallocated marks a pool whose whole data file is allocated on the
// host (thin's CreateOptions.Preallocate): no block is ever punched.
const PoolPreallocated = 1

// AppendPoolRecord appends the encoding of r.
func AppendPoolRecord(dst []byte, r PoolRecord) []byte {
	dst = append(dst, recordV1)
	dst = binary.AppendUvarint(dst, uint64(r.BlockSize))
	dst = binary.AppendUvarint(dst, r.SizeBlocks)
	dst = binary.AppendUvarint(dst, uint64(r.NoSpace))
	dst = binary.AppendUvarint(dst, r.NoSpaceTimeout)
	dst = binary.AppendUvarint(dst, uint64(r.LowWaterPPM))
	dst = binary.AppendUvarint(dst, r.NextLayer)
	dst = binary.AppendUvarint(dst, r.Allocated)
	dst = binary.AppendUvarint(dst, r.Reserved)
	dst = binary.AppendUvarint(dst, r.ZeroFrom)
	if r.Flags != 0 {
		dst = binary.AppendUvarint(dst, r.Flags)
	}
	return dst
}

// uvarintLen is the canonical (shortest) encoded length of v; longer
// encodings are rejected so that each value has exactly one encoding.
func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

type reader struct {
	b   []byte
	err error
}

func (r *reader) uvarint(what string, max uint64) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 || n != uvarintLen(v) {
		r.err = corruptf("%s: bad varint", what)
		return 0
	}
	if v > max {
		r.err = corruptf("%s: %d out of range", what, v)
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) version(what string) {
	if len(r.b) == 0 {
		r.err = corruptf("%s: empty", what)
		return
	}
	if r.b[0] != recordV1 {
		r.err = corruptf("%s: unknown record version %d", what, r.b[0])
		return
	}
	r.b = r.b[1:]
}

func (r *reader) done(what string) error {
	if r.err == nil && len(r.b) != 0 {
		r.err = corruptf("%s: %d trailing bytes", what, len(r.b))
	}
	return r.err
}

// DecodePoolRecord is the inverse of AppendPoolRecord.
func DecodePoolRecord(v []byte) (PoolRecord, error) {
	r := reader{b: v}
	r.version("pool record")
	var p PoolRecord
	p.BlockSize = uint32(r.uvarint("block size", math.MaxUint32))
	p.SizeBlocks = r.uvarint("pool size", math.MaxUint64)
	p.NoSpace = uint8(r.uvarint("no-space policy", math.MaxUint8))
	p.NoSpaceTimeout = r.uvarint("no-space timeout", math.MaxInt64)
	p.LowWaterPPM = uint32(r.uvarint("low water", 1_000_000))
	p.NextLayer = r.uvarint("next layer", math.MaxUint64)
	p.Allocated = r.uvarint("allocated", math.MaxUint64)
	p.Reserved = r.uvarint("reserved", math.MaxUint64)
	p.ZeroFrom = p.SizeBlocks
	if r.err == nil && len(r.b) > 0 {
		p.ZeroFrom = r.uvarint("zero mark", math.MaxUint64)
	}
	if r.err == nil && len(r.b) > 0 {
		p.Flags = r.uvarint("pool flags", math.MaxUint64)
		if p.Flags == 0 {
			r.err = corruptf("pool flags: encoded zero")
		}
	}
	if err := r.done("pool record"); err != nil {
		return PoolRecord{}, err
	}
	return p, nil
}

// VolumeRecord is one volume: its head layer, virtual size and the
// counters that accounting keeps incrementally (they always match the map).
type VolumeRecord struct {
	Name        string // not encoded in the value (it is the key)
	Layer       uint64 // layer holding the volume's writable map
	Size        uint64 // virtual size in bytes, a multiple of 512
	Mapped      uint64 // entries with FlagMapped
	Provisioned uint64 // entries with FlagProvisioned
	Reserved    uint64 // entries with FlagProvisioned and not FlagMapped
	// Kind is KindVolume, KindSnapshot (read-only; Layer is a frozen layer
	// and the counters are zero) or KindClone (writable snapshot).
	// Optional on decode (absent: KindVolume).
	Kind   uint8
	Origin string // the volume or snapshot this one was taken of
	// ChainProv counts the blocks whose deciding entry, looking up the
	// volume's whole layer chain, is provisioned: Provisioned of them are
	// in the head, the rest are shared provisioned blocks that need a
	// reserved block each for their copy-on-write. Optional on decode
	// (absent: Provisioned, exact for a volume without a parent layer).
	ChainProv uint64
	// ReserveMode guarantees the whole virtual size. Optional (absent: off).
	ReserveMode bool
	// StreamID identifies a read-only snapshot's contents across pools:
	// send stamps it into a stream, receive gives the received snapshot
	// the same one, so an incremental stream names its base by it.
	// Optional (absent: zero, none given yet).
	StreamID [16]byte
}

const volFlagReserveMode = 1

// Volume kinds.
const (
	KindVolume   uint8 = 0
	KindSnapshot uint8 = 1
	KindClone    uint8 = 2
)

// AppendVolumeRecord appends the encoding of r (without its name).
func AppendVolumeRecord(dst []byte, r VolumeRecord) []byte {
	dst = append(dst, recordV1)
	dst = binary.AppendUvarint(dst, r.Layer)
	dst = binary.AppendUvarint(dst, r.Size)
	dst = binary.AppendUvarint(dst, r.Mapped)
	dst = binary.AppendUvarint(dst, r.Provisioned)
	dst = binary.AppendUvarint(dst, r.Reserved)
	// Optional fields are written only when they differ from what their
	// absence means, so older records and plain volumes keep their bytes.
	tail := r.ChainProv != r.Provisioned || r.ReserveMode || r.StreamID != [16]byte{}
	if r.Kind != KindVolume || r.Origin != "" || tail {
		dst = binary.AppendUvarint(dst, uint64(r.Kind))
		dst = binary.AppendUvarint(dst, uint64(len(r.Origin)))
		dst = append(dst, r.Origin...)
	}
	if tail {
		dst = binary.AppendUvarint(dst, r.ChainProv)
		var flags uint64
		if r.ReserveMode {
			flags |= volFlagReserveMode
		}
		dst = binary.AppendUvarint(dst, flags)
	}
	if r.StreamID != [16]byte{} {
		dst = append(dst, r.StreamID[:]...)
	}
	return dst
}

// DecodeVolumeRecord is the inverse of AppendVolumeRecord; Name is left
// empty.
func DecodeVolumeRecord(v []byte) (VolumeRecord, error) {
	r := reader{b: v}
	r.version("volume record")
	var rec VolumeRecord
	rec.Layer = r.uvarint("layer", math.MaxUint64)
	rec.Size = r.uvarint("size", math.MaxInt64)
	rec.Mapped = r.uvarint("mapped", math.MaxUint64)
	rec.Provisioned = r.uvarint("provisioned", math.MaxUint64)
	rec.Reserved = r.uvarint("reserved", math.MaxUint64)
	if r.err == nil && len(r.b) > 0 {
		rec.Kind = uint8(r.uvarint("kind", uint64(KindClone)))
		n := r.uvarint("origin length", MaxVolumeNameLen)
		if r.err == nil && uint64(len(r.b)) < n {
			r.err = corruptf("volume record: origin truncated")
		}
		if r.err == nil {
			rec.Origin = string(r.b[:n])
			r.b = r.b[n:]
			if rec.Origin != "" {
				if err := ValidVolumeName(rec.Origin); err != nil {
					r.err = corruptf("volume record origin: %v", err)
				}
			}
		}
	}
	rec.ChainProv = rec.Provisioned
	if r.err == nil && len(r.b) > 0 {
		rec.ChainProv = r.uvarint("chain provisioned", math.MaxUint64)
		flags := r.uvarint("volume flags", volFlagReserveMode)
		rec.ReserveMode = flags&volFlagReserveMode != 0
	}
	if r.err == nil && len(r.b) > 0 {
		if len(r.b) < len(rec.StreamID) {
			r.err = corruptf("volume record: stream id truncated")
		} else {
			r.b = r.b[copy(rec.StreamID[:], r.b):]
			if rec.StreamID == [16]byte{} {
				r.err = corruptf("volume record: zero stream id written")
			}
		}
	}
	if err := r.done("volume record"); err != nil {
		return VolumeRecord{}, err
	}
	return rec, nil
}

// LayerRecord describes a layer that has a parent or is frozen (a layer
// without a record is a volume's own head with no parent). A frozen
// layer is shared by snapshots and never written again; its counters live
// here. An unfrozen layer's counters live in its volume's record.
type LayerRecord struct {
	Layer       uint64 // not encoded in the value (it is the key)
	Parent      uint64 // 0: none
	Frozen      bool
	Mapped      uint64
	Provisioned uint64
	Reserved    uint64
}

// AppendLayerKey appends the key of layer's record.
func AppendLayerKey(dst []byte, layer uint64) []byte {
	return binary.BigEndian.AppendUint64(append(dst, kindLayer), layer)
}

// ParseLayerKey is the inverse of AppendLayerKey.
func ParseLayerKey(k []byte) (uint64, error) {
	if len(k) != 9 || k[0] != kindLayer {
		return 0, corruptf("layer key %x", k)
	}
	return binary.BigEndian.Uint64(k[1:]), nil
}

// AppendLayerRecord appends the encoding of r (without its layer).
func AppendLayerRecord(dst []byte, r LayerRecord) []byte {
	dst = append(dst, recordV1)
	dst = binary.AppendUvarint(dst, r.Parent)
	f := uint64(0)
	if r.Frozen {
		f = 1
	}
	dst = binary.AppendUvarint(dst, f)
	dst = binary.AppendUvarint(dst, r.Mapped)
	dst = binary.AppendUvarint(dst, r.Provisioned)
	dst = binary.AppendUvarint(dst, r.Reserved)
	return dst
}

// DecodeLayerRecord is the inverse of AppendLayerRecord; Layer is left 0.
func DecodeLayerRecord(v []byte) (LayerRecord, error) {
	r := reader{b: v}
	r.version("layer record")
	var rec LayerRecord
	rec.Parent = r.uvarint("parent", math.MaxUint64)
	rec.Frozen = r.uvarint("frozen", 1) == 1
	rec.Mapped = r.uvarint("mapped", math.MaxUint64)
	rec.Provisioned = r.uvarint("provisioned", math.MaxUint64)
	rec.Reserved = r.uvarint("reserved", math.MaxUint64)
	if err := r.done("layer record"); err != nil {
		return LayerRecord{}, err
	}
	return rec, nil
}

// EncodeFormat and DecodeFormat encode the format version.
func EncodeFormat(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// DecodeFormat is the inverse of EncodeFormat.
func DecodeFormat(b []byte) (uint32, error) {
	if len(b) != 4 {
		return 0, corruptf("format version %x", b)
	}
	return binary.BigEndian.Uint32(b), nil
}
