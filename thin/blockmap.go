package thin

import (
	"fmt"

	"github.com/thinblk/thinblk/pebblemeta"
)

// blockMap is the pool's view of the map, from (layer, virtual block) to
// entry: the changes since the last cut over the cut being committed
// over the committed map in Pebble (read through a bounded cache), and
// the first writes in flight. Guarded by the pool's mu.
type blockMap struct {
	dirty      map[mapKey]pebblemeta.Entry // changes since the last cut; Flags==0 deletes
	committing map[mapKey]pebblemeta.Entry // the cut being committed
	cache      *mapCache                   // committed entries by region; bounded
	filling    map[mapKey]*fill            // blocks whose first write is in flight
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
