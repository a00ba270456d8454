package thin

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"
)

// The host's free space, apart from the promise (host.go): watching it
// (low-water and full, logged and told to watchers), what a request does
// when the host has no space for it (the no-space policy, as for a full
// pool), and the metadata store's headroom on the host.

// hostSpaceState is what the pool knows of its host file systems' free
// space. Guarded by the pool's mu, but for the atomic; metaShared is set
// at Open.
type hostSpaceState struct {
	metaShared bool // the metadata's file system holds the data file too
	hostOut    bool // a request found the host file system full, and it has not had space since
	hostLow    bool // the host's free space was below the low-water mark at the last look
	hostFull   bool // the host had no space for a block at the last look

	headroomUses atomic.Int64 // times the metadata store used some of its headroom
}

// hostPoll is how often a request waiting for host space looks again.
var hostPoll = 250 * time.Millisecond

// hostFreeBytes is the free space of the data file's host file system, or
// ok false when the data file cannot tell (then waiting requests retry at
// each poll).
func (p *Pool) hostFreeBytes() (free, total uint64, ok bool) {
	d, isHost := p.data.(interface {
		hostFree() (free, total uint64, err error)
	})
	if !isHost || p.thick {
		return 0, 0, false
	}
	free, total, err := d.hostFree()
	return free, total, err == nil
}

// isHostNoSpace reports whether err is the host file system's ENOSPC.
func isHostNoSpace(err error) bool { return errors.Is(err, unix.ENOSPC) }

// waitForHostSpace is called when the host file system had no space for
// a request (cause wraps ErrNoSpace or ENOSPC). As for a full pool, the
// pool's no-space policy decides: the request fails (NoSpaceError), or
// waits until the host has space for a block again (polled) or the pool
// frees space, up to NoSpaceTimeout (NoSpaceQueue) or for ever
// (NoSpacePause; the OutOfSpace event, with Host set, lets serve pause
// the VM). nil means retry; ErrWithdrawn if withdraw (nil: never) is
// closed while it waits.
func (p *Pool) waitForHostSpace(deadline *time.Time, what, volume string, cause error, withdraw <-chan struct{}) error {
	if errors.Is(cause, errHeadroomShort) && p.restoreHeadroom() {
		return nil // the host had space for the headroom again: retry
	}
	p.mu.Lock()
	if err := p.usableLocked(); err != nil {
		p.mu.Unlock()
		return err
	}
	policy := NoSpacePolicy(p.rec.NoSpace)
	timeout := time.Duration(p.rec.NoSpaceTimeout)
	if !p.hostOut {
		p.hostOut = true
		p.notifyAsyncLocked(Event{Type: OutOfSpace, Volume: volume, Host: true})
	}
	logIt := time.Since(p.lastNoSpace) > time.Second
	if logIt {
		p.lastNoSpace = time.Now()
	}
	p.mu.Unlock()
	if !errors.Is(cause, ErrNoSpace) {
		cause = fmt.Errorf("%w: %w", ErrNoSpace, cause)
	}
	if policy == NoSpaceError {
		if logIt {
			p.log.Warn("host file system out of space: request failed", "pool", p.dir, "volume", volume, "op", what, "err", cause)
		}
		return fmt.Errorf("%s on volume %s: %w", what, volume, cause)
	}
	if policy == NoSpaceQueue && deadline.IsZero() {
		*deadline = time.Now().Add(timeout)
	}
	if logIt {
		p.log.Warn("host file system out of space: request waits for space", "pool", p.dir, "volume", volume, "op", what,
			"policy", policy.String(), "err", cause)
	}
	for {
		p.mu.Lock()
		ch := p.spaceCh
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return ErrClosed
		}
		wait := hostPoll
		if !deadline.IsZero() {
			left := time.Until(*deadline)
			if left <= 0 {
				p.log.Warn("host file system out of space: queued request timed out", "pool", p.dir, "volume", volume, "op", what)
				return fmt.Errorf("%s on volume %s: %w (waited %v)", what, volume, cause, timeout)
			}
			wait = min(wait, left)
		}
		t := time.NewTimer(wait)
		select {
		case <-ch:
			t.Stop()
			return nil
		case <-withdraw:
			t.Stop()
			return fmt.Errorf("%s on volume %s: %w", what, volume, ErrWithdrawn)
		case <-t.C:
		}
		if !p.restoreHeadroom() {
			continue // the metadata's headroom comes back first
		}
		if free, _, ok := p.hostFreeBytes(); !ok || free >= uint64(p.blockSize) {
			p.hostSpaceBack()
			return nil
		}
	}
}

// hostSpaceBack ends an out-of-space episode of the host.
func (p *Pool) hostSpaceBack() {
	p.mu.Lock()
	if p.hostOut {
		p.hostOut = false
		free, _, _ := p.hostFreeBytes()
		p.notifyAsyncLocked(Event{Type: SpaceAvailable, Free: free, Host: true})
		p.log.Info("host file system has space again", "pool", p.dir, "host_free_bytes", free)
	}
	p.mu.Unlock()
}

// hostShortfall is how much of the pool's free space the host could not
// back: the pool may still need size - dataHost bytes of new host space
// (its free blocks, and the holes of partly written ones), the host has
// hostFree.
func hostShortfall(size, dataHost, hostFree, poolFree uint64) uint64 {
	if dataHost+hostFree >= size {
		return 0
	}
	return min(poolFree, size-dataHost-hostFree)
}

// noteHostSpace looks at the host's free space (background ticker): it
// logs, and tells watchers (LowWater/AboveLowWater events with Host set),
// when it crosses the pool's low-water mark, and logs when the host has
// no space left for a block.
func (p *Pool) noteHostSpace() {
	p.restoreHeadroom()
	free, _, ok := p.hostFreeBytes()
	if !ok {
		return
	}
	p.mu.Lock()
	full := free < uint64(p.blockSize)
	if full != p.hostFull {
		p.hostFull = full
		if full {
			p.log.Error("the data file's host file system is full: writes to unprovisioned space follow the no-space policy until it has space",
				"pool", p.dir, "host_free_bytes", free, "no_space", NoSpacePolicy(p.rec.NoSpace).String())
		} else {
			p.log.Info("the data file's host file system has space again", "pool", p.dir, "host_free_bytes", free)
		}
	}
	if p.rec.LowWaterPPM != 0 {
		low := p.lowWaterBlocks() * uint64(p.blockSize)
		if below := free < low; below != p.hostLow {
			p.hostLow = below
			if below {
				p.log.Warn("host file system free space fell below the pool's low-water mark", "pool", p.dir,
					"host_free_bytes", free, "low_water_bytes", low)
				p.notifyAsyncLocked(Event{Type: LowWater, Free: free, Host: true})
			} else {
				p.log.Info("host file system free space is above the pool's low-water mark again", "pool", p.dir, "host_free_bytes", free)
				p.notifyAsyncLocked(Event{Type: AboveLowWater, Free: free, Host: true})
			}
		}
	}
	p.mu.Unlock()
}

// The metadata's headroom (pebblemeta/headroom.go). Every commit needs
// host space for the metadata store (Pebble's log, flushes and
// compactions), also one that only maps a provisioned block written: on a
// full host it would fail, and a failed commit fails the pool, promised
// writes included. So the store keeps headroom allocated on its file
// system and gives it up to Pebble on ENOSPC. Where the data file shares
// that file system, the pool then gives no new host space to data (first
// writes to unprovisioned blocks, new spares) until the headroom is back:
// those follow the no-space policy as on a full host, so that what the
// pool freed for its metadata is not eaten by its own data. Promised
// writes need no new host space and go on.

// Headroom by default: 1/16 of the metadata's file system, within these.
const (
	minMetaHeadroom = 1 << 20
	maxMetaHeadroom = 64 << 20
)

// metaHeadroom is the headroom to keep for the store in metaDir: none on
// a file system other than the real one (tests' in-memory ones).
func metaHeadroom(fs vfs.FS, metaDir string, opt int64) int64 {
	if opt < 0 || fs != vfs.Default {
		return 0
	}
	if opt > 0 {
		return opt
	}
	var st unix.Statfs_t
	if err := unix.Statfs(metaDir, &st); err != nil {
		return minMetaHeadroom
	}
	return DefaultMetaHeadroom(st.Blocks * uint64(st.Bsize))
}

// DefaultMetaHeadroom is the metadata headroom a pool keeps on a file
// system of fsBytes.
func DefaultMetaHeadroom(fsBytes uint64) int64 {
	return int64(min(maxMetaHeadroom, max(minMetaHeadroom, fsBytes/16)))
}

// openHeadroom allocates the headroom at Open and notes whether the data
// file shares its file system.
func (p *Pool) openHeadroom() {
	var ms, ds unix.Stat_t
	if unix.Stat(filepath.Join(p.dir, metaName), &ms) == nil && unix.Stat(filepath.Join(p.dir, dataName), &ds) == nil {
		p.metaShared = ms.Dev == ds.Dev && !p.thick
	}
	if err := p.store.RestoreHeadroom(); err != nil {
		p.log.Error("the metadata store has not all its headroom on the host: writes that need new host space follow the no-space policy until it has",
			"pool", p.dir, "err", err)
	}
}

// headroomUsed is called (on Pebble's writing goroutine) when the
// metadata store used some of its headroom.
func (p *Pool) headroomUsed() {
	// Also during Open, before p.store is set: only log.
	p.headroomUses.Add(1)
	p.log.Error("the metadata's host file system is full: the metadata store used some of its headroom; writes that need new host space follow the no-space policy until it is restored",
		"pool", p.dir)
}

// dataHeadroomShort reports whether new host space for data must wait for
// the metadata's headroom to be restored.
func (p *Pool) dataHeadroomShort() bool {
	return p.metaShared && p.store.HeadroomShort()
}

// restoreHeadroom tries to restore the headroom; it reports whether data
// may take new host space (there was nothing to restore, or it is back).
func (p *Pool) restoreHeadroom() bool {
	if !p.store.HeadroomShort() {
		return true
	}
	if err := p.store.RestoreHeadroom(); err != nil {
		return !p.metaShared
	}
	have, _ := p.store.Headroom()
	p.log.Info("the metadata store's headroom is restored on the host", "pool", p.dir, "headroom_bytes", have)
	return true
}

// errHeadroomShort refuses new host space to data while the metadata's
// headroom is short: like the host's ENOSPC, it follows the no-space
// policy.
var errHeadroomShort = fmt.Errorf("%w: the host file system filled up and the metadata store's headroom is not restored yet (%w)", ErrNoSpace, unix.ENOSPC)
