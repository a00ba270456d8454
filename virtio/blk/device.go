package blk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/eventfd"
	"github.com/thinblk/thinblk/virtio"
)

var le = binary.LittleEndian

// Defaults and limits.
const (
	DefaultQueueSize = 256
	// DefaultMaxDiscardSectors is QEMU's limit for discard and write
	// zeroes requests (16 MiB).
	DefaultMaxDiscardSectors = 32768
	// maxRequestBytes caps one read or write, as QEMU does (INT_MAX
	// rounded down to a sector).
	maxRequestBytes = (1<<31 - 1) &^ (SectorSize - 1)
)

// ErrNotStarted is returned by StopQueue for a queue that is not running.
var ErrNotStarted = errors.New("queue not started")

// ErrClosed is returned by StartQueue after Close.
var ErrClosed = errors.New("device closed")

// Options configure a Device.
type Options struct {
	ReadOnly  bool
	NumQueues int // default 1
	// QueueSize is the largest ring accepted (default 256); seg_max is
	// QueueSize-2 and indirect tables up to QueueSize entries are accepted
	// even on smaller rings.
	QueueSize int
	Serial    string // GET_ID answer, at most IDBytes bytes
	Logger    *slog.Logger
	// Workers is the number of requests served concurrently per queue
	// through the synchronous Storage calls, so this is the queue depth
	// such storage sees (requests on an AsyncQueue need no worker). The default is one per ring entry: no request ever
	// waits for a worker, so a storage call that blocks (a thin pool
	// waiting for space) holds up nothing else.
	Workers int
	// SyncOnly serves every request through Storage's synchronous calls,
	// even if the storage implements AsyncStorage.
	SyncOnly bool
	// MaxDiscardSectors and MaxWriteZeroesSectors limit one discard or
	// write-zeroes segment (default DefaultMaxDiscardSectors).
	MaxDiscardSectors     uint32
	MaxWriteZeroesSectors uint32
	// WriteThrough starts the device with the write cache disabled: every
	// write is flushed before it completes. The driver may change it
	// (CONFIG_WCE).
	WriteThrough bool
	// Poll is how long each queue keeps looking at its ring after the
	// last request before it sleeps (virtio.RunnerConfig.Poll; 0: never).
	Poll time.Duration
}

// Device is a virtio-blk device over a Storage. It implements
// vhostuser.Device.
type Device struct {
	storage         blockdev.Storage
	opts            Options
	log             *slog.Logger
	geom            blockdev.Geometry
	sectorsPerBlock uint64
	features        uint64

	writeback atomic.Bool
	inflight  atomic.Int64
	errLogs   atomic.Int64 // rate limit for per-request error logs

	mu     sync.Mutex
	queues []*queue
	// stats has a queue index's counters once it has run (nil before:
	// rings never started cost nothing). Atomic, so that Stats does not
	// wait for mu, which StopQueue holds while requests finish (one may
	// wait for pool space for as long as it takes).
	stats  []atomic.Pointer[queueStats]
	notify func() error
	closed bool
}

// New returns a device serving storage.
func New(storage blockdev.Storage, opts Options) (*Device, error) {
	if storage == nil {
		return nil, errors.New("virtio-blk: no storage")
	}
	if opts.NumQueues == 0 {
		opts.NumQueues = 1
	}
	if opts.NumQueues < 1 || opts.NumQueues > 256 {
		return nil, fmt.Errorf("virtio-blk: %d queues: want 1 to 256", opts.NumQueues)
	}
	if opts.QueueSize == 0 {
		opts.QueueSize = DefaultQueueSize
	}
	if opts.QueueSize < 4 || opts.QueueSize > virtio.MaxQueueSize || opts.QueueSize&(opts.QueueSize-1) != 0 {
		return nil, fmt.Errorf("virtio-blk: queue size %d: want a power of two from 4 to %d", opts.QueueSize, virtio.MaxQueueSize)
	}
	if len(opts.Serial) > IDBytes {
		return nil, fmt.Errorf("virtio-blk: serial %q longer than %d bytes", opts.Serial, IDBytes)
	}
	if opts.Workers <= 0 {
		opts.Workers = opts.QueueSize
	}
	if opts.MaxDiscardSectors == 0 {
		opts.MaxDiscardSectors = DefaultMaxDiscardSectors
	}
	if opts.MaxWriteZeroesSectors == 0 {
		opts.MaxWriteZeroesSectors = DefaultMaxDiscardSectors
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	geom := blockdev.Geometry{LogicalBlockSize: SectorSize}
	if g, ok := storage.(blockdev.GeometryReporter); ok {
		geom = g.Geometry()
	}
	if geom.LogicalBlockSize == 0 {
		geom.LogicalBlockSize = SectorSize
	}
	if geom.LogicalBlockSize < SectorSize || bits.OnesCount32(geom.LogicalBlockSize) != 1 {
		return nil, fmt.Errorf("virtio-blk: logical block size %d: want a power of two >= 512", geom.LogicalBlockSize)
	}
	if geom.PhysicalBlockSize < geom.LogicalBlockSize || bits.OnesCount32(geom.PhysicalBlockSize) != 1 {
		geom.PhysicalBlockSize = geom.LogicalBlockSize
	}
	if geom.DiscardGranularity < geom.LogicalBlockSize {
		geom.DiscardGranularity = geom.LogicalBlockSize
	}
	if size := storage.Size(); size%SectorSize != 0 {
		return nil, fmt.Errorf("virtio-blk: storage size %d is not a multiple of %d", size, SectorSize)
	}
	d := &Device{
		storage:         storage,
		opts:            opts,
		log:             opts.Logger,
		geom:            geom,
		sectorsPerBlock: uint64(geom.LogicalBlockSize / SectorSize),
		queues:          make([]*queue, opts.NumQueues),
		stats:           make([]atomic.Pointer[queueStats], opts.NumQueues),
	}
	d.writeback.Store(!opts.WriteThrough)
	d.features = 1<<virtio.FeatureVersion1 | 1<<virtio.FeatureEventIdx | 1<<virtio.FeatureIndirectDesc |
		1<<FeatureSegMax | 1<<FeatureBlkSize | 1<<FeatureTopology | 1<<FeatureFlush | 1<<FeatureConfigWCE
	if opts.NumQueues > 1 {
		d.features |= 1 << FeatureMQ
	}
	if opts.ReadOnly {
		d.features |= 1 << FeatureRO
	} else {
		d.features |= 1<<FeatureDiscard | 1<<FeatureWriteZeroes
	}
	return d, nil
}

// Features implements vhostuser.Device.
func (d *Device) Features() uint64 { return d.features }

// NumQueues implements vhostuser.Device.
func (d *Device) NumQueues() int { return d.opts.NumQueues }

// MaxQueueSize implements vhostuser.Device.
func (d *Device) MaxQueueSize() int { return d.opts.QueueSize }

// config returns the current config space.
func (d *Device) config() [ConfigSize]byte {
	var c [ConfigSize]byte
	g := d.geom
	le.PutUint64(c[ConfigCapacity:], d.storage.Size()/SectorSize)
	le.PutUint32(c[ConfigSegMax:], uint32(d.opts.QueueSize-2))
	le.PutUint32(c[ConfigBlkSize:], g.LogicalBlockSize)
	c[ConfigPhysicalBlockExp] = byte(bits.TrailingZeros32(g.PhysicalBlockSize / g.LogicalBlockSize))
	c[ConfigAlignmentOffset] = 0
	le.PutUint16(c[ConfigMinIOSize:], uint16(min(g.PhysicalBlockSize/g.LogicalBlockSize, 0xffff)))
	le.PutUint32(c[ConfigOptIOSize:], g.OptimalIOSize/g.LogicalBlockSize)
	if d.writeback.Load() {
		c[ConfigWritebackMode] = 1
	}
	le.PutUint16(c[ConfigNumQueues:], uint16(d.opts.NumQueues))
	le.PutUint32(c[ConfigMaxDiscardSectors:], d.opts.MaxDiscardSectors)
	le.PutUint32(c[ConfigMaxDiscardSeg:], 1)
	le.PutUint32(c[ConfigDiscardSectorAlign:], g.DiscardGranularity/SectorSize)
	le.PutUint32(c[ConfigMaxWriteZeroesSectors:], d.opts.MaxWriteZeroesSectors)
	le.PutUint32(c[ConfigMaxWriteZeroesSeg:], 1)
	c[ConfigWriteZeroesMayUnmap] = 1
	return c
}

// ReadConfig implements vhostuser.Device. Bytes beyond the config space
// read as zero.
func (d *Device) ReadConfig(p []byte, offset uint32) {
	clear(p)
	c := d.config()
	if uint64(offset) < uint64(len(c)) {
		copy(p, c[offset:])
	}
}

// WriteConfig implements vhostuser.Device. Only the writeback byte is
// writable (CONFIG_WCE).
func (d *Device) WriteConfig(p []byte, offset uint32) error {
	if offset != ConfigWritebackMode || len(p) != 1 {
		return fmt.Errorf("virtio-blk: config write of %d bytes at %d: only writeback (1 byte at %d) is writable", len(p), offset, ConfigWritebackMode)
	}
	if p[0] > 1 {
		return fmt.Errorf("virtio-blk: writeback mode %d: want 0 or 1", p[0])
	}
	wb := p[0] == 1
	if d.writeback.Swap(wb) != wb {
		d.log.Info("write cache mode changed", "writeback", wb)
		if !wb {
			// Writes acknowledged under writeback become durable now.
			if err := d.storage.Flush(); err != nil {
				return fmt.Errorf("virtio-blk: flush on write cache disable: %w", err)
			}
		}
	}
	return nil
}

// SetConfigChangeNotifier implements vhostuser.Device.
func (d *Device) SetConfigChangeNotifier(notify func() error) {
	d.mu.Lock()
	d.notify = notify
	d.mu.Unlock()
}

// NotifyResize tells the driver that the capacity changed (Storage.Size
// now reports the new size).
func (d *Device) NotifyResize() error {
	d.mu.Lock()
	notify := d.notify
	d.mu.Unlock()
	d.log.Info("capacity changed", "bytes", d.storage.Size())
	if notify == nil {
		return nil
	}
	if err := notify(); err != nil {
		return fmt.Errorf("virtio-blk: config change notification: %w", err)
	}
	return nil
}

// InFlight is the number of requests taken from the rings and not yet
// completed, over all queues. It errs on the high side: a completion shows
// on the used ring a moment before it leaves the count.
func (d *Device) InFlight() int { return int(d.inflight.Load()) }

// StartQueue implements vhostuser.Device.
func (d *Device) StartQueue(s virtio.QueueSetup) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if s.Index < 0 || s.Index >= len(d.queues) {
		return fmt.Errorf("virtio-blk: queue %d: device has %d queues", s.Index, len(d.queues))
	}
	if int(s.Size) > d.opts.QueueSize {
		return fmt.Errorf("virtio-blk: queue %d: size %d exceeds %d", s.Index, s.Size, d.opts.QueueSize)
	}
	if old := d.queues[s.Index]; old != nil && !old.stopped {
		return fmt.Errorf("virtio-blk: queue %d already running", s.Index)
	}
	if d.stats[s.Index].Load() == nil {
		d.stats[s.Index].Store(new(queueStats))
	}
	q, err := d.newQueue(s)
	if err != nil {
		return err
	}
	d.queues[s.Index] = q
	q.start()
	d.log.Debug("queue started", "queue", s.Index, "size", s.Size, "last_avail", s.LastAvail)
	return nil
}

// StopQueue implements vhostuser.Device. It waits for the queue's requests
// in flight; a queue already stopped by Drain reports where it stopped.
func (d *Device) StopQueue(idx int) (uint16, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if idx < 0 || idx >= len(d.queues) || d.queues[idx] == nil {
		return 0, fmt.Errorf("virtio-blk: queue %d: %w", idx, ErrNotStarted)
	}
	q := d.queues[idx]
	last, err := q.stop(context.Background())
	if err != nil {
		return 0, err
	}
	d.queues[idx] = nil
	d.log.Debug("queue stopped", "queue", idx, "last_avail", last)
	return last, nil
}

// SetQueueCall implements vhostuser.Device.
func (d *Device) SetQueueCall(idx int, call *eventfd.FD) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if idx < 0 || idx >= len(d.queues) || d.queues[idx] == nil || d.queues[idx].stopped {
		return fmt.Errorf("virtio-blk: queue %d: %w", idx, ErrNotStarted)
	}
	return d.queues[idx].runner.SetCall(call)
}

// Drain stops taking requests on every queue, waits for those in flight
// and flushes the storage. The queues keep their position: StopQueue still
// reports it, and StartQueue may restart them.
func (d *Device) Drain(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	for _, q := range d.queues {
		if q != nil {
			if _, err := q.stop(ctx); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := d.storage.Flush(); err != nil {
		errs = append(errs, fmt.Errorf("virtio-blk: flush: %w", err))
	}
	return errors.Join(errs...)
}

// Close drains the device and refuses to start queues afterwards.
func (d *Device) Close() error {
	err := d.Drain(context.Background())
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	return err
}

// logRequestError logs the first errors at Warn and the rest at Debug, so
// a misbehaving driver cannot flood the log.
func (d *Device) logRequestError(msg string, args ...any) {
	level := slog.LevelDebug
	if n := d.errLogs.Add(1); n <= 20 {
		level = slog.LevelWarn
		if n == 20 {
			args = append(args, "note", "further request errors logged at debug level")
		}
	}
	d.log.Log(context.Background(), level, msg, args...)
}
