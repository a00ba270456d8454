package thin

import (
	"errors"
	"fmt"
	"time"
)

// allocation is which physical blocks are taken and what reads as zeros,
// and the free space: its accounting and the requests waiting for it.
// Guarded by the pool's mu.
type allocation struct {
	alloc       *bitmap // blocks with an owner, in flight, or freed but not yet reusable
	inflight    *bitmap // allocated, data being written, not yet in the map
	inflightRes uint64  // in-flight blocks that consume a reservation
	extra       uint64  // sum of the volumes' extra reservations
	cursor      uint64  // next-fit allocation cursor
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
	zeroed *bitmap
	// unpunched holds free blocks a release did not punch within its
	// budget, punching the ones a later pass is punching (punchlater.go).
	unpunched, punching *bitmap

	spaceCh     chan struct{}  // closed (and replaced) whenever space is freed
	outOfSpace  bool           // a request found no space, and none appeared since
	belowLow    bool           // free space was below the low-water mark at the last look
	lastNoSpace time.Time      // when running out of space was last logged
	spaceWaits  map[string]int // requests waiting for space, by volume (metrics.go)
}

// allocLocked takes a free block: for a write that consumes a
// reservation (fromReserve) a spare, which needs no new host space;
// otherwise a block that is neither a spare nor being backed, or a spare
// beyond what reservations need. zero says whether it reads as zeros
// (never written, or punched since it was freed); spare whether it was a
// spare (unallocLocked puts it back).
func (p *Pool) allocLocked(fromReserve bool) (b uint64, zero, spare, ok bool) {
	if fromReserve {
		b, ok = p.spare.findSet(p.cursor)
		spare = ok
		if !ok && p.hostBackedLocked() && p.releasingLocked() {
			// The release under way brings the spare (a discard in
			// reserve mode): wait for it rather than need host space.
			return 0, false, false, false
		}
	}
	if !ok {
		b, ok = p.alloc.findClearExcept(p.cursor, p.spare, p.backing, p.punching)
	}
	if !ok && p.spare.count > p.reservedLocked()+p.spareWant {
		b, ok = p.spare.findSet(p.cursor)
		spare = ok
	}
	if !ok {
		return 0, false, false, false
	}
	if spare {
		p.clearSpareLocked(b)
	}
	p.alloc.set(b)
	p.cursor = b + 1
	p.dirtyChunks[b/chunkBlocks] = struct{}{}
	zero = b >= p.zeroMark || p.zeroed.test(b)
	p.zeroed.clear(b)
	return b, zero, spare, true
}

// releasingLocked reports whether freed blocks wait for a commit or a
// release phase.
func (p *Pool) releasingLocked() bool {
	return p.pend.count > 0 || (p.pendOld != nil && p.pendOld.count > 0)
}

// unallocLocked gives back a block allocLocked handed out and that was
// not published (its write failed, or the request was undone).
func (p *Pool) unallocLocked(b uint64, spare bool) {
	p.alloc.clear(b)
	if spare {
		p.setSpareLocked(b) // still host-allocated
	}
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
	if size > maxSize {
		return fmt.Errorf("grow pool %s to %d: %w: larger than the largest size, %d (4 EiB)", p.dir, size, ErrInvalid, uint64(maxSize))
	}
	if size%uint64(p.blockSize) != 0 || size/uint64(p.blockSize) < cur {
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
	p.spareKept.grow(n)
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
