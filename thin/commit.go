package thin

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/thinblk/thinblk/internal/latency"
	"github.com/thinblk/thinblk/pebblemeta"
)

// commitState is what the next commit writes besides the map and the
// catalogue, how far commits have gone, and the freed blocks on their way
// back to the free space (release). Guarded by the pool's mu, but for the
// atomics and the fields marked flushMu.
type commitState struct {
	opSeq      atomic.Uint64 // completed I/O operations
	durableSeq uint64        // opSeq covered by the last commit (flushMu)
	dataDirty  atomic.Bool   // data written since the last fdatasync
	// releaseDone, under flushMu, is closed when the release phase of the
	// last commit that freed blocks (punch them, make them reusable) has
	// finished; nil when none ran since it was last waited for.
	releaseDone chan struct{}

	pend        *bitmap             // freed since the last cut
	pendOld     *bitmap             // freed in the cut being committed
	pendSpare   *bitmap             // cleared bitmap for the next swap
	dirtyChunks map[uint64]struct{} // allocation bitmap chunks to persist
	metaDirty   bool                // a commit is due for more than the dirty sets (the pool record, deletions)

	intent       *intentLog // map changes since the last cut, for a killed process (intent.go)
	intentSkip   bool       // map changes of a management operation: it commits before returning
	intentErrLog time.Time  // when an intent log failure was last logged
	// Batches of map changes the intent log could not take, and how many
	// of them a durable commit covers (commitUnlogged).
	unloggedSeq, unloggedDurable atomic.Uint64

	kick    chan struct{}     // wakes the background committer
	commits latency.Histogram // times the metadata commits (data sync and Pebble batch)
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

// releaseLocked releases a block whose map entry was removed: it becomes
// reusable only after the removal is durable.
func (p *Pool) releaseLocked(b uint64) {
	p.pend.set(b)
	p.dirtyChunks[b/chunkBlocks] = struct{}{}
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
	p.sparesAtCut()
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
	// commit in a later batch that does not rewrite this chunk. Released
	// blocks kept as spares are spares on disk from the commit that
	// releases them (sparesAtCut).
	for idx := range p.spareChunks {
		buf = p.spare.appendChunkOr(buf[:0], idx, p.spareFills, p.spareKept)
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
	// Kept ones are spares now; any other (the host can no longer
	// allocate ahead) leaves the persisted set with the next commit.
	var unkept []uint64
	p.spareKept.runs(func(first, n uint64) bool {
		for b := first; b < first+n; b++ {
			if released.test(b) {
				unkept = append(unkept, b)
			}
		}
		return true
	})
	for _, b := range unkept {
		p.spareKept.clear(b)
		p.spareChunks[b/chunkBlocks] = struct{}{}
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
