package thin

import (
	"fmt"

	"github.com/thinblk/thinblk/pebblemeta"
)

// Reservations beyond provisioning (issue 4): the provisioning promise
// across snapshots, and reserve mode.
//
// In this pool's layered design a writable volume never writes a block
// found in a frozen layer: its first write there copies it into its head.
// So each writable volume (volume or clone) needs one reserved block for
// every provisioned block it reads through a frozen layer. That count is
// ChainProv - Provisioned of its record: ChainProv counts the blocks whose
// deciding entry (the first found up the layer chain) is provisioned, and
// Provisioned those decided by the head itself. Both are counters kept by
// setEntryLocked, so a snapshot checks and takes its reservations in O(1).
// For a physical block shared by r volumes of which k are writable, this
// reserves k blocks: one per copy the writable sharers will make, where a
// design whose last sharer inherits the block would need min(k, r-1).
// With a read-only snapshot (the common case: r = 2, k = 1) both are 1;
// a clone of a volume reserves one block more than that bound per shared
// provisioned block, because the frozen layer keeps its block until
// delete.
//
// Reserve mode guarantees the whole virtual size instead: every block the
// head does not own (mapped) or reserve (reservation entry) is reserved,
// shared ones included, so the volume can overwrite all of itself.
//
// A frozen layer's own reservation entries (provisioned, never written)
// are not counted in the pool: they read as zeros for read-only sharers,
// and each writable sharer counts them in its ChainProv.

// extraFor is how many blocks a volume with record r needs reserved beyond
// its head's reservation entries.
func (p *Pool) extraFor(r *pebblemeta.VolumeRecord) uint64 {
	return extraBlocks(r, uint64(p.blockSize))
}

func extraBlocks(r *pebblemeta.VolumeRecord, blockSize uint64) uint64 {
	sub := func(a, b uint64) uint64 {
		if a < b {
			return 0 // only with corrupt counters; check reports them
		}
		return a - b
	}
	switch {
	case r.Kind == pebblemeta.KindSnapshot:
		return 0
	case r.ReserveMode:
		return sub((r.Size+blockSize-1)/blockSize, r.Mapped+r.Reserved)
	default:
		return sub(r.ChainProv, r.Provisioned)
	}
}

// reaccountLocked brings v's extra reservation, and the pool's sum, up to
// date with v's counters.
func (p *Pool) reaccountLocked(v *volState) {
	n := p.extraFor(&v.rec) + v.recvRes
	p.extra = p.extra - v.extra + n
	v.extra = n
}

// reserveNeedLocked is how many more blocks the pool must reserve if v's
// record became r (0 when it needs fewer).
func (p *Pool) reserveNeedLocked(v *volState, r pebblemeta.VolumeRecord) uint64 {
	if n := p.extraFor(&r); n > v.extra {
		return n - v.extra
	}
	return 0
}

// SetReserveMode turns reserve mode on or off for a volume or clone. On,
// the pool reserves every block of the volume's virtual size that it does
// not already own or reserve, so no write to it can fail for lack of
// space; when the pool cannot, it fails with ErrNoSpace and changes
// nothing. Off gives back what only reserve mode needed.
func (p *Pool) SetReserveMode(name string, on bool) error {
	return p.manage(func(hb *hostBacking) error { return p.setReserveMode(name, on, hb) })
}

func (p *Pool) setReserveMode(name string, on bool, hb *hostBacking) error {
	if on {
		p.mu.Lock()
		var layer uint64
		if v := p.vols[name]; v != nil && !v.rec.ReserveMode && v.rec.Kind != pebblemeta.KindSnapshot {
			layer = v.rec.Layer
		}
		p.mu.Unlock()
		if layer != 0 {
			if err := p.allocateHead(layer, hb); err != nil {
				return fmt.Errorf("reserve mode of %s: %w", name, err)
			}
		}
	}
again:
	// No fill in flight: a fill's reservation was counted under the mode
	// it was planned in.
	hold := p.holdExclusive()
	defer hold.release()
	hold.hook("reserve-mode")
	err := p.usableLocked()
	v := p.vols[name]
	changed := false
	switch {
	case err != nil:
	case v == nil:
		err = fmt.Errorf("reserve mode of %s: %w", name, ErrNoVolume)
	case v.rec.Kind == pebblemeta.KindSnapshot:
		err = fmt.Errorf("reserve mode of %s: %w", name, ErrReadOnly)
	case v.rec.ReserveMode == on:
	default:
		r := v.rec
		r.ReserveMode = on
		need := p.reserveNeedLocked(v, r)
		if need > p.freeLocked() {
			err = fmt.Errorf("reserve mode of %s: %w: it needs %d more blocks reserved, %d are free",
				name, ErrNoSpace, need, p.freeLocked())
			break
		}
		if !p.enoughSparesLocked(hb, need) {
			err = &hostNeed{spares: need}
			break
		}
		if h := p.headUnallocatedLocked(v.rec.Layer, hb); on && h != nil {
			err = h
			break
		}
		v.rec.ReserveMode = on
		changed = true
		p.reaccountLocked(v)
		p.dirtyVols[v] = struct{}{}
		p.metaDirty = true
		p.noteSpaceLocked()
		if !on {
			p.spaceFreedLocked()
		}
	}
	hold.release()
	if h, ok := err.(*hostNeed); ok {
		if err := p.backFor(hb, h); err != nil {
			return fmt.Errorf("reserve mode of %s: %w", name, err)
		}
		goto again
	}
	if err != nil {
		return err
	}
	if err := p.commitLocked(); err != nil {
		return err
	}
	if changed {
		p.log.Info("volume reserve mode changed", "pool", p.dir, "volume", name, "reserve_mode", on)
	}
	return nil
}

// manage runs one change to the catalogue or the reservations the way
// each runs: alone with commits (flushMu), after the releases under way
// have settled, backing host spares through hb as it needs them (handed
// back at the end); then it delivers the events that the change noted.
func (p *Pool) manage(change func(hb *hostBacking) error) error {
	err := func() error {
		p.flushMu.Lock()
		defer p.flushMu.Unlock()
		if err := p.settleReleasesLocked(); err != nil {
			return err
		}
		var hb hostBacking
		defer hb.done(p)
		return change(&hb)
	}()
	p.deliver()
	return err
}

// settleReleasesLocked commits when discarded blocks wait for their
// release to become durable, and waits for a release phase still running
// (a FLUSH's), so that a reservation that needs them does not fail for
// space that is only a commit away. The caller holds flushMu.
func (p *Pool) settleReleasesLocked() error {
	p.mu.Lock()
	releasing := p.pend.count > 0
	p.mu.Unlock()
	if releasing {
		return p.commitLocked()
	}
	p.awaitReleaseLocked()
	return nil
}
