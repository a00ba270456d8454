package pebblemeta

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// FormatVersion is the metadata format this code writes. A store written by
// a newer format is refused (ErrNewerFormat) rather than misread.
const FormatVersion = 1

var (
	// ErrNoStore: the directory holds no metadata store.
	ErrNoStore = errors.New("no thinblk metadata store")
	// ErrNewerFormat: the store was written by a newer thinblk.
	ErrNewerFormat = errors.New("metadata store has a newer format")
	// ErrExists: Create found a store already there.
	ErrExists = errors.New("metadata store already exists")
	// ErrStoreFailed: the store could not write or sync its log; it must
	// not be used further (reopen it).
	ErrStoreFailed = errors.New("metadata store failed")
)

// Options configure a Store.
type Options struct {
	// FS is the file system the store lives on; nil means the real one.
	// Tests pass vfs.NewCrashableMem() (or a CrashClone of it).
	FS vfs.FS
	// CacheSize bounds Pebble's block cache in bytes (default 32 MiB).
	// Map lookups go through this cache, so metadata memory stays bounded
	// however many blocks are mapped.
	CacheSize int64
	// Logger receives Pebble's log lines (default: discarded).
	Logger *slog.Logger
	// Headroom is host space, in bytes, that Open keeps allocated for the
	// store and gives up to Pebble when the file system is full
	// (headroom.go); 0: none. OnHeadroomUsed is called when some of it
	// was given up (on Pebble's writing goroutine: it must be quick).
	Headroom       int64
	OnHeadroomUsed func()
}

// Store is the Pebble-backed metadata of one pool: keys, values and
// batches, no policy.
type Store struct {
	View // reads see the latest committed batch
	db   *pebble.DB
	fs   vfs.FS

	headroom *headroom
}

// View reads the store: the live one (Store) or a frozen point in time
// (Snapshot).
type View struct{ r pebble.Reader }

// Snapshot is a consistent, unchanging view of the store as of its
// creation; later commits do not show. Close it when done.
type Snapshot struct {
	View
	snap *pebble.Snapshot
}

// Snapshot freezes the store's current state.
func (s *Store) Snapshot() *Snapshot {
	snap := s.db.NewSnapshot()
	return &Snapshot{View: View{r: snap}, snap: snap}
}

// Close releases the snapshot.
func (s *Snapshot) Close() error { return s.snap.Close() }

type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	if p.l != nil {
		p.l.Debug("pebble: " + fmt.Sprintf(format, args...))
	}
}

func (p pebbleLogger) Errorf(format string, args ...any) {
	if p.l != nil {
		p.l.Error("pebble: " + fmt.Sprintf(format, args...))
	}
}

func (p pebbleLogger) Fatalf(format string, args ...any) {
	msg := "pebble: " + fmt.Sprintf(format, args...)
	if p.l != nil {
		p.l.Error(msg)
	}
	panic(fatalError(msg)) // Pebble requires Fatalf not to return
}

// fatalError is what Fatalf panics with. Pebble calls it on the
// committing goroutine when the WAL cannot be written or synced (the disk
// refused it); Batch.Commit turns that into an error, so that the pool
// fails with a clear error instead of taking the process down.
type fatalError string

func (e fatalError) Error() string { return string(e) }

func (o Options) pebbleOptions() *pebble.Options {
	fs := o.FS
	if fs == nil {
		fs = vfs.Default
	}
	size := o.CacheSize
	if size <= 0 {
		size = 32 << 20
	}
	return &pebble.Options{
		FS:                 fs,
		Cache:              pebble.NewCache(size),
		Logger:             pebbleLogger{o.Logger},
		FormatMajorVersion: pebble.FormatNewest,
	}
}

// Create makes a new store in dir holding the format version and the pool
// record, durably.
func Create(dir string, pool PoolRecord, o Options) (*Store, error) {
	po := o.pebbleOptions()
	defer po.Cache.Unref()
	if err := po.FS.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create metadata store %s: %w", dir, err)
	}
	po.ErrorIfExists = true
	db, err := pebble.Open(dir, po)
	if errors.Is(err, pebble.ErrDBAlreadyExists) {
		return nil, fmt.Errorf("create metadata store %s: %w", dir, ErrExists)
	}
	if err != nil {
		return nil, fmt.Errorf("create metadata store %s: %w", dir, err)
	}
	s := &Store{View: View{r: db}, db: db, fs: po.FS}
	b := s.NewBatch()
	if err := b.b.Set(formatKey, EncodeFormat(FormatVersion), nil); err != nil {
		s.Close()
		return nil, err
	}
	b.SetPool(pool)
	if err := b.Commit(true); err != nil {
		s.Close()
		return nil, fmt.Errorf("create metadata store %s: %w", dir, err)
	}
	return s, nil
}

// Open opens the store in dir, refusing a missing store (ErrNoStore) and a
// newer format (ErrNewerFormat).
func Open(dir string, o Options) (*Store, error) {
	po := o.pebbleOptions()
	defer po.Cache.Unref()
	// Stat first so that opening a wrong path does not create it.
	if _, err := po.FS.Stat(dir); err != nil {
		return nil, fmt.Errorf("open metadata store %s: %w", dir, ErrNoStore)
	}
	h := newHeadroom(po.FS, dir, o.Headroom, o.OnHeadroomUsed)
	if h != nil {
		// Opening replays the log into a new table: the headroom may be
		// needed already.
		po.FS = vfs.OnDiskFull(po.FS, h.release)
	}
	po.ErrorIfNotExists = true
	db, err := pebble.Open(dir, po)
	if errors.Is(err, pebble.ErrDBDoesNotExist) {
		return nil, fmt.Errorf("open metadata store %s: %w", dir, ErrNoStore)
	}
	if err != nil {
		return nil, fmt.Errorf("open metadata store %s: %w", dir, err)
	}
	s := &Store{View: View{r: db}, db: db, fs: po.FS, headroom: h}
	v, closer, err := db.Get(formatKey)
	if err != nil {
		db.Close()
		if errors.Is(err, pebble.ErrNotFound) {
			return nil, fmt.Errorf("open metadata store %s: no format version: %w", dir, ErrNoStore)
		}
		return nil, fmt.Errorf("open metadata store %s: %w", dir, err)
	}
	ver, err := DecodeFormat(v)
	closer.Close()
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open metadata store %s: %w", dir, err)
	}
	if ver > FormatVersion {
		db.Close()
		return nil, fmt.Errorf("open metadata store %s: format %d, this thinblk reads up to %d: %w",
			dir, ver, FormatVersion, ErrNewerFormat)
	}
	return s, nil
}

// Close closes the store.
func (s *Store) Close() error { return s.db.Close() }

// Flush forces the memtable to disk; only useful for measuring disk usage.
func (s *Store) Flush() error { return s.db.Flush() }

// DiskUsage is the bytes the store occupies on disk.
func (s *Store) DiskUsage() uint64 { return s.db.Metrics().DiskSpaceUsage() }

// SetFormatForTest overwrites the format version (tests of the newer-format
// guard).
func (s *Store) SetFormatForTest(v uint32) error {
	return s.db.Set(formatKey, EncodeFormat(v), pebble.Sync)
}

func (s *View) get(key []byte, decode func([]byte) error) (bool, error) {
	v, closer, err := s.r.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer closer.Close()
	return true, decode(v)
}

// Pool reads the pool record.
func (s *View) Pool() (PoolRecord, error) {
	var p PoolRecord
	ok, err := s.get(poolKey, func(v []byte) (err error) { p, err = DecodePoolRecord(v); return })
	if err == nil && !ok {
		err = corruptf("no pool record")
	}
	if err != nil {
		return PoolRecord{}, fmt.Errorf("read pool record: %w", err)
	}
	return p, nil
}

// Volumes reads every volume record, in name order.
func (s *View) Volumes() ([]VolumeRecord, error) {
	it, err := s.r.NewIter(&pebble.IterOptions{LowerBound: []byte{kindVolume}, UpperBound: []byte{kindVolume + 1}})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out []VolumeRecord
	for it.First(); it.Valid(); it.Next() {
		name, err := ParseVolumeKey(it.Key())
		if err != nil {
			return nil, err
		}
		rec, err := DecodeVolumeRecord(it.Value())
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", name, err)
		}
		rec.Name = name
		out = append(out, rec)
	}
	return out, it.Error()
}

// Layers reads every layer record, in layer order.
func (s *View) Layers() ([]LayerRecord, error) {
	var out []LayerRecord
	err := s.iterate([]byte{kindLayer}, []byte{kindLayer + 1}, func(k, v []byte) error {
		l, err := ParseLayerKey(k)
		if err != nil {
			return err
		}
		rec, err := DecodeLayerRecord(v)
		if err != nil {
			return fmt.Errorf("layer %d: %w", l, err)
		}
		rec.Layer = l
		out = append(out, rec)
		return nil
	})
	return out, err
}

// MapEntry reads the entry of vblock in layer; ok is false when there is
// none (unmapped, not provisioned).
func (s *View) MapEntry(layer, vblock uint64) (e Entry, ok bool, err error) {
	var kb [MapKeyLen]byte
	ok, err = s.get(AppendMapKey(kb[:0], layer, vblock), func(v []byte) (err error) { e, err = DecodeEntry(v); return })
	if err != nil {
		return Entry{}, false, fmt.Errorf("read map entry %d/%d: %w", layer, vblock, err)
	}
	return e, ok, nil
}

// ErrStop may be returned by an iteration callback to end it early without
// an error.
var ErrStop = errors.New("stop iteration")

func (s *View) iterate(lo, hi []byte, fn func(k, v []byte) error) error {
	it, err := s.r.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return err
	}
	for it.First(); it.Valid(); it.Next() {
		if err := fn(it.Key(), it.Value()); err != nil {
			it.Close()
			if errors.Is(err, ErrStop) {
				return nil
			}
			return err
		}
	}
	if err := it.Error(); err != nil {
		it.Close()
		return err
	}
	return it.Close()
}

// LayerMap calls fn for every entry of layer with vblock >= from, in block
// order.
func (s *View) LayerMap(layer, from uint64, fn func(vblock uint64, e Entry) error) error {
	_, hi := mapLayerBounds(layer)
	return s.mapEntries(layer, AppendMapKey(nil, layer, from), hi, fn)
}

// MapRange calls fn for every entry of layer with first <= vblock <
// end, in block order: one bounded iterator, so that a caller loading a
// run of blocks pays for one seek rather than one per block.
func (s *View) MapRange(layer, first, end uint64, fn func(vblock uint64, e Entry) error) error {
	if end <= first {
		return nil
	}
	var lob, hib [MapKeyLen]byte
	return s.mapEntries(layer, AppendMapKey(lob[:0], layer, first), AppendMapKey(hib[:0], layer, end), fn)
}

// mapEntries decodes the map entries of layer with keys in [lo, hi).
func (s *View) mapEntries(layer uint64, lo, hi []byte, fn func(vblock uint64, e Entry) error) error {
	return s.iterate(lo, hi, func(k, v []byte) error {
		_, vb, err := ParseMapKey(k)
		if err != nil {
			return err
		}
		e, err := DecodeEntry(v)
		if err != nil {
			return fmt.Errorf("map entry %d/%d: %w", layer, vb, err)
		}
		return fn(vb, e)
	})
}

// AllMap calls fn for every map entry of every layer, in key order.
func (s *View) AllMap(fn func(layer, vblock uint64, e Entry) error) error {
	return s.iterate([]byte{kindMap}, []byte{kindMap + 1}, func(k, v []byte) error {
		l, vb, err := ParseMapKey(k)
		if err != nil {
			return err
		}
		e, err := DecodeEntry(v)
		if err != nil {
			return fmt.Errorf("map entry %d/%d: %w", l, vb, err)
		}
		return fn(l, vb, e)
	})
}

// BitmapChunks calls fn for every stored allocation-bitmap chunk in index
// order. bits is only valid during the call.
func (s *View) BitmapChunks(fn func(idx uint64, bits []byte) error) error {
	return s.iterate([]byte{kindBitmap}, []byte{kindBitmap + 1}, func(k, v []byte) error {
		idx, err := ParseBitmapKey(k)
		if err != nil {
			return err
		}
		return fn(idx, v)
	})
}

// SpareChunks calls fn for every stored spare-set chunk in index order.
// bits is only valid during the call. Older pools have none.
func (s *View) SpareChunks(fn func(idx uint64, bits []byte) error) error {
	return s.iterate([]byte{kindSpare}, []byte{kindSpare + 1}, func(k, v []byte) error {
		idx, err := ParseSpareKey(k)
		if err != nil {
			return err
		}
		return fn(idx, v)
	})
}

// Batch collects changes that commit atomically. Not safe for concurrent
// use.
type Batch struct {
	b   *pebble.Batch
	buf []byte
	err error
}

// NewBatch starts an empty batch.
func (s *Store) NewBatch() *Batch { return &Batch{b: s.db.NewBatch()} }

func (b *Batch) set(k, v []byte) {
	if b.err == nil {
		b.err = b.b.Set(k, v, nil)
	}
}

// SetPool stores the pool record.
func (b *Batch) SetPool(p PoolRecord) {
	b.buf = AppendPoolRecord(b.buf[:0], p)
	b.set(poolKey, b.buf)
}

// SetVolume stores a volume record under r.Name.
func (b *Batch) SetVolume(r VolumeRecord) {
	b.buf = AppendVolumeRecord(b.buf[:0], r)
	b.set(VolumeKey(r.Name), b.buf)
}

// DeleteVolume removes the record of name.
func (b *Batch) DeleteVolume(name string) {
	if b.err == nil {
		b.err = b.b.Delete(VolumeKey(name), nil)
	}
}

// SetEntry stores a map entry; an entry without flags deletes the key.
func (b *Batch) SetEntry(layer, vblock uint64, e Entry) {
	var kb [MapKeyLen]byte
	k := AppendMapKey(kb[:0], layer, vblock)
	if e.Flags == 0 {
		if b.err == nil {
			b.err = b.b.Delete(k, nil)
		}
		return
	}
	b.buf = AppendEntry(b.buf[:0], e)
	b.set(k, b.buf)
}

// DeleteLayer removes every map entry of layer (one range tombstone).
func (b *Batch) DeleteLayer(layer uint64) {
	lo, hi := mapLayerBounds(layer)
	if b.err == nil {
		b.err = b.b.DeleteRange(lo, hi, nil)
	}
}

// SetLayer stores a layer record under r.Layer.
func (b *Batch) SetLayer(r LayerRecord) {
	var kb [9]byte
	b.buf = AppendLayerRecord(b.buf[:0], r)
	b.set(AppendLayerKey(kb[:0], r.Layer), b.buf)
}

// DeleteLayerRecord removes the record of layer (not its map).
func (b *Batch) DeleteLayerRecord(layer uint64) {
	var kb [9]byte
	if b.err == nil {
		b.err = b.b.Delete(AppendLayerKey(kb[:0], layer), nil)
	}
}

// SetBitmapChunk stores one allocation-bitmap chunk.
func (b *Batch) SetBitmapChunk(idx uint64, bits []byte) {
	var kb [9]byte
	b.set(AppendBitmapKey(kb[:0], idx), bits)
}

// SetSpareChunk stores one spare-set chunk.
func (b *Batch) SetSpareChunk(idx uint64, bits []byte) {
	var kb [9]byte
	b.set(AppendSpareKey(kb[:0], idx), bits)
}

// Len is the encoded size of the batch in bytes.
func (b *Batch) Len() int { return b.b.Len() }

// Commit applies the batch atomically (durably when sync) and releases it.
func (b *Batch) Commit(sync bool) error {
	defer b.b.Close()
	if b.err != nil {
		return fmt.Errorf("build metadata batch: %w", b.err)
	}
	opts := pebble.NoSync
	if sync {
		opts = pebble.Sync
	}
	return commitBatch(b.b, opts)
}

func commitBatch(b *pebble.Batch, opts *pebble.WriteOptions) (err error) {
	defer func() {
		if p := recover(); p != nil {
			f, ok := p.(fatalError)
			if !ok {
				panic(p)
			}
			// Pebble's commit pipeline is unusable now: the caller must
			// stop using the store (a thin pool fails).
			err = fmt.Errorf("commit metadata batch: %w: %w", ErrStoreFailed, f)
		}
	}()
	if err := b.Commit(opts); err != nil {
		return fmt.Errorf("commit metadata batch: %w", err)
	}
	return nil
}

// Discard releases the batch without applying it.
func (b *Batch) Discard() { b.b.Close() }

var _ io.Closer = (*Store)(nil)
