package thin

import (
	"fmt"
	"math"

	"github.com/thinblk/thinblk/pebblemeta"
)

// layerState is a layer with a record: it has a parent, or it is frozen
// (shared by snapshots, never written again; its counters live here).
type layerState struct {
	rec pebblemeta.LayerRecord
}

// loadLayers reads the layer records and indexes the volumes' heads.
func (p *Pool) loadLayers() error {
	recs, err := p.store.Layers()
	if err != nil {
		return err
	}
	p.layers = make(map[uint64]*layerState, len(recs))
	for _, r := range recs {
		// Parents are always older layers, so a walk up always ends.
		if r.Parent >= r.Layer || r.Layer >= p.rec.NextLayer {
			return fmt.Errorf("%w: layer %d has parent %d (next layer %d)", pebblemeta.ErrCorrupt, r.Layer, r.Parent, p.rec.NextLayer)
		}
		p.layers[r.Layer] = &layerState{rec: r}
	}
	p.heads = map[uint64]*volState{}
	for _, v := range p.vols {
		frozen := p.frozenLocked(v.rec.Layer)
		if frozen != (v.rec.Kind == pebblemeta.KindSnapshot) {
			return fmt.Errorf("%w: volume %s (kind %d) on layer %d, frozen %v", pebblemeta.ErrCorrupt, v.rec.Name, v.rec.Kind, v.rec.Layer, frozen)
		}
		if !frozen {
			if o := p.heads[v.rec.Layer]; o != nil {
				return fmt.Errorf("%w: volumes %s and %s write the same layer %d", pebblemeta.ErrCorrupt, o.rec.Name, v.rec.Name, v.rec.Layer)
			}
			p.heads[v.rec.Layer] = v
		}
	}
	p.dirtyLayers = map[uint64]struct{}{}
	return nil
}

func (p *Pool) frozenLocked(layer uint64) bool {
	l := p.layers[layer]
	return l != nil && l.rec.Frozen
}

func (p *Pool) parentLocked(layer uint64) uint64 {
	if l := p.layers[layer]; l != nil {
		return l.rec.Parent
	}
	return 0
}

// resolveLocked finds the entry that decides block vb of a volume whose
// head is head: the first one up the layer chain. It returns the layer it
// was found in (head when none was).
func (p *Pool) resolveLocked(head, vb uint64) (pebblemeta.Entry, uint64, error) {
	for l := head; l != 0; l = p.parentLocked(l) {
		e, err := p.lookupLocked(mapKey{l, vb})
		if err != nil {
			return e, l, err
		}
		if e.Flags != 0 {
			return e, l, nil
		}
	}
	return pebblemeta.Entry{}, head, nil
}

// ancestor is the entry that decides a block above a head, and its layer.
type ancestor struct {
	pebblemeta.Entry
	layer uint64
}

// ancestorsRangeLocked collects, for the blocks [first, last] that skip
// is not deciding, the nearest entry found above head.
func (p *Pool) ancestorsRangeLocked(head, first, last uint64, skip map[uint64]pebblemeta.Entry) (map[uint64]ancestor, error) {
	anc := map[uint64]ancestor{}
	for l := p.parentLocked(head); l != 0; l = p.parentLocked(l) {
		err := p.rangeLocked(l, first, last, func(vb uint64, e pebblemeta.Entry) {
			if _, ok := skip[vb]; ok {
				return
			}
			if _, ok := anc[vb]; !ok {
				anc[vb] = ancestor{e, l}
			}
		})
		if err != nil {
			return nil, err
		}
	}
	return anc, nil
}

// SnapshotSpec names one snapshot of a consistency group.
type SnapshotSpec struct {
	Origin   string // volume, clone or snapshot to take it of
	Name     string // the new snapshot's name
	Writable bool   // a clone (writable) rather than a read-only snapshot

	streamID [16]byte // a read-only snapshot's id when it is given (receive); zero: a new one
}

// CreateSnapshot makes name a point-in-time copy of origin (a volume, a
// clone or a snapshot): read-only, or a writable clone. It takes O(1)
// metadata work and no space: origin's head layer is frozen and shared.
func (p *Pool) CreateSnapshot(origin, name string, writable bool) error {
	return p.CreateSnapshots([]SnapshotSpec{{Origin: origin, Name: name, Writable: writable}})
}

// CreateSnapshots takes several snapshots at one instant (a consistency
// group): no write lands between them. All are created or none.
func (p *Pool) CreateSnapshots(specs []SnapshotSpec) error {
	if len(specs) == 0 {
		return fmt.Errorf("create snapshots: %w: none given", ErrInvalid)
	}
	return p.manage(func(hb *hostBacking) error { return p.createSnapshots(specs, hb) })
}

func (p *Pool) createSnapshots(specs []SnapshotSpec, hb *hostBacking) error {
again:
	// No request in flight: no fill can publish into a layer being frozen.
	hold := p.holdExclusive()
	defer hold.release()
	hold.hook("snapshot")
	err := p.usableLocked()
	seen := map[string]bool{}
	for _, s := range specs {
		if err != nil {
			break
		}
		switch {
		case pebblemeta.ValidVolumeName(s.Name) != nil:
			err = fmt.Errorf("create snapshot %q: %w: %v", s.Name, ErrInvalid, pebblemeta.ValidVolumeName(s.Name))
		case p.vols[s.Name] != nil || seen[s.Name]:
			err = fmt.Errorf("create snapshot %s: %w", s.Name, ErrVolumeExists)
		case p.vols[s.Origin] == nil:
			err = fmt.Errorf("create snapshot %s of %s: %w", s.Name, s.Origin, ErrNoVolume)
		}
		seen[s.Name] = true
	}
	if err == nil {
		err = p.snapshotSpaceLocked(specs, hb)
	}
	if err != nil {
		if h, ok := err.(*hostNeed); ok {
			hold.release()
			if err := p.backFor(hb, h); err != nil {
				return fmt.Errorf("create snapshot of %s: %w", specs[0].Origin, err)
			}
			goto again
		}
		return err
	}
	frozenAt := map[string]uint64{}
	var created []*volState
	for _, s := range specs {
		o := p.vols[s.Origin]
		L, ok := frozenAt[s.Origin]
		if !ok {
			L = o.rec.Layer
			o.recvRes = 0
			if !p.frozenLocked(L) {
				p.freezeLocked(o)
			}
			frozenAt[s.Origin] = L
		}
		nv := &volState{rec: pebblemeta.VolumeRecord{Name: s.Name, Size: o.rec.Size, Origin: s.Origin,
			Kind: pebblemeta.KindSnapshot, Layer: L, ChainProv: o.rec.ChainProv}}
		if s.Writable {
			nv.rec.Kind = pebblemeta.KindClone
			nv.rec.Layer = p.newLayerLocked(L)
			p.heads[nv.rec.Layer] = nv
		} else {
			nv.rec.StreamID = s.streamID
			if nv.rec.StreamID == ([16]byte{}) {
				nv.rec.StreamID = newStreamID()
			}
		}
		p.reaccountLocked(nv)
		p.vols[s.Name] = nv
		p.dirtyVols[nv] = struct{}{}
		created = append(created, nv)
	}
	p.metaDirty = true
	hold.release()
	if err := p.commitLocked(); err != nil {
		return err
	}
	for _, nv := range created {
		p.notify(Event{Type: VolumeCreated, Volume: nv.rec.Name, Size: nv.rec.Size})
	}
	return nil
}

// snapshotSpaceLocked fails with ErrNoSpace, before anything changes,
// when the pool cannot reserve what the snapshots in specs would need:
// each origin that gets frozen needs a reservation for every provisioned
// block it then shares (every block, in reserve mode) minus the
// reservation entries it freezes, and each clone one for every
// provisioned block it shares.
func (p *Pool) snapshotSpaceLocked(specs []SnapshotSpec, hb *hostBacking) error {
	var need uint64
	frozen := map[string]bool{}
	for _, s := range specs {
		o := p.vols[s.Origin]
		if o.rec.Kind != pebblemeta.KindSnapshot && !frozen[s.Origin] {
			frozen[s.Origin] = true
			after := o.rec
			after.Mapped, after.Provisioned, after.Reserved = 0, 0, 0
			// A receive's hold (in o.extra) ends with the snapshot and
			// covers its reservations first (receive.go).
			need += p.extraFor(&after) - min(p.extraFor(&after), o.extra+o.rec.Reserved)
		}
		if s.Writable {
			clone := pebblemeta.VolumeRecord{Kind: pebblemeta.KindClone, Size: o.rec.Size, ChainProv: o.rec.ChainProv}
			need += p.extraFor(&clone)
		}
	}
	if free := p.freeLocked(); need > free {
		names := make([]string, len(specs))
		for i, s := range specs {
			names[i] = s.Name
		}
		return fmt.Errorf("create snapshot %v: %w: it must reserve %d blocks (%d bytes) for copy-on-write of provisioned shared blocks, %d are free",
			names, ErrNoSpace, need, need*uint64(p.blockSize), free)
	}
	if !p.enoughSparesLocked(hb, need) {
		return &hostNeed{spares: need}
	}
	return nil
}

// freezeLocked freezes o's head layer (its counters move to the layer
// record) and gives o a new empty head under it.
func (p *Pool) freezeLocked(o *volState) {
	L := o.rec.Layer
	ls := p.layers[L]
	if ls == nil {
		ls = &layerState{rec: pebblemeta.LayerRecord{Layer: L}}
		p.layers[L] = ls
	}
	ls.rec.Frozen = true
	ls.rec.Mapped, ls.rec.Provisioned, ls.rec.Reserved = o.rec.Mapped, o.rec.Provisioned, o.rec.Reserved
	// Frozen reservations leave the pool's count: o's own reservation for
	// each of them (ChainProv is unchanged, Provisioned drops) replaces it.
	p.rec.Reserved -= o.rec.Reserved
	o.rec.Mapped, o.rec.Provisioned, o.rec.Reserved = 0, 0, 0
	p.dirtyLayers[L] = struct{}{}
	delete(p.heads, L)
	o.rec.Layer = p.newLayerLocked(L)
	p.heads[o.rec.Layer] = o
	p.dirtyVols[o] = struct{}{}
	p.reaccountLocked(o)
}

func (p *Pool) newLayerLocked(parent uint64) uint64 {
	l := p.rec.NextLayer
	p.rec.NextLayer++
	p.layers[l] = &layerState{rec: pebblemeta.LayerRecord{Layer: l, Parent: parent}}
	p.dirtyLayers[l] = struct{}{}
	return l
}

// layerRefsLocked counts what still needs layer: volumes on it and child
// layers; child is one child (when there is exactly one).
func (p *Pool) layerRefsLocked(layer uint64) (vols, kids int, child uint64) {
	for _, v := range p.vols {
		if v.rec.Layer == layer {
			vols++
		}
	}
	for l, ls := range p.layers {
		if ls.rec.Parent == layer {
			kids++
			child = l
		}
	}
	return vols, kids, child
}

// derefLayerLocked is called when a reference to the frozen layer L went
// away. Unreferenced, L is detached: the caller releases its blocks with
// releaseDetached after dropping the locks. Referenced only by one child
// layer, L and the child are merged (the smaller into the larger), so
// blocks the child overrides are released: either way no block stays
// allocated that no volume can read. The caller holds flushMu, the I/O
// gate exclusively and p.mu.
func (p *Pool) derefLayerLocked(L uint64) ([]detachedLayer, error) {
	var dets []detachedLayer
	for L != 0 {
		vols, kids, child := p.layerRefsLocked(L)
		parent := p.parentLocked(L)
		switch {
		case vols == 0 && kids == 0:
			d, err := p.detachLayerLocked(L, false, fmt.Sprintf("layer %d", L))
			if err != nil {
				return nil, err
			}
			dets = append(dets, d)
			L = parent
			continue
		case vols == 0 && kids == 1 && p.heads[child] != nil && p.layerEntriesLocked(child) < p.layerEntriesLocked(L):
			// The usual case (a snapshot of a big volume deleted): the
			// volume's head holds only what changed since, so merge it into
			// L rather than L into it.
			if err := p.mergeHeadIntoLocked(L, child); err != nil {
				return nil, err
			}
		case vols == 0 && kids == 1:
			if err := p.dropLayerLocked(L, child); err != nil {
				return nil, err
			}
			p.layers[child].rec.Parent = parent
			p.dirtyLayers[child] = struct{}{}
			L = child // it took L's entries
		}
		break
	}
	// What went away may have been the only reader of some ancestor
	// entries (the other sharers override them).
	for ; L != 0; L = p.parentLocked(L) {
		if !p.frozenLocked(L) {
			continue
		}
		if err := p.pruneLayerLocked(L); err != nil {
			return nil, err
		}
	}
	return dets, nil
}

// layerEntriesLocked estimates how many entries a layer has (holes are
// not counted).
func (p *Pool) layerEntriesLocked(l uint64) uint64 {
	if v := p.heads[l]; v != nil {
		return v.rec.Mapped + v.rec.Reserved
	}
	if ls := p.layers[l]; ls != nil {
		return ls.rec.Mapped + ls.rec.Reserved
	}
	return 0
}

// mergeHeadIntoLocked folds head layer C (a volume's, C's only parent is
// frozen layer L, which nothing else needs) into L: C's entries override
// L's, the overridden ones are released, and L becomes the volume's head.
// It walks C's map only, so deleting the last snapshot of a big volume
// costs what the volume changed since, not its size. The volume's view,
// and so its ChainProv, does not change.
func (p *Pool) mergeHeadIntoLocked(L, C uint64) error {
	v := p.heads[C]
	ls := p.layers[L]
	var moves []struct {
		vb uint64
		e  pebblemeta.Entry
	}
	if err := p.rangeLocked(C, 0, math.MaxUint64, func(vb uint64, e pebblemeta.Entry) {
		moves = append(moves, struct {
			vb uint64
			e  pebblemeta.Entry
		}{vb, e})
	}); err != nil {
		return fmt.Errorf("merge layer %d into %d: %w", C, L, err)
	}
	// L's entries become the head's: its counters join the volume's, and
	// its reservations count in the pool again.
	v.rec.Mapped += ls.rec.Mapped
	v.rec.Provisioned += ls.rec.Provisioned
	v.rec.Reserved += ls.rec.Reserved
	p.rec.Reserved += ls.rec.Reserved
	ls.rec.Frozen = false
	ls.rec.Mapped, ls.rec.Provisioned, ls.rec.Reserved = 0, 0, 0
	delete(p.heads, C)
	p.heads[L] = v
	v.rec.Layer = L
	p.dirtyVols[v] = struct{}{}
	if ls.rec.Parent == 0 {
		// A head without a parent needs no layer record.
		delete(p.layers, L)
		delete(p.dirtyLayers, L)
		p.deadLayerRec = append(p.deadLayerRec, L)
	} else {
		p.dirtyLayers[L] = struct{}{}
	}
	released := false
	for _, m := range moves {
		old, err := p.lookupLocked(mapKey{L, m.vb})
		if err != nil {
			return fmt.Errorf("merge layer %d into %d: %w", C, L, err)
		}
		e := m.e
		if e.Hole() && ls.rec.Parent == 0 {
			e = pebblemeta.Entry{} // nothing above L to hide
		}
		// C's entry is counted already (it was the head's); only the one
		// it overrides goes, like any entry of the head being replaced.
		// Nothing need be written when L has no entry there, unless a
		// pending change is what emptied it (a frozen entry its last
		// sharer hid): dropping that would bring the committed one back.
		k := mapKey{L, m.vb}
		_, pending := p.dirty[k]
		if e.Flags != 0 || old.Flags != 0 || pending {
			p.dirty[k] = e
		}
		if old.Mapped() {
			v.rec.Mapped--
			p.rec.Allocated--
			p.releaseLocked(old.PBlock)
			released = true
		}
		if old.Provisioned() {
			v.rec.Provisioned--
		}
		if old.Reserved() {
			v.rec.Reserved--
			p.rec.Reserved--
			released = true
		}
	}
	p.forgetLayerLocked(C)
	p.reaccountLocked(v)
	if released {
		p.spaceFreedLocked()
	}
	return nil
}

// pruneLayerLocked releases the entries of frozen layer L that no volume
// can read any more: every path down from L overrides them. Such a block
// is overridden on every path through L's child with the fewest entries
// too, so only that child's entries (and, where it has none, its own
// smallest child's, down to a volume) are candidates: the walk costs what
// the sharers changed, not L's size.
func (p *Pool) pruneLayerLocked(L uint64) error {
	if p.volumeOnLocked(L) {
		return nil // it reads every entry of L
	}
	cands := map[uint64]struct{}{}
	if err := p.pruneCandidatesLocked(L, cands); err != nil {
		return fmt.Errorf("prune layer %d: %w", L, err)
	}
	var dead []struct {
		vb uint64
		e  pebblemeta.Entry
	}
	for vb := range cands {
		e, err := p.lookupLocked(mapKey{L, vb})
		if err != nil {
			return fmt.Errorf("prune layer %d: %w", L, err)
		}
		if e.Flags == 0 {
			continue
		}
		ok, err := p.readableBelowLocked(L, vb)
		if err != nil {
			return fmt.Errorf("prune layer %d: %w", L, err)
		}
		if !ok {
			dead = append(dead, struct {
				vb uint64
				e  pebblemeta.Entry
			}{vb, e})
		}
	}
	// Part of a delete, committed before it returns: not for the intent
	// log (a partial prune must not be replayed).
	p.intentSkip = true
	defer func() { p.intentSkip = false }()
	for _, d := range dead {
		p.setEntryLocked(L, d.vb, d.e, pebblemeta.Entry{}, false)
		if d.e.Mapped() {
			p.releaseLocked(d.e.PBlock)
		}
	}
	if len(dead) > 0 {
		p.spaceFreedLocked()
	}
	return nil
}

// volumeOnLocked reports whether a volume (head or read-only snapshot)
// sits on layer l.
func (p *Pool) volumeOnLocked(l uint64) bool {
	if p.heads[l] != nil {
		return true
	}
	for _, v := range p.vols {
		if v.rec.Layer == l {
			return true
		}
	}
	return false
}

// pruneCandidatesLocked adds to cands the blocks that every path down from
// layer l might override: the entries of l's smallest child, and where
// no volume sits on that child, its own candidates in turn.
func (p *Pool) pruneCandidatesLocked(l uint64, cands map[uint64]struct{}) error {
	for {
		var best uint64
		for c, ls := range p.layers {
			if ls.rec.Parent == l && (best == 0 || p.layerEntriesLocked(c) < p.layerEntriesLocked(best)) {
				best = c
			}
		}
		for c := range p.heads {
			if p.parentLocked(c) == l && (best == 0 || p.layerEntriesLocked(c) < p.layerEntriesLocked(best)) {
				best = c
			}
		}
		if best == 0 {
			return nil
		}
		if err := p.rangeLocked(best, 0, math.MaxUint64, func(vb uint64, _ pebblemeta.Entry) { cands[vb] = struct{}{} }); err != nil {
			return err
		}
		if p.volumeOnLocked(best) {
			return nil
		}
		l = best
	}
}

// dropIfUnreadLocked releases entry e of frozen layer L at vb once no
// volume reads it any more (the last of its sharers overrode it), so a
// block every sharer has copied does not stay allocated until a delete
// prunes it. The I/O gate, held shared by the caller, keeps the block
// from reuse while a read that resolved to it is in flight.
func (p *Pool) dropIfUnreadLocked(L, vb uint64, e pebblemeta.Entry) {
	if !p.frozenLocked(L) {
		return
	}
	if cur, err := p.lookupLocked(mapKey{L, vb}); err != nil || cur != e {
		return // changed meanwhile (or unreadable): leave it to delete's prune
	}
	if ok, err := p.readableBelowLocked(L, vb); ok || err != nil {
		return
	}
	p.setEntryLocked(L, vb, e, pebblemeta.Entry{}, false)
	if e.Mapped() {
		p.releaseLocked(e.PBlock)
		p.spaceFreedLocked()
	}
}

// readableBelowLocked reports whether some volume reads block vb through
// layer L: one sits on L, or a child layer without its own entry there
// passes it down to one.
func (p *Pool) readableBelowLocked(L, vb uint64) (bool, error) {
	if p.heads[L] != nil {
		return true, nil
	}
	for _, v := range p.vols {
		if v.rec.Layer == L {
			return true, nil
		}
	}
	for c, ls := range p.layers {
		if ls.rec.Parent != L {
			continue
		}
		e, err := p.lookupLocked(mapKey{c, vb})
		if err != nil {
			return false, err
		}
		if e.Flags != 0 {
			continue
		}
		if ok, err := p.readableBelowLocked(c, vb); ok || err != nil {
			return ok, err
		}
	}
	return false, nil
}

// dropLayerLocked removes layer L: each entry moves into child (when child
// is not 0 and has no entry of its own there) or is released.
func (p *Pool) dropLayerLocked(L, child uint64) error {
	var moves []struct {
		vb uint64
		e  pebblemeta.Entry
	}
	var rerr error
	err := p.rangeLocked(L, 0, math.MaxUint64, func(vb uint64, e pebblemeta.Entry) {
		if child != 0 {
			ce, err := p.lookupLocked(mapKey{child, vb})
			if err != nil && rerr == nil {
				rerr = err
			}
			if ce.Flags == 0 {
				moves = append(moves, struct {
					vb uint64
					e  pebblemeta.Entry
				}{vb, e})
				return
			}
		}
		if rerr == nil {
			rerr = p.releaseEntryLocked(fmt.Sprintf("layer %d", L), e, false)
		}
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("drop layer %d: %w", L, err)
	}
	// Part of a delete, committed before it returns: not for the intent
	// log (a partial merge must not be replayed).
	p.intentSkip = true
	defer func() { p.intentSkip = false }()
	for _, m := range moves {
		// The block changes owner: the pool counters stay, the child's grow.
		// The child read this entry through L, so what decides the block
		// for it does not change; a head child now owns it (no
		// copy-on-write left to reserve for), and a reservation moved
		// into a head counts in the pool again.
		p.setEntryLocked(child, m.vb, pebblemeta.Entry{}, m.e, m.e.Provisioned())
		if m.e.Mapped() {
			p.rec.Allocated--
		}
	}
	p.forgetLayerLocked(L)
	p.spaceFreedLocked()
	return nil
}
