package thin

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/pebblemeta"
)

// File names inside a pool directory.
const (
	dataName = "thinblk.data"
	metaName = "thinblk.meta"
	lockName = "thinblk.lock"
)

// maxSize bounds a pool's and a volume's size (4 EiB): every byte offset
// stays a positive int64 with room to add a request's length.
const maxSize = math.MaxInt64 / 2

// Errors callers can test for with errors.Is.
var (
	ErrNoSpace = errors.New("no space left in the thin pool")
	// ErrWithdrawn: a request waiting for space gave up because its caller
	// withdrew it; it changed nothing.
	ErrWithdrawn     = fmt.Errorf("request withdrawn while waiting for space: %w", blockdev.ErrWithdrawn)
	ErrNotPool       = errors.New("not a thinblk pool")
	ErrPoolExists    = errors.New("a thinblk pool already exists there")
	ErrLocked        = errors.New("pool is in use by another opener")
	ErrDataSize      = errors.New("data file size does not match the pool")
	ErrNewerFormat   = pebblemeta.ErrNewerFormat
	ErrVolumeExists  = errors.New("volume already exists")
	ErrNoVolume      = errors.New("no such volume")
	ErrVolumeDeleted = errors.New("volume was deleted")
	ErrInvalid       = errors.New("invalid argument")
	ErrClosed        = errors.New("pool is closed")
	ErrReadOnly      = errors.New("volume is a read-only snapshot")
	// ErrFailed: a commit failed (the disk refused a write or a sync), so
	// the pool refuses every request until it is opened again (see fail).
	ErrFailed = errors.New("pool failed")
)

// NoSpacePolicy says what a write that needs a new block does when the pool
// has no unreserved space.
type NoSpacePolicy uint8

const (
	// NoSpaceError fails the request at once.
	NoSpaceError NoSpacePolicy = 0
	// NoSpaceQueue waits until space appears or NoSpaceTimeout passes.
	NoSpaceQueue NoSpacePolicy = 1
	// NoSpacePause waits until space appears, however long that takes;
	// the OutOfSpace and SpaceAvailable events let the serving process
	// pause the VM meanwhile and resume it after, as QEMU does with
	// werror=enospc.
	NoSpacePause NoSpacePolicy = 2
)

func (n NoSpacePolicy) String() string {
	switch n {
	case NoSpaceError:
		return "error"
	case NoSpaceQueue:
		return "queue"
	case NoSpacePause:
		return "pause"
	}
	return fmt.Sprintf("NoSpacePolicy(%d)", uint8(n))
}

// ParseNoSpacePolicy parses "error", "queue" or "pause".
func ParseNoSpacePolicy(s string) (NoSpacePolicy, error) {
	switch s {
	case "error":
		return NoSpaceError, nil
	case "queue":
		return NoSpaceQueue, nil
	case "pause":
		return NoSpacePause, nil
	}
	return 0, fmt.Errorf("%w: no-space policy %q (want error, queue or pause)", ErrInvalid, s)
}

// CreateOptions configure a new pool.
type CreateOptions struct {
	Size           uint64        // pool size in bytes, a multiple of BlockSize
	BlockSize      uint32        // allocation unit; power of two, 4 KiB..16 MiB; default 64 KiB
	NoSpace        NoSpacePolicy // default NoSpaceError
	NoSpaceTimeout time.Duration // for NoSpaceQueue; default 60s
	LowWater       float64       // warn when free space falls below this fraction of the pool; 0 = off
	// DataDevice, when set, is a block device (an LVM logical volume, a
	// partition, a loop device) holding the pool's data instead of a
	// file: DIR/thinblk.data becomes a symlink to it. It must be at least
	// Size bytes. Its space is the pool's, so the host cannot run out
	// under it; freed blocks are discarded on it (zeroed by unmapping)
	// when it supports that.
	DataDevice string
	// Preallocate allocates the whole data file on the host at creation
	// (and what Grow adds): pool space is then always host space, and
	// freed blocks are never punched (their host space stays the pool's).
	Preallocate bool
}

// OpenOptions configure an opened pool.
type OpenOptions struct {
	Logger *slog.Logger // default: slog.Default()
	// CacheSize bounds the metadata cache (Pebble's block cache) in bytes;
	// default 32 MiB. The map is read through it, so memory does not grow
	// with the number of mapped blocks.
	CacheSize int64
	// FlushInterval is how often pending metadata is committed in the
	// background (so discarded space becomes reusable without a guest
	// FLUSH); default 2s, negative disables.
	FlushInterval time.Duration
	// MapCacheEntries bounds the in-memory cache of committed map entries
	// (16 bytes each, loaded by regions of 64 blocks that cost 4 entries
	// each beyond their entries); default 262144, negative disables.
	MapCacheEntries int
	// MaxPending is how many map changes may wait for a commit before one
	// is started regardless; default 65536. Bounds memory.
	MaxPending int
	// MetaHeadroom is host space, in bytes, kept for the metadata store
	// and given up to it when its file system is full (hostspace.go); 0: the
	// default, 1/16 of that file system, from 1 MiB to 64 MiB; negative:
	// none.
	MetaHeadroom int64

	env    *env    // tests: crashable file systems
	tuning *tuning // tests: internal limits (nil: defaultTuning)
}

// env is where a pool's files live: the real file system, or in tests a
// crashable one.
type env struct {
	fs       vfs.FS
	openData func(path string, create bool) (dataFile, error)
	// bootID names the boot the page cache belongs to (see intent.go);
	// crash tests give each simulated power cut a new one.
	bootID func() string
	// intentFS is where the intent log lives; nil: fs. Fault tests keep
	// it off the fault-injecting fs, whose points are Pebble's and the
	// data file's.
	intentFS vfs.FS
}

var osEnv = &env{fs: vfs.Default, openData: openOSDataFile, bootID: bootID}

// Create makes a new, empty pool in dir (created if missing; it must not
// already hold a pool).
func Create(dir string, o CreateOptions) error {
	return create(dir, o, osEnv)
}

func create(dir string, o CreateOptions, e *env) error {
	if o.BlockSize == 0 {
		o.BlockSize = 64 << 10
	}
	if o.NoSpaceTimeout == 0 {
		o.NoSpaceTimeout = 60 * time.Second
	}
	switch {
	case o.BlockSize < 4096 || o.BlockSize > 16<<20 || o.BlockSize&(o.BlockSize-1) != 0:
		return fmt.Errorf("create pool %s: %w: block size %d is not a power of two between 4 KiB and 16 MiB", dir, ErrInvalid, o.BlockSize)
	case o.Size == 0 || o.Size%uint64(o.BlockSize) != 0:
		return fmt.Errorf("create pool %s: %w: size %d is not a positive multiple of the block size %d", dir, ErrInvalid, o.Size, o.BlockSize)
	case o.Size > maxSize:
		return fmt.Errorf("create pool %s: %w: size %d is larger than the largest, %d (4 EiB)", dir, ErrInvalid, o.Size, uint64(maxSize))
	case o.NoSpace > NoSpacePause:
		return fmt.Errorf("create pool %s: %w: no-space policy %d", dir, ErrInvalid, o.NoSpace)
	case o.NoSpaceTimeout < 0:
		return fmt.Errorf("create pool %s: %w: negative no-space timeout", dir, ErrInvalid)
	case !(o.LowWater >= 0 && o.LowWater <= 1):
		return fmt.Errorf("create pool %s: %w: low water %v is not a fraction between 0 and 1", dir, ErrInvalid, o.LowWater)
	}
	fs := e.fs
	for _, n := range []string{dataName, metaName} {
		if _, err := fs.Stat(fs.PathJoin(dir, n)); err == nil {
			return fmt.Errorf("create pool %s: %w", dir, ErrPoolExists)
		}
	}
	_, statErr := fs.Stat(dir)
	madeDir := errors.Is(statErr, os.ErrNotExist)
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create pool %s: %w", dir, err)
	}
	lockPath := fs.PathJoin(dir, lockName)
	lock, err := fs.Lock(lockPath)
	if err != nil {
		return fmt.Errorf("create pool %s: %w (%v)", dir, ErrLocked, err)
	}
	defer lock.Close()
	dataPath := fs.PathJoin(dir, dataName)
	// A create that fails leaves nothing behind: not its files, and not the
	// directory if it made it, so that the same command can simply be run
	// again with other arguments.
	undo := func(err error) error {
		fs.Remove(dataPath)
		fs.RemoveAll(fs.PathJoin(dir, metaName))
		fs.Remove(lockPath)
		if madeDir {
			fs.Remove(dir)
		}
		return fmt.Errorf("create pool %s: %w", dir, err)
	}
	if o.DataDevice != "" {
		fi, err := os.Stat(o.DataDevice)
		if err != nil {
			return undo(fmt.Errorf("%w: data device: %v", ErrInvalid, err))
		}
		if fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
			return undo(fmt.Errorf("%w: data device %s is not a block device", ErrInvalid, o.DataDevice))
		}
		abs, _ := filepath.Abs(o.DataDevice)
		if err := os.Symlink(abs, dataPath); err != nil {
			return undo(err)
		}
	}
	df, err := e.openData(dataPath, true)
	if err != nil {
		return undo(fmt.Errorf("data file: %w", err))
	}
	fail := func(err error) error {
		df.Close()
		return undo(err)
	}
	if err := df.Truncate(int64(o.Size)); err != nil {
		return fail(err)
	}
	if o.Preallocate {
		if err := df.Allocate(0, int64(o.Size)); err != nil {
			return fail(fmt.Errorf("preallocate the data file: %w", hostError(err, o.Size/uint64(o.BlockSize))))
		}
	}
	if err := df.Sync(); err != nil {
		return fail(err)
	}
	rec := pebblemeta.PoolRecord{
		BlockSize:      o.BlockSize,
		SizeBlocks:     o.Size / uint64(o.BlockSize),
		NoSpace:        uint8(o.NoSpace),
		NoSpaceTimeout: uint64(o.NoSpaceTimeout),
		LowWaterPPM:    uint32(math.Round(o.LowWater * 1e6)),
		NextLayer:      1,
	}
	if o.Preallocate {
		rec.Flags |= pebblemeta.PoolPreallocated
	}
	if o.DataDevice != "" {
		rec.ZeroFrom = rec.SizeBlocks // a device may hold anything: pad every first write
	}
	st, err := pebblemeta.Create(fs.PathJoin(dir, metaName), rec, pebblemeta.Options{FS: fs})
	if err != nil {
		return fail(err)
	}
	if err := st.Close(); err != nil {
		return fail(err)
	}
	if err := df.Close(); err != nil {
		return fail(err)
	}
	// Make the new names durable: the pool's files, and the pool directory
	// itself in its parent.
	for _, d := range []string{dir, fs.PathDir(dir)} {
		if err := syncDir(fs, d); err != nil {
			return fail(err)
		}
	}
	return nil
}

func syncDir(fs vfs.FS, dir string) error {
	d, err := fs.OpenDir(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// Pool is an open thin pool. It is safe for concurrent use.
//
// Its state is grouped by concern, each group a struct in the file that
// works on it. One mutex, mu, guards every group (but for the fields a
// group marks as atomic or under flushMu): a request touches several
// concerns in one step (a first write allocates a block, maps it and
// dirties the next commit), and one lock keeps each step whole.
type Pool struct {
	// Set at Open.
	dir       string
	log       *slog.Logger
	store     *pebblemeta.Store
	data      dataFile
	lock      io.Closer
	blockSize int64
	shift     uint
	opts      OpenOptions
	tune      tuning

	// flushMu serialises commits and management operations.
	flushMu sync.Mutex
	// ioGate is held shared by every data I/O and exclusively while freed
	// blocks become reusable, so that no read or write still aimed at a
	// freed block can land after another volume got it (gate.go).
	ioGate sync.RWMutex

	mu  sync.Mutex
	rec pebblemeta.PoolRecord // config and counters, as they will be committed

	commitState    // commit and release (commit.go)
	blockMap       // the map: pending changes over the committed map (blockmap.go)
	allocation     // physical blocks and free space (alloc.go)
	hostState      // the promise against the host: spares backing reservations (host.go)
	hostSpaceState // the host's free space, watched and waited for; the metadata's headroom (hostspace.go)
	catalogue      // volumes and layers (catalogue.go)
	eventQueue     // events for watchers (events.go)

	// Life cycle, under mu.
	failed       error // why the pool refuses requests after a failed commit (fail)
	closed       bool
	closeStarted bool
	closing      chan struct{} // closed by Close: the background committer stops
	bgDone       chan struct{} // closed when it has

	// trace, when set (SetTrace), gets the blocks every request resolved
	// to; off, it costs a nil check.
	trace atomic.Pointer[TraceFunc]
}

// Open opens the pool in dir exclusively.
func Open(dir string, o OpenOptions) (*Pool, error) {
	return open(dir, o, osEnv)
}

func open(dir string, o OpenOptions, e *env) (*Pool, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.FlushInterval == 0 {
		o.FlushInterval = 2 * time.Second
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 65536
	}
	if o.MapCacheEntries == 0 {
		o.MapCacheEntries = 1 << 18
	}
	fs := e.fs
	if fi, err := fs.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open pool %s: %w (no such directory)", dir, ErrNotPool)
	} else if err != nil {
		return nil, fmt.Errorf("open pool %s: %w", dir, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("open pool %s: %w (not a directory)", dir, ErrNotPool)
	}
	for _, n := range []string{metaName, dataName} {
		if _, err := fs.Stat(fs.PathJoin(dir, n)); err != nil {
			return nil, fmt.Errorf("open pool %s: %w (no %s)", dir, ErrNotPool, n)
		}
	}
	lock, err := fs.Lock(fs.PathJoin(dir, lockName))
	if err != nil {
		return nil, fmt.Errorf("open pool %s: %w (%v)", dir, ErrLocked, err)
	}
	p := &Pool{dir: dir, log: o.Logger, lock: lock, opts: o, tune: defaultTuning()}
	if o.tuning != nil {
		p.tune = *o.tuning
	}
	fail := func(err error) (*Pool, error) {
		if p.store != nil {
			p.store.Close()
		}
		if p.data != nil {
			p.data.Close()
		}
		lock.Close()
		return nil, fmt.Errorf("open pool %s: %w", dir, err)
	}
	p.store, err = pebblemeta.Open(fs.PathJoin(dir, metaName), pebblemeta.Options{FS: fs, CacheSize: o.CacheSize, Logger: o.Logger,
		Headroom: metaHeadroom(fs, fs.PathJoin(dir, metaName), o.MetaHeadroom), OnHeadroomUsed: p.headroomUsed})
	if err != nil {
		if errors.Is(err, pebblemeta.ErrNoStore) {
			err = fmt.Errorf("%w: %v", ErrNotPool, err)
		}
		return fail(err)
	}
	p.rec, err = p.store.Pool()
	if err != nil {
		return fail(err)
	}
	bs := p.rec.BlockSize
	if bs < 4096 || bs&(bs-1) != 0 || p.rec.SizeBlocks == 0 || p.rec.SizeBlocks > math.MaxInt64/uint64(bs) {
		return fail(fmt.Errorf("%w: pool record has block size %d, %d blocks", pebblemeta.ErrCorrupt, bs, p.rec.SizeBlocks))
	}
	p.blockSize = int64(bs)
	for 1<<p.shift != p.blockSize {
		p.shift++
	}
	p.data, err = e.openData(fs.PathJoin(dir, dataName), false)
	if err != nil {
		return fail(fmt.Errorf("data file: %w", err))
	}
	size, err := p.data.Size()
	if err != nil {
		return fail(fmt.Errorf("data file: %w", err))
	}
	want := int64(p.rec.SizeBlocks) * p.blockSize
	switch {
	case size < want:
		return fail(fmt.Errorf("%w: %s is %d bytes, the pool needs %d", ErrDataSize, dataName, size, want))
	case size > want:
		// A grow that extended the file but crashed before committing.
		p.log.Warn("data file larger than the pool; the extra space is unused until the pool grows",
			"pool", dir, "file_bytes", size, "pool_bytes", want)
	}
	if d, ok := p.data.(interface{ isDevice() bool }); ok && d.isDevice() {
		p.thick = true // a device's space is all the pool's; punching discards on it
	}
	if p.rec.Flags&pebblemeta.PoolPreallocated != 0 {
		// Every block is host space already: no spares, and no punching
		// (it would give the host what the pool must keep).
		p.thick = true
		p.noPunch.Store(true)
	}
	p.zeroDurable, p.zeroMark = p.rec.ZeroFrom, p.rec.ZeroFrom
	p.alloc = newBitmap(p.rec.SizeBlocks)
	p.pend = newBitmap(p.rec.SizeBlocks)
	p.inflight = newBitmap(p.rec.SizeBlocks)
	p.spareFills = newBitmap(p.rec.SizeBlocks)
	p.spareKept = newBitmap(p.rec.SizeBlocks)
	p.zeroed = newBitmap(p.rec.SizeBlocks)
	p.unpunched = newBitmap(p.rec.SizeBlocks)
	p.punching = newBitmap(p.rec.SizeBlocks)
	p.spare = newBitmap(p.rec.SizeBlocks)
	p.backing = newBitmap(p.rec.SizeBlocks)
	p.spareChunks = map[uint64]struct{}{}
	err = p.store.SpareChunks(func(idx uint64, bits []byte) error {
		if !p.spare.loadChunk(idx, bits) {
			return fmt.Errorf("%w: spare set chunk %d", pebblemeta.ErrCorrupt, idx)
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	err = p.store.BitmapChunks(func(idx uint64, bits []byte) error {
		if !p.alloc.loadChunk(idx, bits) {
			return fmt.Errorf("%w: allocation bitmap chunk %d", pebblemeta.ErrCorrupt, idx)
		}
		return nil
	})
	if err != nil {
		return fail(err)
	}
	if p.alloc.count != p.rec.Allocated {
		p.log.Warn("allocation bitmap disagrees with the pool's counter; run check", "pool", dir,
			"bitmap_blocks", p.alloc.count, "counter_blocks", p.rec.Allocated)
	}
	recs, err := p.store.Volumes()
	if err != nil {
		return fail(err)
	}
	p.vols = make(map[string]*volState, len(recs))
	for _, r := range recs {
		v := &volState{rec: r}
		p.vols[r.Name] = v
		p.reaccountLocked(v)
	}
	if err := p.loadLayers(); err != nil {
		return fail(err)
	}
	p.dirtyVols = map[*volState]struct{}{}
	p.dirty = map[mapKey]pebblemeta.Entry{}
	p.cache = newMapCache(p.opts.MapCacheEntries)
	p.dirtyChunks = map[uint64]struct{}{}
	p.filling = map[mapKey]*fill{}
	p.spaceCh = make(chan struct{})
	p.watchers = map[int]func(Event){}
	p.kick = make(chan struct{}, 1)
	p.closing = make(chan struct{})
	p.bgDone = make(chan struct{})
	p.belowLow = p.freeLocked() < p.lowWaterBlocks()
	p.openHeadroom()
	// A process before this one may have left written data in the page
	// cache, unsynced (a kill): the first FLUSH must sync it even when
	// this process wrote nothing yet.
	p.dataDirty.Store(true)
	boot := ""
	if e.bootID != nil {
		boot = e.bootID()
	}
	ifs := fs
	if e.intentFS != nil {
		ifs = e.intentFS
	}
	if err := p.replayIntent(ifs, boot); err != nil {
		return fail(err)
	}
	// Spares after the replay: its blocks are free in the committed state,
	// and backing spares would take (and, failing, punch) them.
	p.openSpares()
	p.noteHostSpace()
	go p.background()
	return p, nil
}

// Close commits pending changes and closes the pool. Volumes of a closed
// pool fail every request.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed || p.closeStarted {
		p.mu.Unlock()
		return ErrClosed
	}
	p.closeStarted = true
	p.mu.Unlock()
	close(p.closing)
	<-p.bgDone
	err := p.commit()
	p.flushMu.Lock()
	p.awaitReleaseLocked() // of a FLUSH that raced with Close
	p.mu.Lock()
	p.closed = true
	close(p.spaceCh) // wake queued writers; they see closed
	p.spaceCh = make(chan struct{})
	p.mu.Unlock()
	p.flushMu.Unlock()
	// Wait for requests in flight.
	p.ioGate.Lock()
	defer p.ioGate.Unlock()
	if err == nil && p.intent != nil {
		// Everything is committed: nothing is left to replay.
		err = p.intent.retire()
	}
	if e := p.store.Close(); err == nil {
		err = e
	}
	if e := p.data.Close(); err == nil {
		err = e
	}
	if e := p.lock.Close(); err == nil {
		err = e
	}
	return err
}

// usableLocked reports why the pool cannot serve requests, or nil.
func (p *Pool) usableLocked() error {
	if p.closed {
		return ErrClosed
	}
	return p.failed
}

// BlockSize is the pool's allocation unit in bytes.
func (p *Pool) BlockSize() uint32 { return uint32(p.blockSize) }

// Dir is the pool directory.
func (p *Pool) Dir() string { return p.dir }

// IsPool reports whether dir looks like a pool directory (for tools that
// must not create one by accident).
func IsPool(dir string) bool {
	for _, n := range []string{dataName, metaName} {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			return false
		}
	}
	return true
}
