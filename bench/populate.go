package bench

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/thinblk/thinblk/pebblemeta"
	"github.com/thinblk/thinblk/thin"
)

// The pool's file names (package thin keeps them unexported). If they
// changed, PopulateThin fails loudly: pebblemeta.Open refuses a missing
// store and the data file would not open.
const (
	poolDataName = "thinblk.data"
	poolMetaName = "thinblk.meta"
)

// PopulateOptions describe a pool whose one volume has Mapped blocks
// mapped, written by PopulateThin.
type PopulateOptions struct {
	Volume    string // volume name
	BlockSize uint32 // pool block size; 0: 64 KiB (the pool default)
	// Mapped: volume blocks 0..Mapped-1 map to physical blocks
	// 0..Mapped-1.
	Mapped uint64
	// VolumeBlocks is the volume's size in blocks (0: Mapped, at least 1).
	VolumeBlocks uint64
	// FreeBlocks is free pool space beyond the mapped blocks (0: 4096),
	// so that copy-on-write and new writes can allocate.
	FreeBlocks uint64
	// StampEvery > 0 writes Stamp(vb) at the start of every
	// StampEvery-th mapped block (and the last one) in the data file;
	// the others stay sparse and read as zeros, which is what a mapped
	// block below the never-written mark may hold.
	StampEvery uint64
}

// PopulateStats says what PopulateThin did and how long it took.
type PopulateStats struct {
	Entries  uint64        // map entries written
	Stamped  uint64        // blocks with a stamp in the data file
	Duration time.Duration // whole call: pool create, records, stamps
}

// StampLen is the length of a block stamp: one sector, the unit of a
// volume's reads and writes.
const StampLen = 512

// Stamp is what PopulateThin writes at the start of stamped volume block
// vb: recognisable, and different for every block.
func Stamp(vb uint64) []byte {
	b := make([]byte, StampLen)
	copy(b, "thinblk-populate")
	binary.LittleEndian.PutUint64(b[16:], vb)
	binary.LittleEndian.PutUint64(b[24:], ^vb)
	return b
}

// Stamped reports whether PopulateThin with o stamps volume block vb.
func (o PopulateOptions) Stamped(vb uint64) bool {
	return o.StampEvery > 0 && vb < o.Mapped && (vb%o.StampEvery == 0 || vb == o.Mapped-1)
}

// populateBatch is how many map entries go into one metadata batch
// (about 25 bytes each in Pebble's batch encoding).
const populateBatch = 1 << 18

// PopulateThin creates a new pool in dir (which must not hold one) with
// one volume whose first o.Mapped blocks are mapped, without writing
// them through the volume: millions of WriteAt calls (each a 64 KiB data
// write plus its metadata) would take far longer than the benchmark
// they set up. The pool and volume are made through package thin; then,
// with the pool closed, the map entries, allocation bitmap chunks and
// counters are written straight into its Pebble store with package
// pebblemeta's encodings, exactly as thin commits them: the pool and
// volume counters match the map, the bitmap is exactly the owned blocks,
// and the never-written mark (ZeroFrom) is raised above them. The data
// file stays sparse except for the stamps, written and synced before the
// metadata that points at them (thin's own order). Pool.Check then finds
// nothing wrong (the tests prove it).
func PopulateThin(dir string, o PopulateOptions) (PopulateStats, error) {
	start := time.Now()
	var st PopulateStats
	if o.BlockSize == 0 {
		o.BlockSize = 64 << 10
	}
	if o.VolumeBlocks == 0 {
		o.VolumeBlocks = max(o.Mapped, 1)
	}
	if o.FreeBlocks == 0 {
		o.FreeBlocks = 4096
	}
	if o.VolumeBlocks < o.Mapped {
		return st, fmt.Errorf("populate: volume of %d blocks cannot map %d", o.VolumeBlocks, o.Mapped)
	}
	bs := uint64(o.BlockSize)
	if err := thin.Create(dir, thin.CreateOptions{Size: (o.Mapped + o.FreeBlocks) * bs, BlockSize: o.BlockSize}); err != nil {
		return st, fmt.Errorf("populate: %w", err)
	}
	p, err := thin.Open(dir, thin.OpenOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), FlushInterval: -1})
	if err != nil {
		return st, fmt.Errorf("populate: %w", err)
	}
	err = p.CreateVolume(o.Volume, o.VolumeBlocks*bs)
	if cerr := p.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return st, fmt.Errorf("populate: %w", err)
	}

	if st.Stamped, err = writeStamps(filepath.Join(dir, poolDataName), o); err != nil {
		return st, fmt.Errorf("populate: data file: %w", err)
	}
	if err := populateMeta(filepath.Join(dir, poolMetaName), o); err != nil {
		return st, fmt.Errorf("populate %s: %w", dir, err)
	}
	st.Entries = o.Mapped
	st.Duration = time.Since(start)
	return st, nil
}

// writeStamps writes the stamps of o into the data file (physical block
// = volume block) and syncs it.
func writeStamps(path string, o PopulateOptions) (uint64, error) {
	if o.StampEvery == 0 || o.Mapped == 0 {
		return 0, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var n uint64
	for vb := uint64(0); vb < o.Mapped; vb += o.StampEvery {
		if _, err := f.WriteAt(Stamp(vb), int64(vb*uint64(o.BlockSize))); err != nil {
			return n, err
		}
		n++
	}
	if last := o.Mapped - 1; last%o.StampEvery != 0 {
		if _, err := f.WriteAt(Stamp(last), int64(last*uint64(o.BlockSize))); err != nil {
			return n, err
		}
		n++
	}
	return n, f.Sync()
}

// populateMeta writes the map, bitmap and counters of o into the store
// of a pool that holds only the new, empty volume.
func populateMeta(path string, o PopulateOptions) error {
	s, err := pebblemeta.Open(path, pebblemeta.Options{})
	if err != nil {
		return err
	}
	err = populateStore(s, o)
	if cerr := s.Close(); err == nil {
		err = cerr
	}
	return err
}

func populateStore(s *pebblemeta.Store, o PopulateOptions) error {
	rec, err := s.Pool()
	if err != nil {
		return err
	}
	vols, err := s.Volumes()
	if err != nil {
		return err
	}
	if len(vols) != 1 || vols[0].Name != o.Volume || vols[0].Mapped != 0 || rec.Allocated != 0 {
		return fmt.Errorf("pool is not a fresh one holding only the empty volume %s", o.Volume)
	}
	vol := vols[0]
	// Map entries, in key order (the volume's head layer), a batch at a
	// time without sync: nothing points at the entries until the final
	// batch writes the counters, and that one syncs.
	b := s.NewBatch()
	for vb := uint64(0); vb < o.Mapped; vb++ {
		b.SetEntry(vol.Layer, vb, pebblemeta.Entry{Flags: pebblemeta.FlagMapped, PBlock: vb})
		if (vb+1)%populateBatch == 0 {
			if err := b.Commit(false); err != nil {
				return err
			}
			b = s.NewBatch()
		}
	}
	// Allocation bitmap: chunks of chunkBits blocks, 64-bit little-endian
	// words, bit i of word k is block chunk*chunkBits + 64k + i (thin's
	// persisted form). Physical blocks 0..Mapped-1 are owned.
	const chunkBits = 4096
	chunk := make([]byte, chunkBits/8)
	for c := uint64(0); c*chunkBits < o.Mapped; c++ {
		clear(chunk)
		n := min(o.Mapped-c*chunkBits, chunkBits)
		for i := uint64(0); i < n; i++ {
			chunk[i/64*8+i%64/8] |= 1 << (i % 8)
		}
		b.SetBitmapChunk(c, chunk)
	}
	vol.Mapped = o.Mapped
	b.SetVolume(vol)
	rec.Allocated = o.Mapped
	// Blocks below the mark may hold data (the stamps do); above it the
	// sparse file reads as zeros, as thin assumes.
	rec.ZeroFrom = max(rec.ZeroFrom, o.Mapped)
	b.SetPool(rec)
	if err := b.Commit(true); err != nil {
		return err
	}
	// Flush the memtable so that the next open does not replay a large
	// log (that would be charged to opening the pool).
	return s.Flush()
}

// CheckStamps reads the stamped blocks of o (every StampEvery-th, at
// most limit of them, 0: all) through v and compares them with Stamp;
// it returns how many it read.
func CheckStamps(v *thin.Volume, o PopulateOptions, limit int) (int, error) {
	if o.BlockSize == 0 {
		o.BlockSize = 64 << 10
	}
	buf := make([]byte, StampLen)
	n := 0
	check := func(vb uint64) error {
		if err := v.ReadAt([][]byte{buf}, int64(vb*uint64(o.BlockSize))); err != nil {
			return fmt.Errorf("%s: read block %d: %w", v.Name(), vb, err)
		}
		if !bytes.Equal(buf, Stamp(vb)) {
			return fmt.Errorf("%s: block %d reads %x, want its stamp %x", v.Name(), vb, buf, Stamp(vb))
		}
		n++
		return nil
	}
	if o.StampEvery == 0 || o.Mapped == 0 {
		return 0, nil
	}
	step := o.StampEvery
	if limit > 0 {
		// Spread the sample over the whole volume.
		if total := (o.Mapped + o.StampEvery - 1) / o.StampEvery; total > uint64(limit) {
			step = (total + uint64(limit) - 1) / uint64(limit) * o.StampEvery
		}
	}
	for vb := uint64(0); vb < o.Mapped; vb += step {
		if err := check(vb); err != nil {
			return n, err
		}
	}
	return n, check(o.Mapped - 1)
}
