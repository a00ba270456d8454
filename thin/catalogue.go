package thin

import (
	"fmt"
	"math"
	"sort"

	"github.com/thinblk/thinblk/pebblemeta"
)

// catalogue is the pool's volumes and layers, and which of their records
// the next commit writes or deletes. Guarded by the pool's mu.
type catalogue struct {
	vols         map[string]*volState
	heads        map[uint64]*volState   // unfrozen layer -> the volume writing it
	layers       map[uint64]*layerState // layers with a record: a parent, or frozen (snapshot.go)
	dirtyVols    map[*volState]struct{}
	dirtyLayers  map[uint64]struct{}
	deadVols     []string
	deadLayers   []uint64 // layers whose map the next commit deletes
	deadLayerRec []uint64 // layers whose record the next commit deletes
}

type volState struct {
	rec     pebblemeta.VolumeRecord
	deleted bool
	handle  *Volume
	extra   uint64 // blocks reserved for it beyond its head's reservation entries (reserve.go)
	recvRes uint64 // of extra: blocks a stream being received into it still has reserved (receive.go)
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
	return p.manage(func(hb *hostBacking) error { return p.resizeVolume(name, size, hb) })
}

func (p *Pool) resizeVolume(name string, size uint64, hb *hostBacking) error {
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
	} else if !p.enoughSparesLocked(hb, need) {
		p.mu.Unlock()
		if err := p.backSpares(hb, need); err != nil {
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
