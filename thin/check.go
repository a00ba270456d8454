package thin

import (
	"errors"
	"fmt"

	"github.com/thinblk/thinblk/pebblemeta"
)

// maxProblems bounds how many problems Check lists.
const maxProblems = 100

// CheckError lists the problems Check found.
type CheckError struct {
	Problems []string
	More     int // problems found beyond the listed ones
}

func (e *CheckError) Error() string {
	s := fmt.Sprintf("pool check found %d problem(s)", len(e.Problems)+e.More)
	for _, p := range e.Problems {
		s += "\n  " + p
	}
	if e.More > 0 {
		s += fmt.Sprintf("\n  ... and %d more", e.More)
	}
	return s
}

// Check commits pending changes, then verifies every invariant of the
// committed metadata (in a snapshot, so the pool keeps serving) against
// itself and the data file, like thin_check:
// records decode, every map entry belongs to a volume and lies inside it,
// every physical block is inside the pool and owned at most once, the
// allocation bitmap is exactly the set of owned blocks, and every counter
// matches the map. progress (may be nil) is called now and then with map
// entries checked so far and the total the counters promise. It returns
// nil when clean, a *CheckError listing problems, or another error when it
// could not run.
func (p *Pool) Check(progress func(done, total uint64)) error {
	// Commit, and freeze the committed state: requests and commits go on
	// while the walk reads the snapshot.
	p.flushMu.Lock()
	err := p.commitLocked()
	p.mu.Lock()
	spares := len(p.spareChunks) > 0 // the release phase made spares
	p.mu.Unlock()
	if err == nil && spares {
		err = p.commitLocked()
	}
	var snap *pebblemeta.Snapshot
	if err == nil {
		snap = p.store.Snapshot()
	}
	p.flushMu.Unlock()
	if err != nil {
		return fmt.Errorf("check pool %s: %w", p.dir, err)
	}
	defer snap.Close()
	st := &snap.View
	ce := &CheckError{}
	bad := func(format string, args ...any) {
		if len(ce.Problems) < maxProblems {
			ce.Problems = append(ce.Problems, fmt.Sprintf(format, args...))
		} else {
			ce.More++
		}
	}
	rec, err := st.Pool()
	if err != nil {
		return fmt.Errorf("check pool %s: %w", p.dir, err)
	}
	bs := uint64(rec.BlockSize)
	if bs < 4096 || bs&(bs-1) != 0 {
		bad("pool block size %d is not a power of two >= 4096", bs)
		return ce
	}
	if size, err := p.data.Size(); err != nil {
		return fmt.Errorf("check pool %s: data file: %w", p.dir, err)
	} else if uint64(size) < rec.SizeBlocks*bs {
		bad("data file is %d bytes, smaller than the pool (%d)", size, rec.SizeBlocks*bs)
	}
	if rec.ZeroFrom > rec.SizeBlocks {
		bad("never-written mark %d beyond the pool (%d blocks)", rec.ZeroFrom, rec.SizeBlocks)
	}
	if rec.Allocated+rec.Reserved > rec.SizeBlocks {
		bad("pool allocated %d + reserved %d blocks exceed its size %d", rec.Allocated, rec.Reserved, rec.SizeBlocks)
	}
	vols, err := st.Volumes()
	if err != nil {
		return fmt.Errorf("check pool %s: %w", p.dir, err)
	}
	layers, err := st.Layers()
	if err != nil {
		if errors.Is(err, pebblemeta.ErrCorrupt) {
			bad("%v", err)
			return ce
		}
		return fmt.Errorf("check pool %s: %w", p.dir, err)
	}
	type counts struct{ mapped, provisioned, reserved uint64 }
	byLayer := map[uint64]*pebblemeta.VolumeRecord{}
	frozen := map[uint64]*pebblemeta.LayerRecord{}
	refs := map[uint64]int{} // volumes and child layers needing a layer
	direct := map[uint64]int{}
	got := map[uint64]*counts{}
	var total uint64
	for i := range layers {
		l := &layers[i]
		if l.Parent >= l.Layer || l.Layer >= rec.NextLayer {
			bad("layer %d: parent %d is not an older layer (next layer %d)", l.Layer, l.Parent, rec.NextLayer)
		}
		if l.Parent != 0 {
			refs[l.Parent]++
		}
		if l.Frozen {
			frozen[l.Layer] = l
			got[l.Layer] = &counts{}
			total += l.Mapped + l.Reserved
		} else if l.Mapped+l.Provisioned+l.Reserved != 0 {
			bad("layer %d is not frozen but has counters in its record", l.Layer)
		}
	}
	for i := range layers {
		if par := layers[i].Parent; par != 0 && frozen[par] == nil {
			bad("layer %d: parent %d is not a frozen layer", layers[i].Layer, par)
		}
	}
	for i := range vols {
		v := &vols[i]
		if v.Layer == 0 || v.Layer >= rec.NextLayer {
			bad("volume %s: layer %d outside [1, %d)", v.Name, v.Layer, rec.NextLayer)
		}
		refs[v.Layer]++
		direct[v.Layer]++
		if frozen[v.Layer] != nil {
			if v.Kind != pebblemeta.KindSnapshot || v.Mapped+v.Provisioned+v.Reserved != 0 {
				bad("volume %s (kind %d) is on frozen layer %d with counters %d/%d/%d; only read-only snapshots, without counters, may be",
					v.Name, v.Kind, v.Layer, v.Mapped, v.Provisioned, v.Reserved)
			}
			continue
		}
		if v.Kind == pebblemeta.KindSnapshot {
			bad("read-only snapshot %s is on layer %d, which is not frozen", v.Name, v.Layer)
		}
		if o := byLayer[v.Layer]; o != nil {
			bad("volumes %s and %s share layer %d", o.Name, v.Name, v.Layer)
		}
		if v.Size == 0 || v.Size%512 != 0 {
			bad("volume %s: size %d is not a positive multiple of 512", v.Name, v.Size)
		}
		if v.Reserved > v.Provisioned {
			bad("volume %s: reserved %d > provisioned %d", v.Name, v.Reserved, v.Provisioned)
		}
		byLayer[v.Layer] = v
		got[v.Layer] = &counts{}
		total += v.Mapped + v.Reserved
	}
	owned := newBitmap(rec.SizeBlocks)
	var done, mapped, reserved uint64
	err = st.AllMap(func(layer, vb uint64, e pebblemeta.Entry) error {
		done++
		if progress != nil && done%65536 == 0 {
			progress(done, total)
		}
		v := byLayer[layer]
		if v == nil {
			if frozen[layer] == nil {
				bad("map entry %d/%d belongs to no volume", layer, vb)
				return nil
			}
			v = &pebblemeta.VolumeRecord{Name: fmt.Sprintf("(frozen layer %d)", layer)}
		} else if vb >= (v.Size+bs-1)/bs {
			bad("volume %s: map entry for block %d beyond its size", v.Name, vb)
		}
		c := got[layer]
		if e.Provisioned() {
			c.provisioned++
		}
		if e.Reserved() {
			c.reserved++
			if frozen[layer] == nil {
				reserved++ // a frozen layer's reservations are its sharers' (reserve.go)
			}
		}
		if e.Mapped() {
			c.mapped++
			mapped++
			switch {
			case e.PBlock >= rec.SizeBlocks:
				bad("volume %s: block %d maps to physical block %d beyond the pool (%d blocks)", v.Name, vb, e.PBlock, rec.SizeBlocks)
			case e.PBlock >= rec.ZeroFrom:
				bad("volume %s: block %d maps to physical block %d, at or above the never-written mark %d", v.Name, vb, e.PBlock, rec.ZeroFrom)
			case owned.test(e.PBlock):
				bad("volume %s: block %d maps to physical block %d, which another entry owns too", v.Name, vb, e.PBlock)
			default:
				owned.set(e.PBlock)
			}
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, pebblemeta.ErrCorrupt) {
			bad("%v", err)
			return ce
		}
		return fmt.Errorf("check pool %s: %w", p.dir, err)
	}
	if progress != nil {
		progress(done, total)
	}
	for _, v := range vols {
		if frozen[v.Layer] != nil {
			continue // a read-only snapshot: its frozen layer's record counts
		}
		c := got[v.Layer]
		if c.mapped != v.Mapped || c.provisioned != v.Provisioned || c.reserved != v.Reserved {
			bad("volume %s: counters say mapped/provisioned/reserved %d/%d/%d, the map has %d/%d/%d",
				v.Name, v.Mapped, v.Provisioned, v.Reserved, c.mapped, c.provisioned, c.reserved)
		}
	}
	for l, lr := range frozen {
		c := got[l]
		if c.mapped != lr.Mapped || c.provisioned != lr.Provisioned || c.reserved != lr.Reserved {
			bad("frozen layer %d: counters say mapped/provisioned/reserved %d/%d/%d, the map has %d/%d/%d",
				l, lr.Mapped, lr.Provisioned, lr.Reserved, c.mapped, c.provisioned, c.reserved)
		}
		// Unreferenced, or needed only by one child layer (whose overrides
		// then hide blocks no one can read): space leaked.
		if refs[l] == 0 || refs[l] == 1 && direct[l] == 0 {
			bad("frozen layer %d is referenced by %d volumes and %d layers (leaks space)", l, direct[l], refs[l]-direct[l])
		}
	}
	// Each volume's ChainProv: the provisioned blocks of its view. A
	// volume without a parent layer decides everything in its head.
	parents := map[uint64]uint64{}
	for _, l := range layers {
		parents[l.Layer] = l.Parent
	}
	chainProv := map[uint64]uint64{}
	var extra uint64
	for _, v := range vols {
		want, ok := chainProv[v.Layer]
		if !ok {
			if parents[v.Layer] == 0 {
				want = got[v.Layer].provisioned
			} else if want, err = viewProvisioned(st, v.Layer, parents); err != nil {
				if errors.Is(err, pebblemeta.ErrCorrupt) {
					bad("%v", err)
					return ce
				}
				return fmt.Errorf("check pool %s: %w", p.dir, err)
			}
			chainProv[v.Layer] = want
		}
		if v.ChainProv != want {
			bad("volume %s: counter says %d provisioned blocks in its view, its layers have %d", v.Name, v.ChainProv, want)
		}
		if v.Kind != pebblemeta.KindSnapshot && v.ReserveMode && v.Mapped+v.Reserved > (v.Size+bs-1)/bs {
			bad("volume %s: owns and reserves more blocks than its size", v.Name)
		}
		extra += extraBlocks(&v, bs)
	}
	if rec.Allocated+rec.Reserved+extra > rec.SizeBlocks {
		bad("pool allocated %d + reserved %d + reserved for snapshots and reserve mode %d blocks exceed its size %d",
			rec.Allocated, rec.Reserved, extra, rec.SizeBlocks)
	}
	if mapped != rec.Allocated {
		bad("pool counter says %d blocks allocated, the map owns %d", rec.Allocated, mapped)
	}
	if reserved != rec.Reserved {
		bad("pool counter says %d blocks reserved, the map reserves %d", rec.Reserved, reserved)
	}
	stored := newBitmap(rec.SizeBlocks)
	err = st.BitmapChunks(func(idx uint64, bits []byte) error {
		if !stored.loadChunk(idx, bits) {
			bad("allocation bitmap chunk %d is malformed or marks blocks beyond the pool", idx)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("check pool %s: %w", p.dir, err)
	}
	var leaked, unmarked uint64
	for w := range owned.words {
		x, y := owned.words[w], stored.words[w]
		for d := x &^ y; d != 0; d &= d - 1 {
			unmarked++
		}
		for d := y &^ x; d != 0; d &= d - 1 {
			leaked++
		}
	}
	if unmarked > 0 {
		bad("%d owned blocks are free in the allocation bitmap (could be handed out twice)", unmarked)
	}
	if leaked > 0 {
		bad("%d blocks are allocated in the bitmap but owned by no map entry (leaked)", leaked)
	}
	p.checkHost(st, rec, owned, extra, bad)
	if len(ce.Problems) > 0 {
		return ce
	}
	return nil
}

// viewProvisioned counts the blocks whose deciding entry, looking up the
// chain from layer, is provisioned: for each provisioned entry, whether
// no layer below it in the chain has an entry of its own there.
func viewProvisioned(st *pebblemeta.View, layer uint64, parents map[uint64]uint64) (uint64, error) {
	var chain []uint64
	for l := layer; l != 0; l = parents[l] {
		if len(chain) > len(parents)+1 {
			return 0, fmt.Errorf("%w: layer chain from %d loops", pebblemeta.ErrCorrupt, layer)
		}
		chain = append(chain, l)
	}
	var n uint64
	for i, l := range chain {
		err := st.LayerMap(l, 0, func(vb uint64, e pebblemeta.Entry) error {
			if !e.Provisioned() {
				return nil
			}
			for _, below := range chain[:i] {
				if _, ok, err := st.MapEntry(below, vb); err != nil || ok {
					return err
				}
			}
			n++
			return nil
		})
		if err != nil {
			return 0, err
		}
	}
	return n, nil
}
