package thin

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/pebblemeta"
)

// The promise against the host (issue 12). The data file is sparse: the
// space behind a block is whatever the host file system still has when
// the block is first written. So that space a guest was promised never
// depends on the host's free space later:
//
//   - a provisioned mapped block is host-allocated (Allocate, i.e.
//     fallocate with KEEP_SIZE, of its whole range) before the
//     WRITE_ZEROES that provisions it changes the map; it is never
//     punched while mapped (only released blocks are punched);
//   - every reservation (a provisioned block not written yet, a
//     copy-on-write reservation of a shared provisioned block, reserve
//     mode's) is backed by a spare: a free block the pool has
//     host-allocated and keeps out of unreserved allocation. A write
//     that consumes a reservation takes a spare, so it never needs new
//     host space. Invariant: spare blocks >= reserved blocks
//     (reservedLocked), checked before anything that reserves more
//     commits; an operation that would reserve more first host-allocates
//     the spares it lacks (backSpares) or fails with ErrNoSpace,
//     changing nothing.
//
// Spares are free blocks (clear in alloc), so the pool's accounting is
// unchanged: free = size - allocated - reserved still holds, the spares
// are part of the free count that reservations already hold. Spares
// beyond the reservations (a reservation given back) are punched and
// returned to the host by the next commit's release phase (they count
// as releasing meanwhile), unless operations in progress are about to
// reserve them (spareWant). The spare set is persisted with each commit
// (bitmap chunks "s"), with blocks being filled from it and released
// blocks kept as spares (sparesAtCut), and host-allocated again at
// Open: a crash cannot lose its backing (an allocation not yet synced, a
// spare handed to a write that did not commit), and every committed
// state has spares for all its reservations. Where the whole data file
// is host-allocated (a preallocated pool, a block device: thick) no
// spares are needed.

// hostState is the pool's side of the promise against the host: the
// spares and what the data file and its file system can do. Guarded by
// the pool's mu, but for the atomics; thick is set at Open.
type hostState struct {
	spare       *bitmap             // free blocks kept host-allocated for reservations
	backing     *bitmap             // free blocks being host-allocated to become spares
	spareWant   uint64              // spares operations in progress are about to reserve
	spareChunks map[uint64]struct{} // spare-set chunks to persist
	spareFills  *bitmap             // in flight blocks taken from spares: persisted as spares until published
	spareKept   *bitmap             // released blocks persisted as spares (sparesAtCut) until their release phase makes them spares
	thick       bool                // the whole data store is host-allocated: no spares needed

	noAlloc atomic.Bool // the data file cannot allocate ahead
	noPunch atomic.Bool // the data file cannot punch holes
}

// reservedLocked is the number of reserved blocks not yet consumed: what
// the spares must cover.
func (p *Pool) reservedLocked() uint64 {
	return p.rec.Reserved + p.extra - p.inflightRes
}

// hostBackedLocked reports whether spares are kept (the data file is
// sparse and can allocate ahead).
func (p *Pool) hostBackedLocked() bool {
	return !p.thick && !p.noAlloc.Load()
}

// unbackedLocked is how many reservations have no spare (only after the
// host could not back them at Open).
func (p *Pool) unbackedLocked() uint64 {
	if !p.hostBackedLocked() {
		return 0
	}
	if r := p.reservedLocked(); r > p.spare.count {
		return r - p.spare.count
	}
	return 0
}

func (p *Pool) setSpareLocked(b uint64) {
	p.spare.set(b)
	p.spareChunks[b/chunkBlocks] = struct{}{}
}

func (p *Pool) clearSpareLocked(b uint64) {
	p.spare.clear(b)
	p.spareChunks[b/chunkBlocks] = struct{}{}
}

// trimSparesLocked sends spares that no reservation needs to the release
// path (pend): the next release phase punches them, giving their space
// back to the host, and makes them free again. Part of a cut.
func (p *Pool) trimSparesLocked() {
	if !p.spareExcessLocked() {
		return
	}
	keep := p.reservedLocked() + p.spareWant
	for p.spare.count > keep {
		b, ok := p.spare.findSet(0)
		if !ok {
			return
		}
		p.clearSpareLocked(b)
		p.alloc.set(b)
		p.pend.set(b)
	}
}

// spareExcessLocked reports whether there are spares for trimSparesLocked
// to give back.
func (p *Pool) spareExcessLocked() bool {
	return p.hostBackedLocked() && !p.noPunch.Load() && p.spare.count > p.reservedLocked()+p.spareWant
}

// sparesAtCut keeps, among the blocks a commit is about to release,
// spares for reservations that have none: reserve mode reserves again
// each block a discard releases, and the released block itself is the
// natural spare. They are host-allocated whole (a block's unwritten parts
// may be holes) before the commit's data sync, and its batch records them
// as spares (spareKept) with the release itself, so that no committed
// state has more reservations than spares: after a crash between that
// commit and the next, a pool reopened on a full host could not back the
// reservations with other free blocks (they need new host space), and
// the released blocks would be free, unknown as spares. The release
// phase makes them spares in memory (sparesFromReleased). Called by the
// committer (flushMu held) before the cut, without mu.
func (p *Pool) sparesAtCut() {
	p.mu.Lock()
	if !p.hostBackedLocked() || p.pend.count == 0 {
		p.mu.Unlock()
		return
	}
	want := p.reservedLocked() + p.spareWant
	have := p.spare.count + p.backing.count + p.spareKept.count
	var keep []uint64
	if have < want {
		d := want - have
		// Blocks freed since the last cut: their map entries go in this
		// commit (or went in the last one), so the committed state has
		// them free, and nothing hands them out before their release.
		p.pend.runs(func(first, n uint64) bool {
			for b := first; b < first+n && uint64(len(keep)) < d; b++ {
				if !p.spareKept.test(b) {
					keep = append(keep, b)
				}
			}
			return uint64(len(keep)) < d
		})
	}
	p.mu.Unlock()
	if len(keep) == 0 {
		return
	}
	// Released blocks were written: what they need on the host is at most
	// their holes, so the metadata's headroom does not hold this back.
	if err := p.allocateRuns(keep); err != nil {
		p.log.Warn("released blocks could not be host-allocated as spares for reservations", "pool", p.dir, "err", err)
		return
	}
	p.dataDirty.Store(true) // the commit syncs the allocation before recording it
	p.mu.Lock()
	for _, b := range keep {
		// Only a cut takes blocks out of pend, and the caller's is next.
		p.spareKept.set(b)
		p.spareChunks[b/chunkBlocks] = struct{}{}
	}
	p.mu.Unlock()
}

// sparesFromReleased picks, among blocks being released, the spares: the
// ones their commit kept as spares (sparesAtCut), and more if the
// reservations made since need them, host-allocated whole and kept out
// of punching; releaseBlocks makes them spares. Called by the release
// phase, without locks.
func (p *Pool) sparesFromReleased(released *bitmap) []uint64 {
	p.mu.Lock()
	var keep []uint64
	p.spareKept.runs(func(first, n uint64) bool {
		for b := first; b < first+n; b++ {
			if released.test(b) {
				keep = append(keep, b)
			}
		}
		return true
	})
	if !p.hostBackedLocked() {
		p.mu.Unlock()
		return nil
	}
	kept := len(keep)
	want := p.reservedLocked() + p.spareWant
	have := p.spare.count + p.backing.count + p.spareKept.count
	if have < want {
		d := want - have
		released.runs(func(first, n uint64) bool {
			for b := first; b < first+n && uint64(len(keep)-kept) < d; b++ {
				if !p.spareKept.test(b) {
					keep = append(keep, b)
				}
			}
			return uint64(len(keep)-kept) < d
		})
	}
	p.mu.Unlock()
	if len(keep) == kept {
		return keep
	}
	if err := p.allocateRuns(keep[kept:]); err != nil {
		p.log.Warn("released blocks could not be host-allocated as spares for reservations", "pool", p.dir, "err", err)
		return keep[:kept]
	}
	p.dataDirty.Store(true)
	return keep
}

// hostBacking is what one request or operation did to back what it is
// about to reserve: mapped blocks it host-allocated, and the spares it
// asked for (p.spareWant) until done.
type hostBacking struct {
	allocated map[uint64]struct{}
	want      uint64
}

// enoughSparesLocked reports whether the spares cover the pool's
// reservations, n more, and what other operations in progress asked for.
func (p *Pool) enoughSparesLocked(hb *hostBacking, n uint64) bool {
	if !p.hostBackedLocked() {
		return true
	}
	return p.spare.count+hb.want >= p.reservedLocked()+p.spareWant+n
}

// done gives back the spares hb asked for: its reservations are in place
// (and the spares count for them) or were abandoned (the next commit
// trims them).
func (hb *hostBacking) done(p *Pool) {
	if hb.want > 0 {
		p.mu.Lock()
		p.spareWant -= hb.want
		p.mu.Unlock()
		hb.want = 0
	}
}

// hostNeed asks the caller of a plan to host-allocate first: the physical
// blocks of mapped blocks about to be provisioned, and spares for n more
// reservations. It is returned as an error by planners.
type hostNeed struct {
	blocks []uint64
	spares uint64
}

func (h *hostNeed) Error() string { return "host space must be allocated first" }

// zeroesHostNeedLocked says what a write-zeroes without unmap on v must
// host-allocate before it changes the map, or nil: its mapped blocks,
// whole, and spares for the need new reservations.
func (p *Pool) zeroesHostNeedLocked(unmap bool, need uint64, existing map[uint64]pebblemeta.Entry, hb *hostBacking) *hostNeed {
	if !p.hostBackedLocked() {
		return nil
	}
	if unmap {
		// A discard reserves again in reserve mode, but what it releases
		// becomes the spare (sparesFromReleased).
		return nil
	}
	h := &hostNeed{}
	for _, e := range existing {
		if e.Mapped() && !e.Provisioned() {
			if _, ok := hb.allocated[e.PBlock]; !ok {
				h.blocks = append(h.blocks, e.PBlock)
			}
		}
	}
	if !p.enoughSparesLocked(hb, need) {
		h.spares = need
	}
	if len(h.blocks) == 0 && h.spares == 0 {
		return nil
	}
	return h
}

// backFor does what a hostNeed asks, without the pool lock or the I/O
// gate; hb remembers it for the planner's next pass.
func (p *Pool) backFor(hb *hostBacking, h *hostNeed) error {
	if len(h.blocks) > 0 {
		if hb.allocated == nil {
			hb.allocated = map[uint64]struct{}{}
		}
		if err := p.allocateBlocks(h.blocks); err != nil {
			return err
		}
		for _, b := range h.blocks {
			hb.allocated[b] = struct{}{}
		}
		p.dataDirty.Store(true) // the next commit syncs the allocation first
	}
	if h.spares > 0 && hb.want < h.spares {
		hb.done(p)
		return p.backSpares(hb, h.spares)
	}
	// Asked for already (others took them), or reservations made without
	// spares fall short: top the spares up to what is reserved. Returning
	// without doing so would have the caller plan, and ask, again forever.
	return p.backSpares(hb, 0)
}

// backSpares host-allocates free blocks until the pool's spares cover its
// reservations plus n more (and what others in progress asked for). On
// return hb holds n in p.spareWant, so that no commit trims them before
// the caller reserves (hb.done gives them up). It fails with ErrNoSpace
// when the pool has too few free blocks or the host cannot allocate them;
// then no spare was added.
func (p *Pool) backSpares(hb *hostBacking, n uint64) error {
	p.mu.Lock()
	if !p.hostBackedLocked() {
		p.mu.Unlock()
		return nil
	}
	p.spareWant += n
	hb.want += n
	want := p.reservedLocked() + p.spareWant
	have := p.spare.count + p.backing.count
	if have >= want {
		p.mu.Unlock()
		return nil
	}
	d := want - have
	picked := make([]uint64, 0, d)
	from := p.cursor
	for uint64(len(picked)) < d {
		b, ok := p.alloc.findClearExcept(from, p.spare, p.backing, p.punching)
		if !ok {
			break
		}
		p.backing.set(b)
		picked = append(picked, b)
		from = b + 1
	}
	p.mu.Unlock()
	err := p.allocateBlocks(picked)
	if err == nil && uint64(len(picked)) < d {
		err = fmt.Errorf("%w: %d blocks must be reserved, the pool has %d free to back them", ErrNoSpace, d, len(picked))
	}
	if err != nil {
		// Give back what a failed fallocate may have taken, best effort:
		// nothing else can touch these blocks while they are backing.
		slices.Sort(picked)
		for _, r := range blockRuns(picked) {
			_ = p.data.PunchHole(int64(r[0])<<p.shift, int64(r[1])<<p.shift)
		}
	}
	p.mu.Lock()
	for _, b := range picked {
		p.backing.clear(b)
		if err == nil {
			p.setSpareLocked(b)
			// The reservations these back may reach the intent log
			// before the next commit: so must their spares.
			if p.intent != nil && !p.intentSkip {
				p.intent.addSpare(b)
			}
		}
	}
	p.mu.Unlock()
	if err != nil {
		hb.done(p)
		return err
	}
	p.dataDirty.Store(true) // the commit that records the spares syncs their allocation first
	return nil
}

// allocateBlocks host-allocates the given pool blocks, run by run.
func (p *Pool) allocateBlocks(blocks []uint64) error {
	if len(blocks) > 0 && !p.restoreHeadroom() {
		return errHeadroomShort
	}
	return p.allocateRuns(blocks)
}

// allocateRuns host-allocates blocks whatever the metadata's headroom:
// for blocks that are allocated already but for holes.
func (p *Pool) allocateRuns(blocks []uint64) error {
	bs := slices.Clone(blocks)
	slices.Sort(bs)
	for _, r := range blockRuns(bs) {
		if err := p.data.Allocate(int64(r[0])<<p.shift, int64(r[1])<<p.shift); err != nil {
			if errors.Is(err, errors.ErrUnsupported) {
				p.noHostAlloc(err)
				return nil
			}
			return hostError(err, r[1])
		}
	}
	return nil
}

// hostError turns a host ENOSPC into the pool's no-space error.
func hostError(err error, blocks uint64) error {
	if errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: the host file system cannot allocate %d more blocks for the data file (%w)", ErrNoSpace, blocks, err)
	}
	return err
}

// noHostAlloc records that the data file cannot allocate ahead: the
// promise then holds only within the pool's own accounting.
func (p *Pool) noHostAlloc(err error) {
	if !p.noAlloc.Swap(true) {
		p.log.Warn("the data file's host file system cannot allocate ahead (fallocate); provisioned and reserved space is not backed on the host",
			"pool", p.dir, "err", err)
	}
}

// blockRuns groups sorted block numbers into runs [first, count].
func blockRuns(sorted []uint64) [][2]uint64 {
	var runs [][2]uint64
	for _, b := range sorted {
		if n := len(runs); n > 0 && runs[n-1][0]+runs[n-1][1] == b {
			runs[n-1][1]++
			continue
		}
		runs = append(runs, [2]uint64{b, 1})
	}
	return runs
}

// openSpares rebuilds the spares at Open: the persisted set (less any
// block the map owns) is host-allocated again (a crash may have lost an
// allocation that was not synced yet), then more are backed if the
// reservations need them. A host that cannot back them leaves the pool
// usable but its promise at risk: logged, and reported by Status and
// Check.
func (p *Pool) openSpares() {
	if !p.hostBackedLocked() {
		return
	}
	p.spare.andNot(p.alloc)
	var runs [][2]uint64
	p.spare.runs(func(first, n uint64) bool {
		runs = append(runs, [2]uint64{first, n})
		return true
	})
	for _, r := range runs {
		err := p.data.Allocate(int64(r[0])<<p.shift, int64(r[1])<<p.shift)
		if errors.Is(err, errors.ErrUnsupported) {
			p.noHostAlloc(err)
			return
		}
		if err != nil {
			p.log.Error("a spare block for reservations could not be host-allocated again", "pool", p.dir,
				"block", r[0], "blocks", r[1], "err", err)
			for b := r[0]; b < r[0]+r[1]; b++ {
				p.clearSpareLocked(b)
			}
		}
	}
	var hb hostBacking
	if err := p.backSpares(&hb, 0); err != nil {
		p.log.Error("the host cannot back the pool's reservations: writes to provisioned or reserved space may fail when the host file system fills up",
			"pool", p.dir, "unbacked_bytes", p.unbackedLocked()*uint64(p.blockSize), "err", err)
	}
	p.dataDirty.Store(true)
}

// checkHost verifies the promise against the host in the committed state
// (Check): the spare set holds no owned block and covers every
// reservation, and where the data file can tell (FIEMAP), spares and
// provisioned mapped blocks are allocated on the host.
func (p *Pool) checkHost(st *pebblemeta.View, rec pebblemeta.PoolRecord, owned *bitmap, extra uint64, bad func(string, ...any)) {
	p.mu.Lock()
	backed := p.hostBackedLocked()
	p.mu.Unlock()
	if !backed {
		return
	}
	spare := newBitmap(rec.SizeBlocks)
	err := st.SpareChunks(func(idx uint64, bits []byte) error {
		if !spare.loadChunk(idx, bits) {
			bad("spare set chunk %d is malformed or marks blocks beyond the pool", idx)
		}
		return nil
	})
	if err != nil {
		bad("spare set: %v", err)
		return
	}
	var ownedSpares int
	for w := range spare.words {
		ownedSpares += bits.OnesCount64(spare.words[w] & owned.words[w])
	}
	if ownedSpares > 0 {
		bad("%d spare blocks are owned by map entries", ownedSpares)
	}
	if need := rec.Reserved + extra; spare.count < need {
		bad("%d blocks are reserved but only %d spare blocks are host-allocated for them (the host could not back %d)",
			need, spare.count, need-spare.count)
	}
	hd, ok := p.data.(interface {
		hostAllocated(off, n int64) (bool, error)
	})
	if !ok {
		return
	}
	var unalloc uint64
	var probe func(first, n uint64) bool
	probe = func(first, n uint64) bool {
		ok, err := hd.hostAllocated(int64(first)<<p.shift, int64(n)<<p.shift)
		if errors.Is(err, errors.ErrUnsupported) {
			return false
		}
		if err != nil {
			bad("host allocation of blocks %d+%d: %v", first, n, err)
			return false
		}
		if !ok && n == 1 {
			unalloc++
		} else if !ok {
			for b := first; b < first+n; b++ { // which ones
				probe(b, 1)
			}
		}
		return true
	}
	spare.runs(probe)
	if unalloc > 0 {
		bad("%d spare blocks are not allocated on the host", unalloc)
	}
	unalloc = 0
	err = st.AllMap(func(layer, vb uint64, e pebblemeta.Entry) error {
		if e.Mapped() && e.Provisioned() && e.PBlock < rec.SizeBlocks {
			if !probe(e.PBlock, 1) {
				return pebblemeta.ErrStop
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, pebblemeta.ErrStop) {
		bad("walk provisioned blocks: %v", err)
	}
	if unalloc > 0 {
		bad("%d provisioned mapped blocks are not allocated on the host", unalloc)
	}
}

// allocateHead host-allocates every mapped block of a volume's head
// before reserve mode goes on: the volume may then overwrite any of them,
// and a block's bytes its first write did not cover may be holes on the
// host. The caller holds flushMu, so the committed map is stable; what
// is pending is taken under the lock, and headUnallocatedLocked catches
// blocks mapped meanwhile. hb.allocated records what was allocated.
func (p *Pool) allocateHead(layer uint64, hb *hostBacking) error {
	if !p.hostBacked() {
		return nil
	}
	var blocks []uint64
	err := p.store.LayerMap(layer, 0, func(vb uint64, e pebblemeta.Entry) error {
		if e.Mapped() {
			blocks = append(blocks, e.PBlock)
		}
		return nil
	})
	if err != nil {
		return err
	}
	p.mu.Lock()
	h := p.headUnallocatedLocked(layer, hb)
	p.mu.Unlock()
	if h != nil {
		blocks = append(blocks, h.blocks...)
	}
	return p.backFor(hb, &hostNeed{blocks: blocks})
}

// headUnallocatedLocked asks for the pending mapped blocks of layer that
// allocateHead has not allocated yet, or returns nil.
func (p *Pool) headUnallocatedLocked(layer uint64, hb *hostBacking) *hostNeed {
	if !p.hostBackedLocked() {
		return nil
	}
	var h hostNeed
	for k, e := range p.dirty {
		if k.layer == layer && e.Mapped() {
			if _, ok := hb.allocated[e.PBlock]; !ok {
				h.blocks = append(h.blocks, e.PBlock)
			}
		}
	}
	if len(h.blocks) == 0 {
		return nil
	}
	return &h
}

func (p *Pool) hostBacked() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hostBackedLocked()
}
