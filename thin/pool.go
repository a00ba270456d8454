package thin

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/latency"
	"github.com/thinblk/thinblk/pebblemeta"
)

// File names inside a pool directory.
const (
	dataName = "thinblk.data"
	metaName = "thinblk.meta"
	lockName = "thinblk.lock"
)

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
	// and given up to it when its file system is full (host.go); 0: the
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
	case o.Size > math.MaxInt64/2:
		return fmt.Errorf("create pool %s: %w: size %d too large", dir, ErrInvalid, o.Size)
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
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create pool %s: %w", dir, err)
	}
	lock, err := fs.Lock(fs.PathJoin(dir, lockName))
	if err != nil {
		return fmt.Errorf("create pool %s: %w (%v)", dir, ErrLocked, err)
	}
	defer lock.Close()
	dataPath := fs.PathJoin(dir, dataName)
	if o.DataDevice != "" {
		fi, err := os.Stat(o.DataDevice)
		if err != nil || fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
			return fmt.Errorf("create pool %s: %w: data device %s is not a block device (%v)", dir, ErrInvalid, o.DataDevice, err)
		}
		abs, _ := filepath.Abs(o.DataDevice)
		if err := os.Symlink(abs, dataPath); err != nil {
			return fmt.Errorf("create pool %s: %w", dir, err)
		}
	}
	df, err := e.openData(dataPath, true)
	if err != nil {
		return fmt.Errorf("create pool %s: data file: %w", dir, err)
	}
	fail := func(err error) error {
		df.Close()
		fs.Remove(dataPath)
		fs.RemoveAll(fs.PathJoin(dir, metaName))
		return fmt.Errorf("create pool %s: %w", dir, err)
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

type mapKey struct{ layer, vb uint64 }

// fill marks a block whose first write is in flight: it has a physical
// block but its map entry is published only once the data is written, and
// every other request touching it waits.
type fill struct {
	done        chan struct{}
	pblock      uint64
	prev        pebblemeta.Entry
	ancProv     bool             // prev is empty and an ancestor's provisioned entry decided the block
	ancLayer    uint64           // the ancestor layer whose entry this fill overrides (0: none)
	anc         pebblemeta.Entry // that entry
	fromReserve bool             // the block comes out of a reservation (see reserve.go)
	spare       bool             // the block was a spare (host.go)
	fromRecv    bool             // a receive's hold reserved it; its spare backs it (receive.go)
	zero        bool             // the block was never written: no padding needed
	flags       uint8            // the provisioned bit the new entry keeps
}

type volState struct {
	rec     pebblemeta.VolumeRecord
	deleted bool
	handle  *Volume
	extra   uint64 // blocks reserved for it beyond its head's reservation entries (reserve.go)
	recvRes uint64 // of extra: blocks a stream being received into it still has reserved (receive.go)
}

// Pool is an open thin pool. It is safe for concurrent use.
type Pool struct {
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
	// releaseDone, under flushMu, is closed when the release phase of the
	// last commit that freed blocks (punch them, make them reusable) has
	// finished; nil when none ran since it was last waited for.
	releaseDone chan struct{}
	// ioGate is held shared by every data I/O and exclusively while freed
	// blocks become reusable, so that no read or write still aimed at a
	// freed block can land after another volume got it.
	ioGate sync.RWMutex

	opSeq      atomic.Uint64 // completed I/O operations
	durableSeq uint64        // opSeq covered by the last commit (flushMu)
	dataDirty  atomic.Bool   // data written since the last fdatasync

	mu          sync.Mutex
	rec         pebblemeta.PoolRecord // config and counters, as they will be committed
	alloc       *bitmap               // blocks with an owner, in flight, or freed but not yet reusable
	pend        *bitmap               // freed since the last cut
	pendOld     *bitmap               // freed in the cut being committed
	pendSpare   *bitmap               // cleared bitmap for the next swap
	inflight    *bitmap               // allocated, data being written, not yet in the map
	inflightRes uint64                // in-flight blocks that consume a reservation
	extra       uint64                // sum of the volumes' extra reservations
	cursor      uint64                // next-fit allocation cursor
	// Blocks at or above zeroDurable (the committed rec.ZeroFrom) were
	// never written; blocks at or above zeroMark were not written since
	// either, so a partial first write there needs no zero padding. A
	// new pool has ZeroFrom 0: its sparse data file reads as zeros.
	zeroDurable uint64
	zeroMark    uint64
	// zeroed holds freed blocks whose data was punched out of the data
	// file before they became reusable, so they read as zeros like
	// never-written ones. Memory only: after a restart freed blocks are
	// padded again. See punchReleased.
	zeroed  *bitmap
	noPunch atomic.Bool // the data file cannot punch holes
	// unpunched holds free blocks a release did not punch within its
	// budget, punching the ones a later pass is punching (punchlater.go).
	unpunched, punching *bitmap
	// trace, when set (SetTrace), gets the blocks every request resolved
	// to; off, it costs a nil check.
	trace atomic.Pointer[TraceFunc]
	// Host backing of reservations (host.go).
	spare        *bitmap             // free blocks kept host-allocated for reservations
	backing      *bitmap             // free blocks being host-allocated to become spares
	spareWant    uint64              // spares operations in progress are about to reserve
	spareChunks  map[uint64]struct{} // spare-set chunks to persist
	spareFills   *bitmap             // in flight blocks taken from spares: persisted as spares until published
	thick        bool                // the whole data store is host-allocated: no spares needed
	metaShared   bool                // the metadata's file system holds the data file too
	headroomUses atomic.Int64        // times the metadata store used some of its headroom
	noAlloc      atomic.Bool         // the data file cannot allocate ahead
	vols         map[string]*volState
	dirtyVols    map[*volState]struct{}
	deadLayers   []uint64
	layers       map[uint64]*layerState // layers with a record: a parent, or frozen
	heads        map[uint64]*volState   // unfrozen layer -> the volume writing it
	dirtyLayers  map[uint64]struct{}
	deadLayerRec []uint64
	deadVols     []string
	dirty        map[mapKey]pebblemeta.Entry // changes since the last cut; Flags==0 deletes
	committing   map[mapKey]pebblemeta.Entry // the cut being committed
	cache        *mapCache                   // committed entries by region; bounded
	dirtyChunks  map[uint64]struct{}
	metaDirty    bool
	intent       *intentLog // map changes since the last cut, for a killed process (intent.go)
	intentSkip   bool       // map changes of a management operation: it commits before returning
	intentErrLog time.Time  // when an intent log failure was last logged
	// Batches of map changes the intent log could not take, and how many
	// of them a durable commit covers (commitUnlogged).
	unloggedSeq, unloggedDurable atomic.Uint64
	filling                      map[mapKey]*fill
	spaceCh                      chan struct{} // closed (and replaced) whenever space is freed
	outOfSpace                   bool          // a request found no space, and none appeared since
	hostOut                      bool          // a request found the host file system full, and it has not had space since
	hostLow                      bool          // the host's free space was below the low-water mark at the last look
	hostFull                     bool          // the host had no space for a block at the last look
	belowLow                     bool
	failed                       error
	closed                       bool
	closeStarted                 bool
	watchers                     map[int]func(Event)
	events                       []Event // committed changes not yet delivered to watchers
	deliverMu                    sync.Mutex
	nextWatch                    int
	lastNoSpace                  time.Time
	spaceWaits                   map[string]int // requests waiting for space, by volume (metrics.go)

	// commits times the metadata commits (data sync and Pebble batch).
	commits latency.Histogram

	kick    chan struct{}
	closing chan struct{}
	bgDone  chan struct{}
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
	if fi, err := fs.Stat(dir); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("open pool %s: %w (no such directory)", dir, ErrNotPool)
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

// background commits pending metadata periodically and when kicked (too
// many pending changes, or space waiting to be released).
func (p *Pool) background() {
	defer close(p.bgDone)
	var tick <-chan time.Time
	if p.opts.FlushInterval > 0 {
		t := time.NewTicker(p.opts.FlushInterval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-p.closing:
			return
		case <-tick:
			p.noteHostSpace()
			// A quarter of the budget per tick: each punch holds the
			// data file's inode lock, which guest writes wait for.
			p.punchLater(p.tune.punchBudget / 4)
		case <-p.kick:
		}
		if !p.metaPending() {
			// Only data written in place: it becomes durable at the
			// guest's FLUSH, as on a raw disk; syncing it here would
			// write the page cache back every interval for nothing.
			continue
		}
		p.flushMu.Lock()
		err := p.commitCutLocked()
		p.flushMu.Unlock()
		if err != nil && !errors.Is(err, ErrClosed) {
			p.log.Error("background metadata commit failed", "pool", p.dir, "err", err)
		}
	}
}

// metaPending reports whether metadata changes wait for a commit.
func (p *Pool) metaPending() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.metaPendingLocked()
}

func (p *Pool) metaPendingLocked() bool {
	return len(p.dirty) > 0 || p.metaDirty || len(p.dirtyVols) > 0 || len(p.dirtyChunks) > 0 || len(p.dirtyLayers) > 0 ||
		len(p.spareChunks) > 0 || p.spareExcessLocked() ||
		p.pend.count > 0 // freed blocks a commit has yet to make reusable
}

func (p *Pool) kickCommit() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
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

// freeLocked is the number of blocks neither allocated (or on their way
// to being free) nor reserved.
func (p *Pool) freeLocked() uint64 {
	used := p.alloc.count + p.rec.Reserved + p.extra - p.inflightRes
	if used >= p.rec.SizeBlocks {
		return 0
	}
	return p.rec.SizeBlocks - used
}

func (p *Pool) lowWaterBlocks() uint64 {
	return uint64(float64(p.rec.SizeBlocks) * float64(p.rec.LowWaterPPM) / 1e6)
}

// noteSpaceLocked logs low-water crossings (once per crossing).
func (p *Pool) noteSpaceLocked() {
	if p.rec.LowWaterPPM == 0 {
		return
	}
	below := p.freeLocked() < p.lowWaterBlocks()
	if below != p.belowLow {
		p.belowLow = below
		free := p.freeLocked() * uint64(p.blockSize)
		if below {
			p.log.Warn("thin pool free space fell below the low-water mark", "pool", p.dir,
				"free_bytes", free, "low_water_bytes", p.lowWaterBlocks()*uint64(p.blockSize))
			p.notifyAsyncLocked(Event{Type: LowWater, Free: free})
		} else {
			p.notifyAsyncLocked(Event{Type: AboveLowWater, Free: free})
			p.log.Info("thin pool free space is above the low-water mark again", "pool", p.dir,
				"free_bytes", p.freeLocked()*uint64(p.blockSize))
		}
	}
}

func (p *Pool) spaceFreedLocked() {
	close(p.spaceCh)
	p.spaceCh = make(chan struct{})
	p.noteSpaceLocked()
	if p.outOfSpace && p.freeLocked() > 0 {
		p.outOfSpace = false
		p.notifyAsyncLocked(Event{Type: SpaceAvailable, Free: p.freeLocked() * uint64(p.blockSize)})
	}
}

// notifyAsyncLocked queues a space event and delivers it from another
// goroutine: space events arise on I/O paths, where a watcher (which may
// call out to QEMU, say) must not hold up the request.
func (p *Pool) notifyAsyncLocked(ev Event) {
	p.events = append(p.events, ev)
	go p.deliver()
}

// freeLocked releases a block whose map entry was removed: it becomes
// reusable only after the removal is durable.
func (p *Pool) releaseLocked(b uint64) {
	p.pend.set(b)
	p.dirtyChunks[b/chunkBlocks] = struct{}{}
}

// lookupLocked returns the current entry of k: pending changes first,
// then the committed map.
func (p *Pool) lookupLocked(k mapKey) (pebblemeta.Entry, error) {
	if e, ok := p.dirty[k]; ok {
		return e, nil
	}
	if e, ok := p.committing[k]; ok {
		return e, nil
	}
	rk, i := regionOf(k)
	r := p.cache.get(rk)
	if r == nil {
		var err error
		if r, err = p.loadRegionLocked(rk); err != nil {
			return pebblemeta.Entry{}, err
		}
	}
	e := r.get(i)
	if err := p.validLocked(k, e); err != nil {
		return pebblemeta.Entry{}, err
	}
	return e, nil
}

// loadRegionLocked reads a region's committed entries from the store and
// caches them.
func (p *Pool) loadRegionLocked(rk regionKey) (*mapRegion, error) {
	r := &mapRegion{}
	first := rk.region << regionShift
	err := p.store.MapRange(rk.layer, first, first+regionBlocks, func(vb uint64, e pebblemeta.Entry) error {
		if e.Flags != 0 {
			r.present |= 1 << (vb - first)
			r.entries = append(r.entries, e)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	p.cache.add(rk, r)
	return r, nil
}

// validLocked rejects a stored entry that points outside the pool, so
// that corrupt metadata fails requests instead of crashing the process.
func (p *Pool) validLocked(k mapKey, e pebblemeta.Entry) error {
	if e.Mapped() && e.PBlock >= p.rec.SizeBlocks {
		return fmt.Errorf("%w: map entry %d/%d points at block %d beyond the pool (run check)",
			pebblemeta.ErrCorrupt, k.layer, k.vb, e.PBlock)
	}
	return nil
}

// rangeLocked calls fn for every existing entry of layer in [first, last],
// in no particular order.
func (p *Pool) rangeLocked(layer, first, last uint64, fn func(vb uint64, e pebblemeta.Entry)) error {
	if last-first < p.tune.rangeLookupMax {
		for vb := first; ; vb++ {
			e, err := p.lookupLocked(mapKey{layer, vb})
			if err != nil {
				return err
			}
			if e.Flags != 0 {
				fn(vb, e)
			}
			if vb == last {
				return nil
			}
		}
	}
	found := map[uint64]pebblemeta.Entry{}
	err := p.store.LayerMap(layer, first, func(vb uint64, e pebblemeta.Entry) error {
		if vb > last {
			return pebblemeta.ErrStop
		}
		found[vb] = e
		return p.validLocked(mapKey{layer, vb}, e)
	})
	if err != nil {
		return err
	}
	// Overlay pending changes: probe each block of the range, or scan the
	// pending maps, whichever is less work.
	for _, m := range []map[mapKey]pebblemeta.Entry{p.committing, p.dirty} {
		if last-first < uint64(len(m)) {
			for vb := first; ; vb++ {
				if e, ok := m[mapKey{layer, vb}]; ok {
					found[vb] = e
				}
				if vb == last {
					break
				}
			}
			continue
		}
		for k, e := range m {
			if k.layer == layer && k.vb >= first && k.vb <= last {
				found[k.vb] = e
			}
		}
	}
	for vb, e := range found {
		if e.Flags != 0 {
			fn(vb, e)
		}
	}
	return nil
}

// setLocked records a map change in v's head layer and adjusts every
// counter it affects. ancProv is whether the entry an ancestor layer has
// for vb (what decides vb while the head has none) is provisioned.
func (p *Pool) setLocked(v *volState, vb uint64, old, e pebblemeta.Entry, ancProv bool) {
	p.setEntryLocked(v.rec.Layer, vb, old, e, ancProv)
}

// setEntryLocked records a map change in layer; the layer's counters are
// its volume's (an unfrozen head) or its layer record's (frozen). Only
// reservation entries in heads count in the pool's reserved blocks: a
// frozen layer's reservation is never written through, and every
// writable sharer of it has a reservation of its own (see reserve.go).
func (p *Pool) setEntryLocked(layer, vb uint64, old, e pebblemeta.Entry, ancProv bool) {
	p.dirty[mapKey{layer, vb}] = e
	if p.intent != nil && !p.intentSkip {
		p.intent.add(mapKey{layer, vb}, e)
	}
	var scratch pebblemeta.LayerRecord
	mc, prc, rc := &scratch.Mapped, &scratch.Provisioned, &scratch.Reserved
	poolRes := &p.rec.Reserved
	head := p.heads[layer]
	if head != nil {
		mc, prc, rc = &head.rec.Mapped, &head.rec.Provisioned, &head.rec.Reserved
		p.dirtyVols[head] = struct{}{}
	} else if l := p.layers[layer]; l != nil {
		mc, prc, rc = &l.rec.Mapped, &l.rec.Provisioned, &l.rec.Reserved
		p.dirtyLayers[layer] = struct{}{}
		if l.rec.Frozen {
			poolRes = nil
		}
	}
	d := func(had, has bool, vc, pc *uint64) {
		switch {
		case had && !has:
			*vc--
			if pc != nil {
				*pc--
			}
		case !had && has:
			*vc++
			if pc != nil {
				*pc++
			}
		}
	}
	d(old.Mapped(), e.Mapped(), mc, &p.rec.Allocated)
	d(old.Provisioned(), e.Provisioned(), prc, nil)
	d(old.Reserved(), e.Reserved(), rc, poolRes)
	if head != nil {
		// What decides vb for the volume, before and after.
		was, is := old.Provisioned(), e.Provisioned()
		if old.Flags == 0 {
			was = ancProv
		}
		if e.Flags == 0 {
			is = ancProv
		}
		d(was, is, &head.rec.ChainProv, nil)
		p.reaccountLocked(head)
	}
}

// Flush makes every operation completed before it durable (data first,
// then the metadata pointing at it).
func (p *Pool) Flush() error {
	want := p.opSeq.Load()
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	if p.durableSeq >= want && want > 0 {
		return nil // a commit that started after our writes completed covered them
	}
	// Durable is all a FLUSH needs: it does not wait for freed blocks to
	// be punched and made reusable (a second after a large trim).
	return p.commitCutLocked()
}

func (p *Pool) commit() error {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	return p.commitLocked()
}

// commitLocked commits (commitCutLocked) and waits until the blocks it
// freed are reusable: for callers that then count or hand out space.
func (p *Pool) commitLocked() error {
	if err := p.commitCutLocked(); err != nil {
		return err
	}
	p.awaitReleaseLocked()
	return nil
}

// awaitReleaseLocked waits for the last release phase to finish.
func (p *Pool) awaitReleaseLocked() {
	if p.releaseDone != nil {
		<-p.releaseDone
		p.releaseDone = nil
	}
}

// commitCutLocked cuts the pending changes, makes the data durable and
// commits the metadata durably; then a release phase, on a goroutine of
// its own, lets the blocks this commit freed be reused (see
// releaseBlocks).
func (p *Pool) commitCutLocked() error {
	// Freed blocks go through pendOld, which the previous release phase
	// holds until it ends: with more to release, wait for it (two large
	// releases in a row). Blocks freed after this look wait for the next
	// commit (see the cut below).
	if p.releaseDone != nil {
		p.mu.Lock()
		more := p.pend.count > 0
		p.mu.Unlock()
		if more {
			p.awaitReleaseLocked()
		}
	}
	p.mu.Lock()
	if err := p.usableLocked(); err != nil {
		p.mu.Unlock()
		return err
	}
	seq := p.opSeq.Load()
	unlogged := p.unloggedSeq.Load()
	if !p.metaPendingLocked() {
		// Only data to make durable (overwrites in place, zeroing).
		p.mu.Unlock()
		if p.dataDirty.Swap(false) {
			if err := p.data.Sync(); err != nil {
				return p.fail(err)
			}
		}
		p.durableSeq = seq
		p.noteUnloggedDurable(unlogged)
		return nil
	}
	p.trimSparesLocked()
	b := p.store.NewBatch()
	for k, e := range p.dirty {
		b.SetEntry(k.layer, k.vb, e)
	}
	for _, l := range p.deadLayers {
		b.DeleteLayer(l)
	}
	for _, n := range p.deadVols {
		b.DeleteVolume(n)
	}
	for _, l := range p.deadLayerRec {
		b.DeleteLayerRecord(l)
	}
	for l := range p.dirtyLayers {
		if ls := p.layers[l]; ls != nil {
			b.SetLayer(ls.rec)
		}
	}
	for v := range p.dirtyVols {
		if !v.deleted {
			b.SetVolume(v.rec)
		}
	}
	// Chunks leave out blocks freed in this cut (their owners' entries are
	// deleted in this batch), blocks still being filled (their entries
	// are not in it), and blocks an earlier commit freed that its release
	// phase has not yet cleared from alloc.
	exclude := []*bitmap{p.pend, p.inflight}
	if p.pendOld != nil {
		exclude = append(exclude, p.pendOld)
	}
	var buf []byte
	for idx := range p.dirtyChunks {
		buf = p.alloc.appendChunk(buf[:0], idx, exclude...)
		b.SetBitmapChunk(idx, buf)
	}
	// Blocks being filled from spares stay spares on disk: after a crash
	// their reservations are back, and so must their spares be. Only
	// those: a fresh block in flight is not a spare, and its entry may
	// commit in a later batch that does not rewrite this chunk.
	for idx := range p.spareChunks {
		buf = p.spare.appendChunkOr(buf[:0], idx, p.spareFills)
		b.SetSpareChunk(idx, buf)
	}
	b.SetPool(p.rec)
	cutZero := p.rec.ZeroFrom
	p.committing = p.dirty
	p.dirty = make(map[mapKey]pebblemeta.Entry, len(p.committing))
	var released *bitmap
	if p.pend.count > 0 && p.pendOld == nil {
		// Swap in the spare (cleared) bitmap rather than allocate: a big
		// pool's bitmap is megabytes and commits are frequent.
		p.pendOld, p.pend = p.pend, p.pendSpare
		p.pendSpare = nil
		if p.pend == nil {
			p.pend = newBitmap(p.rec.SizeBlocks)
		}
		released = p.pendOld // stays visible (as releasing) until released
	}
	p.dirtyVols = map[*volState]struct{}{}
	p.deadLayers, p.deadVols = nil, nil
	p.deadLayerRec = nil
	p.dirtyLayers = map[uint64]struct{}{}
	p.dirtyChunks = map[uint64]struct{}{}
	p.spareChunks = map[uint64]struct{}{}
	p.metaDirty = false
	// The changes of this cut are in the batch; the log starts over for
	// the ones after it, and the old file goes once the batch is durable.
	var oldIntent *intentLog
	if p.intent != nil && p.intent.failed == nil {
		var err error
		if oldIntent, err = p.intent.rotate(); err != nil {
			p.intent.failed = err
			p.log.Error("intent log cannot be rotated: a kill of this process loses the map changes after the last commit", "pool", p.dir, "err", err)
		}
	}
	p.mu.Unlock()

	var err error
	began := time.Now()
	if p.dataDirty.Swap(false) {
		err = p.data.Sync()
	}
	if err == nil {
		err = b.Commit(true)
	} else {
		b.Discard()
	}
	if err != nil {
		return p.fail(err)
	}
	p.commits.Observe(time.Since(began))
	if oldIntent != nil {
		if err := oldIntent.retire(); err != nil {
			p.log.Warn("intent log of a committed cut not removed", "pool", p.dir, "err", err)
		}
	}
	p.noteUnloggedDurable(unlogged)
	p.mu.Lock()
	p.restartIntentLocked()
	p.zeroDurable = max(p.zeroDurable, cutZero)
	for k, e := range p.committing {
		p.cache.update(k, e)
	}
	p.committing = nil
	p.mu.Unlock()
	if released != nil {
		done := make(chan struct{})
		p.releaseDone = done
		go func() {
			defer close(done)
			p.releaseBlocks(released)
		}()
	}
	p.durableSeq = seq
	return nil
}

// releaseBlocks makes the blocks of released (freed, their release
// durable) reusable: it punches them out of the data file, then clears
// them from the allocation bitmap. Nothing else holds pendOld meanwhile;
// the next commit with blocks to release waits for this to end.
func (p *Pool) releaseBlocks(released *bitmap) {
	// Requests started before the release may still read a freed block's
	// other bytes (a copy on write dropped it): let them finish before
	// punching. Later ones cannot reach it.
	p.ioGate.Lock()
	p.ioGate.Unlock()
	keep := p.sparesFromReleased(released)
	punched := p.punchReleased(released, keep)
	if t := p.trace.Load(); t != nil {
		(*t)("", fmt.Sprintf("release blocks %s punched %v", released.String(), punched))
	}
	hold := p.holdExclusive() // no request still aims at a freed block
	defer hold.release()
	for _, r := range punched {
		p.zeroed.setRun(r[0], r[1])
	}
	p.leaveUnpunchedLocked(released, punched, keep)
	p.alloc.andNot(released)
	for _, b := range keep {
		p.setSpareLocked(b)
	}
	p.pendOld = nil
	released.reset()
	released.grow(p.rec.SizeBlocks)
	p.pendSpare = released
	p.spaceFreedLocked()
}

// punchReleased punches the blocks of released (freed, their release
// durable, not yet reusable) out of the data file, run by run, and
// returns the runs ([first, count]) that now read as zeros. The host file
// system gets the space back, and a partial first write to such a block
// needs no zero padding. No crash can expose what a punch removed: a
// block is handed out only after its punch, and its new mapping commits
// only after the data file's fdatasync that makes the punch durable too.
// The caller has waited for every request started before the release
// (one may still read other bytes of a block a copy on write dropped).
//
// A punch costs about 0.1 ms here (more for a piece of dense data: its
// page cache goes too). A FLUSH does not wait for punching, but the next
// commit that frees blocks does, and so do management operations, so the
// punching stops after punchBudget: blocks past it become reusable
// unpunched, and background passes punch the ones still free later, a
// budget at a time (punchlater.go; a delete of a big fragmented volume
// would otherwise hold commits up for minutes). With 50 ms
// a trim of 600 MiB of written data was cut short on a loaded machine.
func (p *Pool) punchReleased(released *bitmap, keep []uint64) [][2]uint64 {
	if p.noPunch.Load() {
		return nil
	}
	if len(keep) > 0 {
		// Blocks that become spares keep their host space.
		rest := newBitmap(released.size)
		rest.or(released)
		for _, b := range keep {
			rest.clear(b)
		}
		released = rest
	}
	var punched [][2]uint64
	deadline := time.Now().Add(p.tune.punchBudget)
	released.runs(func(first, n uint64) bool {
		// A long run goes in pieces: one punch holds the file's inode
		// lock (every write to the data file waits) for as long as it
		// takes, which grows with the extents it removes.
		for n > 0 {
			if time.Now().After(deadline) {
				p.log.Debug("punch budget spent; the rest of the freed blocks keep their host space",
					"pool", p.dir, "punched_runs", len(punched))
				return false
			}
			c := min(n, p.tune.punchChunk)
			err := p.data.PunchHole(int64(first)<<p.shift, int64(c)<<p.shift)
			if err != nil {
				if errors.Is(err, errors.ErrUnsupported) {
					p.noPunch.Store(true)
				} else {
					p.log.Warn("punching freed blocks out of the data file failed; they are reused with zero padding",
						"pool", p.dir, "block", first, "blocks", c, "err", err)
				}
				return false
			}
			punched = append(punched, [2]uint64{first, c})
			first, n = first+c, n-c
		}
		return true
	})
	return punched
}

// fail marks the pool failed after a commit error: the on-disk state is
// still the previous commit but memory has moved on, so it refuses further
// work rather than diverge.
func (p *Pool) fail(err error) error {
	p.mu.Lock()
	first := p.failed == nil
	if first {
		p.failed = fmt.Errorf("pool %s: %w (restart to recover from the last commit): %w", p.dir, ErrFailed, err)
		p.notifyAsyncLocked(Event{Type: PoolFailed, Reason: err.Error()})
	}
	ferr := p.failed
	p.mu.Unlock()
	p.log.Error("thin pool commit failed; the pool refuses further I/O", "pool", p.dir, "err", err)
	return ferr
}

// noteUnloggedDurable records that a durable commit covers the first n
// batches the intent log could not take.
func (p *Pool) noteUnloggedDurable(n uint64) {
	for {
		d := p.unloggedDurable.Load()
		if d >= n || p.unloggedDurable.CompareAndSwap(d, n) {
			return
		}
	}
}

// noSpace is the ErrNoSpace of a request's planning, with the signal of
// space freed as it was then: space freed since (a release phase that
// ended after the plan) means plan again, not apply the no-space policy.
type noSpace struct{ seen chan struct{} }

func (*noSpace) Error() string { return ErrNoSpace.Error() }
func (*noSpace) Unwrap() error { return ErrNoSpace }

func (p *Pool) noSpaceLocked() error { return &noSpace{seen: p.spaceCh} }

// spaceFreedSince reports whether space was freed after the plan that
// failed with cause (a *noSpace; false for any other error).
func spaceFreedSince(cause error) bool {
	var ns *noSpace
	if !errors.As(cause, &ns) {
		return false
	}
	select {
	case <-ns.seen:
		return true
	default:
		return false
	}
}

// waitForSpace is called when a request's plan found no space (cause). It
// returns nil when the request should plan again, ErrNoSpace when it
// should fail, and ErrWithdrawn if withdraw (nil: never) is closed while
// it waits.
func (p *Pool) waitForSpace(deadline *time.Time, what, volume string, cause error, withdraw <-chan struct{}) error {
	p.mu.Lock()
	if err := p.usableLocked(); err != nil {
		p.mu.Unlock()
		return err
	}
	if spaceFreedSince(cause) {
		// Space was freed after the plan (a release phase ended):
		// without this a request would fail, or wait for the next
		// release, although the space it needs is there.
		p.mu.Unlock()
		return nil
	}
	releasing := p.pend.count > 0 || (p.pendOld != nil && p.pendOld.count > 0)
	policy := NoSpacePolicy(p.rec.NoSpace)
	timeout := time.Duration(p.rec.NoSpaceTimeout)
	ch := p.spaceCh
	if !releasing && !p.outOfSpace {
		p.outOfSpace = true
		p.notifyAsyncLocked(Event{Type: OutOfSpace, Volume: volume})
	}
	logIt := time.Since(p.lastNoSpace) > time.Second
	if logIt {
		p.lastNoSpace = time.Now()
	}
	p.mu.Unlock()
	if releasing {
		// Space is only waiting for its release to become durable.
		return p.commit()
	}
	if policy == NoSpaceError {
		if logIt {
			p.log.Warn("thin pool out of space: request failed", "pool", p.dir, "volume", volume, "op", what)
		}
		return fmt.Errorf("%s on volume %s: %w", what, volume, ErrNoSpace)
	}
	if policy == NoSpacePause {
		if logIt {
			p.log.Warn("thin pool out of space: request waits for space (pause policy)", "pool", p.dir, "volume", volume, "op", what)
		}
		defer p.waitingForSpace(volume)()
		select {
		case <-ch:
			return nil
		case <-withdraw:
			return fmt.Errorf("%s on volume %s: %w", what, volume, ErrWithdrawn)
		}
	}
	if deadline.IsZero() {
		*deadline = time.Now().Add(timeout)
		if logIt {
			p.log.Warn("thin pool out of space: request queued", "pool", p.dir, "volume", volume, "op", what, "timeout", timeout)
		}
	}
	t := time.NewTimer(time.Until(*deadline))
	defer t.Stop()
	defer p.waitingForSpace(volume)()
	select {
	case <-ch:
		return nil
	case <-withdraw:
		return fmt.Errorf("%s on volume %s: %w", what, volume, ErrWithdrawn)
	case <-t.C:
		p.log.Warn("thin pool out of space: queued request timed out", "pool", p.dir, "volume", volume, "op", what)
		return fmt.Errorf("%s on volume %s: %w (waited %v)", what, volume, ErrNoSpace, timeout)
	}
}

// EventType says what changed.
type EventType int

const (
	VolumeCreated EventType = iota + 1
	VolumeDeleted
	VolumeResized
	PoolGrown
	// Space events (not commits): a request found no unreserved space
	// (Volume is its volume), space appeared after that, and the free
	// space crossed the low-water mark down or up. Free is the free
	// space in bytes then.
	OutOfSpace
	SpaceAvailable
	LowWater
	AboveLowWater
	// PoolFailed: a commit failed and the pool refuses every request
	// until it is opened again; Reason says why.
	PoolFailed
)

func (t EventType) String() string {
	switch t {
	case VolumeCreated:
		return "volume-created"
	case VolumeDeleted:
		return "volume-deleted"
	case VolumeResized:
		return "volume-resized"
	case PoolGrown:
		return "pool-grown"
	case OutOfSpace:
		return "out-of-space"
	case SpaceAvailable:
		return "space-available"
	case LowWater:
		return "low-water"
	case AboveLowWater:
		return "above-low-water"
	case PoolFailed:
		return "pool-failed"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event tells a watcher about a committed change, or a change of the
// pool's free space.
type Event struct {
	Type   EventType
	Volume string // empty for pool events
	Size   uint64 // new size in bytes (volume or pool)
	Free   uint64 // free bytes, for space events
	Reason string // why, for PoolFailed
	// Host is set on space events about the data file's host file
	// system rather than the pool (Free is then the host's free bytes).
	Host bool
}

// Watch registers fn to be called after each committed volume or pool
// change. Calls come in commit order, one at a time, from whichever
// goroutine made a change (not necessarily this one's); fn may call the
// pool. It returns a function that unregisters fn.
func (p *Pool) Watch(fn func(Event)) (stop func()) {
	p.mu.Lock()
	id := p.nextWatch
	p.nextWatch++
	p.watchers[id] = fn
	p.mu.Unlock()
	return func() {
		p.mu.Lock()
		delete(p.watchers, id)
		p.mu.Unlock()
	}
}

func (p *Pool) notify(ev Event) {
	p.mu.Lock()
	p.events = append(p.events, ev)
	p.mu.Unlock()
}

// deliver hands queued events to the watchers, in order, one goroutine at
// a time. Called after the change's locks are released, so a watcher may
// call back into the pool; if another goroutine is delivering, it will
// deliver ours too.
func (p *Pool) deliver() {
	for {
		if !p.deliverMu.TryLock() {
			return
		}
		for {
			p.mu.Lock()
			evs := p.events
			p.events = nil
			ids := make([]int, 0, len(p.watchers))
			for id := range p.watchers {
				ids = append(ids, id)
			}
			sort.Ints(ids)
			fns := make([]func(Event), 0, len(ids))
			for _, id := range ids {
				fns = append(fns, p.watchers[id])
			}
			p.mu.Unlock()
			if len(evs) == 0 {
				break
			}
			for _, ev := range evs {
				for _, fn := range fns {
					fn(ev)
				}
			}
		}
		p.deliverMu.Unlock()
		p.mu.Lock()
		more := len(p.events) > 0
		p.mu.Unlock()
		if !more {
			return
		}
	}
}

// BlockSize is the pool's allocation unit in bytes.
func (p *Pool) BlockSize() uint32 { return uint32(p.blockSize) }

// Dir is the pool directory.
func (p *Pool) Dir() string { return p.dir }

// Grow enlarges the pool to size bytes (a multiple of the block size),
// online: queued writers waiting for space proceed.
func (p *Pool) Grow(size uint64) error {
	err := p.grow(size)
	p.deliver()
	return err
}

func (p *Pool) grow(size uint64) error {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	p.awaitReleaseLocked() // it resizes the bitmaps the release phase works on
	p.mu.Lock()
	cur := p.rec.SizeBlocks
	err := p.usableLocked()
	p.mu.Unlock()
	if err != nil {
		return err
	}
	if size%uint64(p.blockSize) != 0 || size/uint64(p.blockSize) < cur || size > math.MaxInt64/2 {
		return fmt.Errorf("grow pool %s to %d: %w: size must be a multiple of %d and at least %d",
			p.dir, size, ErrInvalid, p.blockSize, cur*uint64(p.blockSize))
	}
	n := size / uint64(p.blockSize)
	if n == cur {
		return nil
	}
	// The file grows first and durably: a crash before the commit leaves a
	// longer file, which Open accepts.
	if err := p.data.Truncate(int64(size)); err != nil {
		return fmt.Errorf("grow pool %s: %w", p.dir, err)
	}
	if p.thick {
		off := int64(cur) * p.blockSize
		if err := p.data.Allocate(off, int64(size)-off); err != nil {
			return fmt.Errorf("grow pool %s: preallocate: %w", p.dir, hostError(err, n-cur))
		}
	}
	if err := p.data.Sync(); err != nil {
		// A failed fdatasync may have dropped other writes' dirty pages
		// (and the next one succeeds regardless): as in a commit, only a
		// restart from the last commit is sound.
		return p.fail(fmt.Errorf("grow pool %s: %w", p.dir, err))
	}
	p.mu.Lock()
	if d, ok := p.data.(interface{ isDevice() bool }); ok && d.isDevice() {
		// The device's new part may hold anything: pad first writes there.
		p.rec.ZeroFrom, p.zeroDurable, p.zeroMark = n, n, n
	}
	p.rec.SizeBlocks = n
	p.alloc.grow(n)
	p.pend.grow(n)
	p.inflight.grow(n)
	p.spareFills.grow(n)
	p.zeroed.grow(n)
	p.unpunched.grow(n)
	p.punching.grow(n)
	p.spare.grow(n)
	p.backing.grow(n)
	if p.pendSpare != nil {
		p.pendSpare.grow(n)
	}
	p.metaDirty = true
	p.mu.Unlock()
	if err := p.commitLocked(); err != nil {
		return err
	}
	p.mu.Lock()
	p.spaceFreedLocked()
	p.mu.Unlock()
	p.log.Info("thin pool grown", "pool", p.dir, "size_bytes", size)
	p.notify(Event{Type: PoolGrown, Size: size})
	return nil
}

// CreateVolume adds a thin volume of size bytes (a multiple of 512; it may
// exceed the pool). It takes no space until written.
func (p *Pool) CreateVolume(name string, size uint64) error {
	err := p.createVolume(name, size)
	p.deliver()
	return err
}

func (p *Pool) createVolume(name string, size uint64) error {
	if err := pebblemeta.ValidVolumeName(name); err != nil {
		return fmt.Errorf("create volume: %w: %v", ErrInvalid, err)
	}
	if size == 0 || size%512 != 0 || size > math.MaxInt64/2 {
		return fmt.Errorf("create volume %s: %w: size %d is not a positive multiple of 512", name, ErrInvalid, size)
	}
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	p.mu.Lock()
	if err := p.usableLocked(); err != nil {
		p.mu.Unlock()
		return err
	}
	if _, ok := p.vols[name]; ok {
		p.mu.Unlock()
		return fmt.Errorf("create volume %s: %w", name, ErrVolumeExists)
	}
	v := &volState{rec: pebblemeta.VolumeRecord{Name: name, Layer: p.rec.NextLayer, Size: size}}
	p.rec.NextLayer++
	p.vols[name] = v
	p.heads[v.rec.Layer] = v
	p.dirtyVols[v] = struct{}{}
	p.metaDirty = true
	p.mu.Unlock()
	if err := p.commitLocked(); err != nil {
		return err
	}
	p.notify(Event{Type: VolumeCreated, Volume: name, Size: size})
	return nil
}

// ResizeVolume grows a volume to size bytes online (shrinking is refused).
func (p *Pool) ResizeVolume(name string, size uint64) error {
	err := p.resizeVolume(name, size)
	p.deliver()
	return err
}

func (p *Pool) resizeVolume(name string, size uint64) error {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	if err := p.settleReleasesLocked(); err != nil {
		return err
	}
	var hb hostBacking
	defer hb.done(p)
again:
	p.mu.Lock()
	if err := p.usableLocked(); err != nil {
		p.mu.Unlock()
		return err
	}
	v, ok := p.vols[name]
	if !ok {
		p.mu.Unlock()
		return fmt.Errorf("resize volume %s: %w", name, ErrNoVolume)
	}
	if v.rec.Kind == pebblemeta.KindSnapshot {
		p.mu.Unlock()
		return fmt.Errorf("resize volume %s: %w", name, ErrReadOnly)
	}
	if size%512 != 0 || size < v.rec.Size || size > math.MaxInt64/2 {
		cur := v.rec.Size
		p.mu.Unlock()
		return fmt.Errorf("resize volume %s to %d: %w: must be a multiple of 512 and at least %d (volumes only grow)", name, size, ErrInvalid, cur)
	}
	if size == v.rec.Size {
		p.mu.Unlock()
		return nil
	}
	r := v.rec
	r.Size = size
	if need := p.reserveNeedLocked(v, r); need > p.freeLocked() {
		free := p.freeLocked()
		p.mu.Unlock()
		return fmt.Errorf("resize volume %s to %d: %w: reserve mode needs %d more blocks reserved, %d are free", name, size, ErrNoSpace, need, free)
	} else if !p.enoughSparesLocked(&hb, need) {
		p.mu.Unlock()
		if err := p.backSpares(&hb, need); err != nil {
			return fmt.Errorf("resize volume %s to %d: %w", name, size, err)
		}
		goto again
	}
	v.rec.Size = size
	p.reaccountLocked(v)
	if v.handle != nil {
		v.handle.size.Store(size)
	}
	p.dirtyVols[v] = struct{}{}
	p.mu.Unlock()
	if err := p.commitLocked(); err != nil {
		return err
	}
	p.notify(Event{Type: VolumeResized, Volume: name, Size: size})
	return nil
}

// DeleteVolume removes a volume and returns its blocks to the pool. Open
// handles of it fail every later request with ErrVolumeDeleted. It walks
// the volume's map (the only operation that does).
func (p *Pool) DeleteVolume(name string) error {
	err := p.deleteVolume(name)
	p.deliver()
	return err
}

func (p *Pool) deleteVolume(name string) error {
	p.flushMu.Lock() // no commit runs: the store's copy of the map is stable
	defer p.flushMu.Unlock()
	// Wait for requests in flight, so that no fill of this volume is
	// pending; once deleted, no new request touches its map.
	hold := p.holdExclusive()
	defer hold.release()
	hold.hook("delete")
	v, ok := p.vols[name]
	err := p.usableLocked()
	if err == nil && !ok {
		err = fmt.Errorf("delete volume %s: %w", name, ErrNoVolume)
	}
	if err != nil {
		return err
	}
	layer := v.rec.Layer
	v.deleted = true
	p.extra -= v.extra
	v.extra = 0
	delete(p.vols, name)
	delete(p.dirtyVols, v)
	if p.frozenLocked(layer) {
		// A read-only snapshot owns no map of its own.
		p.deadVols = append(p.deadVols, name)
		p.metaDirty = true
		dets, err := p.derefLayerLocked(layer)
		hold.release()
		if err == nil {
			err = p.releaseDetached(dets)
		}
		if err != nil {
			return p.fail(fmt.Errorf("delete snapshot %s: %w", name, err))
		}
		if err := p.commitLocked(); err != nil {
			return err
		}
		p.notify(Event{Type: VolumeDeleted, Volume: name})
		return nil
	}
	delete(p.heads, layer)
	parent := p.parentLocked(layer)
	det, rerr := p.detachLayerLocked(layer, true, name)
	p.deadVols = append(p.deadVols, name)
	hold.release()
	if rerr == nil {
		rerr = p.releaseDetached([]detachedLayer{det})
	}
	if rerr == nil && parent != 0 {
		hold = p.holdExclusive()
		var dets []detachedLayer
		dets, rerr = p.derefLayerLocked(parent)
		hold.release()
		if rerr == nil {
			rerr = p.releaseDetached(dets)
		}
	}
	if rerr != nil {
		// Half released: only a restart (from the last commit) is sound.
		return p.fail(fmt.Errorf("delete volume %s: %w", name, rerr))
	}
	if err := p.commitLocked(); err != nil {
		return err
	}
	p.notify(Event{Type: VolumeDeleted, Volume: name})
	return nil
}

// detachedLayer is a layer no volume reads any more, already taken out of
// the pool's state; releaseDetached gives back its committed entries.
type detachedLayer struct {
	layer      uint64
	name       string              // for errors: the volume, or "layer N"
	head       bool                // it was a volume's head (its reservations count in the pool)
	overridden map[uint64]struct{} // blocks whose pending entries were released already
}

// detachLayerLocked takes layer out of the pool's state: its pending
// entries are released now, its committed map and record are deleted by
// the next commit. The caller holds flushMu (no commit until the
// committed entries are released too) and p.mu.
func (p *Pool) detachLayerLocked(layer uint64, head bool, name string) (detachedLayer, error) {
	d := detachedLayer{layer: layer, name: name, head: head, overridden: map[uint64]struct{}{}}
	var err error
	for k, e := range p.dirty {
		if k.layer == layer {
			d.overridden[k.vb] = struct{}{}
			if err == nil {
				err = p.releaseEntryLocked(name, e, head)
			}
		}
	}
	p.forgetLayerLocked(layer)
	return d, err
}

// forgetLayerLocked drops layer from memory (pending entries, cached
// entries, its record); the next commit deletes its map and record.
func (p *Pool) forgetLayerLocked(layer uint64) {
	for k := range p.dirty {
		if k.layer == layer {
			delete(p.dirty, k)
		}
	}
	p.cache.forgetLayer(layer)
	delete(p.layers, layer)
	delete(p.dirtyLayers, layer)
	p.deadLayerRec = append(p.deadLayerRec, layer) // deleting an absent record is harmless
	p.deadLayers = append(p.deadLayers, layer)
	p.metaDirty = true
}

// releaseDetached walks the committed maps of detached layers without
// holding the pool lock or the I/O gate (no one reads them), releasing in
// batches so that I/O to other volumes keeps going. The caller holds
// flushMu, so the commit that follows carries the whole delete.
func (p *Pool) releaseDetached(ds []detachedLayer) error {
	for _, d := range ds {
		var batch []pebblemeta.Entry
		flushBatch := func() error {
			p.mu.Lock()
			defer p.mu.Unlock()
			for _, e := range batch {
				if err := p.releaseEntryLocked(d.name, e, d.head); err != nil {
					return err
				}
			}
			batch = batch[:0]
			p.spaceFreedLocked() // given-back reservations are free at once
			return nil
		}
		err := p.store.LayerMap(d.layer, 0, func(vb uint64, e pebblemeta.Entry) error {
			if _, ok := d.overridden[vb]; ok {
				return nil
			}
			batch = append(batch, e)
			if len(batch) == 4096 {
				return flushBatch()
			}
			return nil
		})
		if err == nil {
			err = flushBatch()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// releaseEntryLocked gives back what a deleted entry held; head says
// whether it was in a volume's head (whose reservations the pool counts)
// rather than in a frozen layer.
func (p *Pool) releaseEntryLocked(name string, e pebblemeta.Entry, head bool) error {
	if e.Mapped() {
		if e.PBlock >= p.rec.SizeBlocks || !p.alloc.test(e.PBlock) || p.pend.test(e.PBlock) {
			return fmt.Errorf("%w: volume %s maps block %d, which is not allocated to it", pebblemeta.ErrCorrupt, name, e.PBlock)
		}
		p.releaseLocked(e.PBlock)
		p.rec.Allocated--
	}
	if e.Reserved() && head {
		p.rec.Reserved--
	}
	return nil
}

// Volumes lists the volume names in order.
func (p *Pool) Volumes() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	names := make([]string, 0, len(p.vols))
	for n := range p.vols {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Volume returns the handle of a volume (the same one on every call).
func (p *Pool) Volume(name string) (*Volume, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.usableLocked(); err != nil {
		return nil, err
	}
	v, ok := p.vols[name]
	if !ok {
		return nil, fmt.Errorf("volume %s: %w", name, ErrNoVolume)
	}
	if v.handle == nil {
		v.handle = &Volume{p: p, st: v, name: name}
		v.handle.size.Store(v.rec.Size)
	}
	return v.handle, nil
}

// PoolStatus is the pool part of Status. Byte counts always satisfy
// allocated + reserved + free = size.
type PoolStatus struct {
	Dir            string `json:"dir"`
	SizeBytes      uint64 `json:"size_bytes"`
	AllocatedBytes uint64 `json:"allocated_bytes"`
	ReservedBytes  uint64 `json:"reserved_bytes"`
	FreeBytes      uint64 `json:"free_bytes"`
	// ReleasingBytes are discarded blocks, counted in allocated, that
	// become free at the next metadata commit.
	ReleasingBytes  uint64  `json:"releasing_bytes"`
	BlockSize       uint32  `json:"block_size"`
	NoSpace         string  `json:"no_space"`
	NoSpaceTimeoutS float64 `json:"no_space_timeout_seconds"`
	LowWaterBytes   uint64  `json:"low_water_bytes"`
	BelowLowWater   bool    `json:"below_low_water"`
	MetadataBytes   uint64  `json:"metadata_bytes"`
	// DataHostBytes is the space the data file takes on the host file
	// system: freed blocks are punched out of it, so it follows
	// allocated_bytes (0 when unknown).
	DataHostBytes uint64 `json:"data_host_bytes"`
	// The data file's host file system (host.go): its free space (0 when
	// unknown, or for a preallocated pool, which needs none), how much of
	// the pool's free space it could not back now (over-commitment:
	// writes to unprovisioned space may fail, by the no-space policy,
	// when it runs out), and reservations without a host-allocated spare
	// (only when the host could not back them at open; Check fails then).
	HostFreeBytes         uint64 `json:"host_free_bytes"`
	HostUnbackedBytes     uint64 `json:"host_unbacked_bytes"`
	ReservedUnbackedBytes uint64 `json:"reserved_unbacked_bytes"`
	HostBelowLowWater     bool   `json:"host_below_low_water"`
	// The metadata store's headroom on its file system (host.go): held
	// now and wanted. Less held than wanted: that file system filled up
	// and the pool gives no new host space to data until it is restored.
	MetaHeadroomBytes     uint64 `json:"metadata_headroom_bytes"`
	MetaHeadroomWantBytes uint64 `json:"metadata_headroom_want_bytes"`
	// Preallocated: the whole data file is allocated on the host (pool
	// create --preallocate); the host cannot run out under it.
	Preallocated bool `json:"preallocated"`
	// DataDevice is the block device holding the data, if any.
	DataDevice       string `json:"data_device,omitempty"`
	VolumeCount      int    `json:"volume_count"`
	PendingMapWrites int    `json:"pending_map_changes"`
	// Failed is why the pool refuses requests after a failed commit
	// (empty while it serves); a restart recovers from the last commit.
	Failed string `json:"failed,omitempty"`
}

// VolumeStatus is one volume in Status.
type VolumeStatus struct {
	Name             string `json:"name"`
	SizeBytes        uint64 `json:"size_bytes"`
	MappedBytes      uint64 `json:"mapped_bytes"`
	ProvisionedBytes uint64 `json:"provisioned_bytes"`
	// ReservedBytes is all the pool holds for the volume: the sum of the
	// three reasons below.
	ReservedBytes uint64 `json:"reserved_bytes"`
	// ReservedProvisionedBytes: provisioned blocks of its own not yet
	// written (WRITE_ZEROES without unmap).
	ReservedProvisionedBytes uint64 `json:"reserved_provisioned_bytes"`
	// ReservedSharedBytes: one block per provisioned block it shares with
	// a snapshot, for the copy its next write there makes.
	ReservedSharedBytes uint64 `json:"reserved_shared_bytes"`
	// ReservedReserveModeBytes: in reserve mode, every other block of its
	// virtual size that it does not own.
	ReservedReserveModeBytes uint64 `json:"reserved_reserve_mode_bytes"`
	ReserveMode              bool   `json:"reserve_mode"`
	// Kind is "volume", "snapshot" (read-only) or "clone"; Origin is what
	// a snapshot or clone was taken of. A snapshot's or clone's byte
	// counts cover only what it changed itself since it was taken (or
	// since the snapshot above it was), not what it shares.
	Kind   string `json:"kind"`
	Origin string `json:"origin,omitempty"`
}

// Status is a consistent picture of the pool's space.
type Status struct {
	Pool    PoolStatus     `json:"pool"`
	Volumes []VolumeStatus `json:"volumes"`
}

// Status reports space use (O(volumes), no map walk).
func (p *Pool) Status() Status {
	disk := p.store.DiskUsage()
	var hostBytes uint64
	if d, ok := p.data.(interface{ hostBytes() (uint64, error) }); ok {
		hostBytes, _ = d.hostBytes()
	}
	hostFree, _, hostKnown := p.hostFreeBytes()
	p.mu.Lock()
	defer p.mu.Unlock()
	bs := uint64(p.blockSize)
	free := p.freeLocked()
	reserved := p.rec.Reserved + p.extra - p.inflightRes
	releasing := p.pend.count
	if p.pendOld != nil {
		releasing += p.pendOld.count
	}
	s := Status{Pool: PoolStatus{
		Dir:              p.dir,
		SizeBytes:        p.rec.SizeBlocks * bs,
		AllocatedBytes:   (p.rec.SizeBlocks - free - reserved) * bs,
		ReservedBytes:    reserved * bs,
		FreeBytes:        free * bs,
		ReleasingBytes:   releasing * bs,
		BlockSize:        uint32(bs),
		NoSpace:          NoSpacePolicy(p.rec.NoSpace).String(),
		NoSpaceTimeoutS:  time.Duration(p.rec.NoSpaceTimeout).Seconds(),
		LowWaterBytes:    p.lowWaterBlocks() * bs,
		BelowLowWater:    p.rec.LowWaterPPM != 0 && free < p.lowWaterBlocks(),
		MetadataBytes:    disk,
		DataHostBytes:    hostBytes,
		VolumeCount:      len(p.vols),
		PendingMapWrites: len(p.dirty),
		Failed:           errString(p.failed),
	}}
	if hostKnown {
		s.Pool.HostFreeBytes = hostFree
		s.Pool.HostUnbackedBytes = hostShortfall(p.rec.SizeBlocks*bs, hostBytes, hostFree, free*bs)
		s.Pool.HostBelowLowWater = p.rec.LowWaterPPM != 0 && hostFree < p.lowWaterBlocks()*bs
	}
	s.Pool.ReservedUnbackedBytes = p.unbackedLocked() * bs
	have, want := p.store.Headroom()
	s.Pool.MetaHeadroomBytes, s.Pool.MetaHeadroomWantBytes = uint64(have), uint64(want)
	s.Pool.Preallocated = p.rec.Flags&pebblemeta.PoolPreallocated != 0
	if d, ok := p.data.(interface{ isDevice() bool }); ok && d.isDevice() {
		s.Pool.DataDevice, _ = filepath.EvalSymlinks(filepath.Join(p.dir, dataName))
	}
	s.Volumes = make([]VolumeStatus, 0, len(p.vols))
	for name, v := range p.vols {
		vs := VolumeStatus{
			Name:                     name,
			SizeBytes:                v.rec.Size,
			MappedBytes:              v.rec.Mapped * bs,
			ProvisionedBytes:         v.rec.Provisioned * bs,
			ReservedBytes:            (v.rec.Reserved + v.extra) * bs,
			ReservedProvisionedBytes: v.rec.Reserved * bs,
			ReserveMode:              v.rec.ReserveMode,
			Kind:                     kindName(v.rec.Kind),
			Origin:                   v.rec.Origin,
		}
		if v.rec.ReserveMode {
			vs.ReservedReserveModeBytes = v.extra * bs
		} else {
			vs.ReservedSharedBytes = v.extra * bs
		}
		s.Volumes = append(s.Volumes, vs)
	}
	sort.Slice(s.Volumes, func(i, j int) bool { return s.Volumes[i].Name < s.Volumes[j].Name })
	return s
}

func kindName(k uint8) string {
	switch k {
	case pebblemeta.KindSnapshot:
		return "snapshot"
	case pebblemeta.KindClone:
		return "clone"
	}
	return "volume"
}

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

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
