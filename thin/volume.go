package thin

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/vio"
	"github.com/thinblk/thinblk/pebblemeta"
)

// Volume is a thin volume of a pool. It implements blockdev.Storage and is
// safe for concurrent use.
type Volume struct {
	p    *Pool
	st   *volState
	name string
	size atomic.Uint64
}

// Name is the volume's name.
func (v *Volume) Name() string { return v.name }

// Size is the virtual size in bytes; it grows when the volume is resized.
func (v *Volume) Size() uint64 { return v.size.Load() }

// BlockSize is the pool's allocation unit, the granularity in which
// discard releases space.
func (v *Volume) BlockSize() uint32 { return uint32(v.p.blockSize) }

var (
	_ blockdev.AsyncStorage     = (*Volume)(nil)
	_ blockdev.GeometryReporter = (*Volume)(nil)
)

// Geometry publishes the pool's block size as the discard granularity, so
// that guests discard in units that really free space.
func (v *Volume) Geometry() blockdev.Geometry {
	return blockdev.Geometry{
		LogicalBlockSize:   blockdev.SectorSize,
		PhysicalBlockSize:  4096,
		OptimalIOSize:      v.BlockSize(),
		DiscardGranularity: v.BlockSize(),
	}
}

// ReadOnly reports whether the volume refuses changes (a snapshot), so
// that its device is exported read-only.
func (v *Volume) ReadOnly() bool {
	v.p.mu.Lock()
	defer v.p.mu.Unlock()
	return v.st.rec.Kind == pebblemeta.KindSnapshot
}

func (v *Volume) checkRange(op string, off int64, n int) error {
	if off < 0 || n < 0 || off%512 != 0 || n%512 != 0 || uint64(off)+uint64(n) > v.Size() {
		return fmt.Errorf("%s on volume %s at %d+%d: %w: out of range or not sector aligned (size %d)",
			op, v.name, off, n, ErrInvalid, v.Size())
	}
	return nil
}

// startLocked checks that requests may run.
func (v *Volume) startLocked() error {
	if err := v.p.usableLocked(); err != nil {
		return err
	}
	if v.st.deleted {
		return fmt.Errorf("volume %s: %w", v.name, ErrVolumeDeleted)
	}
	return nil
}

// writableLocked checks that requests that change the volume may run.
func (v *Volume) writableLocked() error {
	if err := v.startLocked(); err != nil {
		return err
	}
	if v.st.rec.Kind == pebblemeta.KindSnapshot {
		return fmt.Errorf("volume %s: %w", v.name, ErrReadOnly)
	}
	return nil
}

var errShortBuffers = errors.New("buffers shorter than the request")

// eachPiece hands the next length bytes of c to fn, piece by piece; rel is
// the offset of the piece inside those length bytes.
func eachPiece(c *vio.Cursor, length int64, fn func(b []byte, rel int64) error) error {
	for rel := int64(0); rel < length; {
		b := c.Next(length - rel)
		if len(b) == 0 {
			return errShortBuffers
		}
		if err := fn(b, rel); err != nil {
			return err
		}
		rel += int64(len(b))
	}
	return nil
}

func totalLen(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

func readFull(d dataFile, b []byte, off int64) error {
	n, err := d.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// ReadAt fills bufs from the volume at off. Unmapped blocks read as zeros.
func (v *Volume) ReadAt(bufs [][]byte, off int64) error {
	n := totalLen(bufs)
	if err := v.checkRange("read", off, n); err != nil {
		return err
	}
	var small [16]int64
	for {
		wait, err := v.readGated(bufs, off, int64(n), small[:0])
		if wait == nil {
			return err
		}
		<-wait
	}
}

// readGated is one attempt of ReadAt under the I/O gate, which it releases
// on every exit: also when filling the guest's buffers faults (a front-end
// that shrank its memory), so that the next exclusive user of the gate (a
// release phase, a snapshot) does not wait forever. A block being filled
// returns its channel: wait for it, then try again.
func (v *Volume) readGated(bufs [][]byte, off, n int64, pbs []int64) (chan struct{}, error) {
	p := v.p
	bs := p.blockSize
	p.ioGate.RLock()
	defer p.ioGate.RUnlock()
	p.mu.Lock()
	if err := v.startLocked(); err != nil {
		p.mu.Unlock()
		return nil, err
	}
	layer := v.st.rec.Layer
	for pos := off; pos < off+n; pos = (pos>>p.shift + 1) << p.shift {
		k := mapKey{layer, uint64(pos >> p.shift)}
		if f := p.filling[k]; f != nil {
			p.mu.Unlock()
			return f.done, nil
		}
		e, _, err := p.resolveLocked(layer, k.vb)
		if err != nil {
			p.mu.Unlock()
			return nil, fmt.Errorf("read volume %s: %w", v.name, err)
		}
		pb := int64(-1)
		if e.Mapped() {
			pb = int64(e.PBlock)
		}
		pbs = append(pbs, pb)
	}
	p.mu.Unlock()
	if t := p.trace.Load(); t != nil {
		p.traceRead(t, v.name, "read", off, n, pbs)
	}
	s := vio.NewCursor(bufs)
	var err error
	for i, pos := 0, off; pos < off+n && err == nil; i++ {
		inBlk := pos & (bs - 1)
		l := min(bs-inBlk, off+n-pos)
		if pb := pbs[i]; pb < 0 {
			err = eachPiece(&s, l, func(b []byte, _ int64) error { clear(b); return nil })
		} else {
			base := pb<<p.shift + inBlk
			err = eachPiece(&s, l, func(b []byte, rel int64) error { return readFull(p.data, b, base+rel) })
		}
		pos += l
	}
	if err != nil {
		return nil, fmt.Errorf("read volume %s at %d: %w", v.name, off, err)
	}
	return nil, nil
}

type writePlan struct {
	vb     uint64
	pblock int64
	f      *fill // non-nil: a new block, filled by this write
	cow    int64 // >= 0: the shared block the new one copies (the rest of a partial write)
}

var errRaiseZero = errors.New("zero mark must be raised first")

var blockBufs sync.Pool

func (p *Pool) getBlockBuf() []byte {
	if b, ok := blockBufs.Get().(*[]byte); ok && int64(len(*b)) == p.blockSize {
		return *b
	}
	return make([]byte, p.blockSize)
}

func putBlockBuf(b []byte) { blockBufs.Put(&b) }

// WriteAt writes bufs to the volume at off. The first write to a block
// allocates it (the rest of a partially written new block reads as zeros);
// a block reserved by provisioning takes its reservation and never fails
// for lack of space. Allocation is all or nothing per request.
func (v *Volume) WriteAt(bufs [][]byte, off int64) error {
	return v.WriteAtOrWithdraw(bufs, off, nil)
}

// WriteAtOrWithdraw is WriteAt that, while it waits for space, gives up
// when withdraw is closed: it then returns an error wrapping ErrWithdrawn,
// having written nothing.
func (v *Volume) WriteAtOrWithdraw(bufs [][]byte, off int64, withdraw <-chan struct{}) error {
	n := totalLen(bufs)
	if err := v.checkRange("write", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	p := v.p
	var deadline time.Time
	for {
		p.ioGate.RLock()
		started, wait, err := v.writeGated(bufs, off, int64(n))
		switch {
		case started:
			// Counted failed too: its data may have landed in place, and
			// the next FLUSH must not skip the sync that makes what a
			// read may have seen durable.
			p.opSeq.Add(1)
			if err != nil {
				return err
			}
			if err := p.commitUnlogged(); err != nil {
				return fmt.Errorf("write volume %s: %w", v.name, err)
			}
			return p.backpressure()
		case wait != nil:
			<-wait
		case isHostNoSpace(err):
			// Nothing was published, but pieces written in place may have
			// landed: counted, as a failed write is.
			p.opSeq.Add(1)
			if err := p.waitForHostSpace(&deadline, "write", v.name, err, withdraw); err != nil {
				return err
			}
		case errors.Is(err, ErrNoSpace):
			if err := p.waitForSpace(&deadline, "write", v.name, err, withdraw); err != nil {
				return err
			}
		case err == errRaiseZero:
			if err := p.commit(); err != nil {
				return fmt.Errorf("write volume %s: %w", v.name, err)
			}
		default:
			return err
		}
	}
}

// writeGated plans and writes one request under the I/O gate, which the
// caller took shared; it releases the gate on every exit, a fault on the
// guest's buffers included (see readGated). started is false when the
// request did not start: wait for wait, or planning failed with err.
func (v *Volume) writeGated(bufs [][]byte, off, n int64) (started bool, wait chan struct{}, err error) {
	defer v.p.ioGate.RUnlock()
	plans, wait, err := v.planWrite(off, n)
	if wait != nil || err != nil {
		return false, wait, err
	}
	if err := v.doWrite(plans, bufs, off, n); err != nil {
		if isHostNoSpace(err) {
			// The host file system is full: nothing was published, and the
			// caller retries as the no-space policy says.
			return false, nil, hostError(err, uint64(len(plans)))
		}
		return true, nil, fmt.Errorf("write volume %s at %d: %w", v.name, off, err)
	}
	return true, nil, nil
}

func (v *Volume) planWrite(off, n int64) ([]writePlan, chan struct{}, error) {
	p := v.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := v.writableLocked(); err != nil {
		return nil, nil, err
	}
	layer := v.st.rec.Layer
	first, last := uint64(off>>p.shift), uint64((off+n-1)>>p.shift)
	plans := make([]writePlan, 0, last-first+1)
	var need, fromRes, fromRecv uint64
	for vb := first; vb <= last; vb++ {
		k := mapKey{layer, vb}
		if f := p.filling[k]; f != nil {
			return nil, f.done, nil
		}
		e, el, err := p.resolveLocked(layer, vb)
		if err != nil {
			return nil, nil, fmt.Errorf("write volume %s: %w", v.name, err)
		}
		if el == layer && e.Mapped() {
			plans = append(plans, writePlan{vb: vb, pblock: int64(e.PBlock), cow: -1})
			continue
		}
		// A block found in an ancestor layer is shared with a snapshot:
		// copy on write into the head, keeping the provisioned bit.
		f := &fill{flags: e.Flags & pebblemeta.FlagProvisioned}
		cow := int64(-1)
		if el == layer {
			f.prev, f.fromReserve = e, e.Reserved()
		} else {
			// A provisioned shared block has a reservation for its copy.
			f.ancProv, f.fromReserve = e.Provisioned(), e.Provisioned()
			if e.Flags != 0 {
				f.ancLayer, f.anc = el, e
			}
			if e.Mapped() {
				cow = int64(e.PBlock)
			}
		}
		if v.st.rec.ReserveMode {
			f.fromReserve = true // every block the head lacks is reserved
		}
		switch {
		case f.fromReserve:
			fromRes++
		case fromRecv < v.st.recvRes:
			fromRecv++ // a receive reserved it: taken below, once allocated
			f.fromRecv = true
		default:
			need++
		}
		plans = append(plans, writePlan{vb: vb, pblock: -1, f: f, cow: cow})
	}
	if need > p.freeLocked() {
		return nil, nil, p.noSpaceLocked()
	}
	if need > 0 && p.dataHeadroomShort() {
		return nil, nil, errHeadroomShort
	}
	var err error
	for i := range plans {
		f := plans[i].f
		if f == nil {
			continue
		}
		pb, zero, spare, ok := p.allocLocked(f.fromReserve || f.fromRecv)
		if ok && pb >= p.zeroDurable {
			// Writing here would break the committed promise that blocks
			// from ZeroFrom on were never written: raise it and let the
			// caller commit and retry. Only a new pool's first write, or
			// allocation outrunning the background raise below, gets here.
			p.unallocLocked(pb, spare)
			p.rec.ZeroFrom = max(p.rec.ZeroFrom, min(p.rec.SizeBlocks, pb+1+p.tune.zeroStep))
			p.metaDirty = true
			ok = false
			err = errRaiseZero
		}
		if !ok {
			// Only with counters that disagree with the bitmap (corrupt
			// metadata): undo this request's allocations and fail it.
			for _, q := range plans[:i] {
				if q.f != nil {
					p.unallocLocked(q.f.pblock, q.f.spare)
					p.inflight.clear(q.f.pblock)
					p.spareFills.clear(q.f.pblock)
					if q.f.fromReserve {
						p.inflightRes--
					}
					delete(p.filling, mapKey{layer, q.vb})
				}
			}
			if err == errRaiseZero {
				return nil, nil, err
			}
			if p.backing.count > 0 || p.spareWant > 0 || p.releasingLocked() {
				// The free blocks are spares being backed for a
				// reservation about to be made (host.go).
				return nil, nil, p.noSpaceLocked()
			}
			return nil, nil, fmt.Errorf("write volume %s: %w: no free block although %d are counted free (run check)",
				v.name, pebblemeta.ErrCorrupt, p.freeLocked())
		}
		f.zero, f.spare = zero, spare
		if pb+p.tune.zeroStep/2 >= p.zeroDurable && p.rec.ZeroFrom <= p.zeroDurable && p.zeroDurable < p.rec.SizeBlocks {
			// Halfway to the mark: raise it in a background commit now,
			// so that allocation never waits for a commit to pass it.
			p.rec.ZeroFrom = min(p.rec.SizeBlocks, p.zeroDurable+p.tune.zeroStep)
			p.metaDirty = true
			p.kickCommit()
		}
		p.zeroMark = max(p.zeroMark, pb+1)
		p.inflight.set(pb)
		if spare {
			p.spareFills.set(pb)
		}
		if f.fromReserve {
			p.inflightRes++
		}
		f.pblock = pb
		f.done = make(chan struct{})
		plans[i].pblock = int64(pb)
		p.filling[mapKey{layer, plans[i].vb}] = f
	}
	if fromRecv > 0 {
		// The allocated blocks now count in the bitmap: the reservation
		// they came out of goes.
		v.st.recvRes -= fromRecv
		p.reaccountLocked(v.st)
	}
	if need > 0 {
		p.noteSpaceLocked()
	}
	if t := p.trace.Load(); t != nil {
		p.traceWrite(t, v.name, off, n, plans)
	}
	return plans, nil, nil
}

// errAbandoned gives back the fills of a write that ended without
// finishing its data (a fault on the guest's buffers).
var errAbandoned = errors.New("write abandoned")

// doWrite writes the planned blocks and publishes the new ones. The fills
// are published or given back on every exit, also when copying from the
// guest's buffers faults: requests waiting for them would wait forever.
func (v *Volume) doWrite(plans []writePlan, bufs [][]byte, off, n int64) error {
	fills := false
	for _, pl := range plans {
		fills = fills || pl.f != nil
	}
	done := false
	if fills {
		defer func() {
			if !done {
				v.publish(plans, errAbandoned)
			}
		}()
	}
	err := v.writeData(plans, bufs, off, n)
	done = true
	if !fills {
		// Overwrites in place: nothing to publish. Set after the data is
		// written, so that a commit that saw the flag clear cannot have
		// missed this write (see commitLocked).
		v.p.dataDirty.Store(true)
		return err
	}
	return v.publish(plans, err)
}

func (v *Volume) writeData(plans []writePlan, bufs [][]byte, off, n int64) error {
	p := v.p
	bs := p.blockSize
	s := vio.NewCursor(bufs)
	run := wrun{d: p.data, max: p.tune.writeRunMax}
	var err error
	pos := off
	for _, pl := range plans {
		inBlk := pos & (bs - 1)
		l := min(bs-inBlk, off+n-pos)
		base := pl.pblock << p.shift
		if err == nil {
			if pl.f != nil && l != bs && pl.cow >= 0 {
				// Copy on write: the rest of the block comes from the
				// shared one (which the I/O gate keeps from being freed).
				buf := p.getBlockBuf()
				err = readFull(p.data, buf, pl.cow<<p.shift)
				if err == nil {
					err = eachPiece(&s, l, func(b []byte, rel int64) error { copy(buf[inBlk+rel:], b); return nil })
				}
				if err == nil {
					_, err = p.data.WriteAt(buf, base)
				}
				putBlockBuf(buf)
			} else if pl.f != nil && l != bs && !pl.f.zero {
				// A new block is written whole, so that bytes a previous
				// owner left behind never show.
				buf := p.getBlockBuf()
				clear(buf)
				err = eachPiece(&s, l, func(b []byte, rel int64) error { copy(buf[inBlk+rel:], b); return nil })
				if err == nil {
					_, err = p.data.WriteAt(buf, base)
				}
				putBlockBuf(buf)
			} else {
				at := base + inBlk
				err = eachPiece(&s, l, func(b []byte, rel int64) error { return run.add(b, at+rel) })
			}
		}
		pos += l
	}
	if err == nil {
		err = run.flush()
	}
	run.release()
	return err
}

// publish maps the new blocks of a write (or gives them back when err is
// set) and wakes the requests waiting for them.
func (v *Volume) publish(plans []writePlan, err error) error {
	p := v.p
	// Set after the data is written, so that a commit that saw the flag
	// clear cannot have missed this write (see commitLocked).
	p.dataDirty.Store(true)
	p.mu.Lock()
	defer p.mu.Unlock()
	layer := v.st.rec.Layer
	for _, pl := range plans {
		f := pl.f
		if f == nil {
			continue
		}
		delete(p.filling, mapKey{layer, pl.vb})
		p.inflight.clear(f.pblock)
		p.spareFills.clear(f.pblock)
		if f.fromReserve {
			p.inflightRes--
		}
		if err != nil {
			p.unallocLocked(f.pblock, f.spare)
		} else {
			e := pebblemeta.Entry{Flags: pebblemeta.FlagMapped | f.flags, PBlock: f.pblock}
			p.setLocked(v.st, pl.vb, f.prev, e, f.ancProv)
			if f.ancLayer != 0 {
				p.dropIfUnreadLocked(f.ancLayer, pl.vb, f.anc)
			}
		}
		p.dirtyChunks[f.pblock/chunkBlocks] = struct{}{}
		if f.spare {
			p.spareChunks[f.pblock/chunkBlocks] = struct{}{} // persisted as a spare while in flight
		}
		close(f.done)
	}
	if len(p.dirty) >= p.opts.MaxPending {
		p.kickCommit()
	}
	// Before the write completes: its mapping must outlive a kill of
	// this process, as its data in the page cache does.
	p.intentWriteLocked()
	return err
}

// wrun gathers the pieces of a write that land on consecutive bytes of
// the data file (a request's pieces, over blocks allocated one after the
// other or mapped so), to write them with one vectored call instead of a
// system call per piece.
type wrun struct {
	d        dataFile
	iov      *[][]byte // from iovPool, once needed
	off, end int64
	max      int64 // tuning.writeRunMax
}

var iovPool = sync.Pool{New: func() any { s := make([][]byte, 0, 64); return &s }}

// add appends b, which goes to the data file at at; a piece that does not
// follow the run writes the run first.
func (r *wrun) add(b []byte, at int64) error {
	if r.iov == nil {
		r.iov = iovPool.Get().(*[][]byte)
	}
	if len(*r.iov) > 0 && (at != r.end || len(*r.iov) == vio.MaxIOV || at/r.max != r.off/r.max) {
		if err := r.flush(); err != nil {
			return err
		}
	}
	if len(*r.iov) == 0 {
		r.off, r.end = at, at
	}
	*r.iov = append(*r.iov, b)
	r.end += int64(len(b))
	return nil
}

func (r *wrun) flush() error {
	if r.iov == nil || len(*r.iov) == 0 {
		return nil
	}
	err := r.d.WriteVAt(*r.iov, r.off)
	clear(*r.iov) // holds no caller's memory once pooled
	*r.iov = (*r.iov)[:0]
	return err
}

// release gives the list back, dropping what was not written (after an
// error).
func (r *wrun) release() {
	if r.iov != nil {
		clear(*r.iov)
		*r.iov = (*r.iov)[:0]
		iovPool.Put(r.iov)
		r.iov = nil
	}
}

// backpressure commits synchronously when pending changes pile up faster
// than the background commit drains them, so their memory stays bounded.
func (p *Pool) backpressure() error {
	p.mu.Lock()
	over := len(p.dirty) >= 2*p.opts.MaxPending
	p.mu.Unlock()
	if over {
		return p.commit()
	}
	return nil
}

// Flush makes every request completed before it durable.
func (v *Volume) Flush() error {
	if err := v.p.Flush(); err != nil {
		return fmt.Errorf("flush volume %s: %w", v.name, err)
	}
	return nil
}

// Discard releases the whole blocks of [off, off+length) and zeroes the
// rest; afterwards the range reads as zeros.
func (v *Volume) Discard(off, length int64) error {
	return v.zeroes("discard", off, length, true, nil)
}

// WriteZeroes makes [off, off+length) read as zeros. With unmap it is
// Discard. Without unmap it provisions: every block of the range is
// allocated or reserved and marked provisioned, so later writes there never
// fail for lack of space; when the pool cannot cover the whole range it
// fails and changes nothing.
func (v *Volume) WriteZeroes(off, length int64, unmap bool) error {
	return v.WriteZeroesOrWithdraw(off, length, unmap, nil)
}

// WriteZeroesOrWithdraw is WriteZeroes that, while it waits for space,
// gives up when withdraw is closed (an error wrapping ErrWithdrawn). What
// it did before waiting (copying shared blocks into the head) leaves the
// volume's contents as they were.
func (v *Volume) WriteZeroesOrWithdraw(off, length int64, unmap bool, withdraw <-chan struct{}) error {
	op := "write-zeroes"
	if unmap {
		op = "write-zeroes-unmap"
	}
	return v.zeroes(op, off, length, unmap, withdraw)
}

type zeroOp struct{ off, n int64 }

func (v *Volume) zeroes(op string, off, length int64, unmap bool, withdraw <-chan struct{}) error {
	if length < 0 || length > 1<<62 {
		return fmt.Errorf("%s on volume %s: %w: length %d", op, v.name, ErrInvalid, length)
	}
	if err := v.checkRange(op, off, 0); err != nil || uint64(off)+uint64(length) > v.Size() || length%512 != 0 {
		return fmt.Errorf("%s on volume %s at %d+%d: %w: out of range or not sector aligned", op, v.name, off, length, ErrInvalid)
	}
	if length == 0 {
		return nil
	}
	p := v.p
	var deadline time.Time
	var hb hostBacking
	defer hb.done(p)
	for {
		started, wait, err := v.zeroGated(off, length, unmap, &hb)
		if started {
			p.opSeq.Add(1) // failed too (see WriteAt)
			if err != nil {
				return fmt.Errorf("%s on volume %s at %d+%d: %w", op, v.name, off, length, err)
			}
			if err := p.commitUnlogged(); err != nil {
				return fmt.Errorf("%s on volume %s at %d+%d: %w", op, v.name, off, length, err)
			}
			return p.backpressure()
		}
		if wait != nil {
			<-wait
			continue
		}
		if h, ok := err.(*hostNeed); ok {
			if err := p.backFor(&hb, h); err != nil {
				if !errors.Is(err, ErrNoSpace) {
					return fmt.Errorf("%s on volume %s at %d+%d: %w", op, v.name, off, length, err)
				}
				if err := p.waitForHostSpace(&deadline, op, v.name, err, withdraw); err != nil {
					return err
				}
			}
			continue
		}
		if cf, ok := err.(*cowFirst); ok {
			for _, r := range cf.ranges {
				// The copy keeps the range's contents (zeroing follows in
				// place): a later copy that finds no space fails the
				// request with the volume as it was.
				buf := make([]byte, r.n)
				if err := v.ReadAt([][]byte{buf}, r.off); err != nil {
					return fmt.Errorf("%s on volume %s: copy shared block: %w", op, v.name, err)
				}
				if err := v.WriteAt([][]byte{buf}, r.off); err != nil {
					return fmt.Errorf("%s on volume %s: copy shared block: %w", op, v.name, err)
				}
			}
			continue
		}
		if errors.Is(err, ErrNoSpace) {
			if err := p.waitForSpace(&deadline, op, v.name, err, withdraw); err != nil {
				return err
			}
			continue
		}
		return fmt.Errorf("%s on volume %s at %d+%d: %w", op, v.name, off, length, err)
	}
}

// zeroGated plans a discard or write-zeroes and zeroes in place under the
// I/O gate, which it releases on every exit. started is false when the
// request did not start: wait for wait, or planning returned err.
func (v *Volume) zeroGated(off, length int64, unmap bool, hb *hostBacking) (started bool, wait chan struct{}, err error) {
	p := v.p
	p.ioGate.RLock()
	defer p.ioGate.RUnlock()
	zeros, wait, err := v.planZeroes(off, length, unmap, hb)
	if wait != nil || err != nil {
		return false, wait, err
	}
	if len(zeros) > 0 {
		for _, z := range zeros {
			if err = p.data.ZeroRange(z.off, z.n); err != nil {
				break
			}
		}
		p.dataDirty.Store(true)
	}
	return true, nil, err
}

// cowFirst asks the caller to copy partially zeroed shared blocks into the
// head first (by writing zeros there) and to plan again.
type cowFirst struct{ ranges []zeroOp }

func (c *cowFirst) Error() string { return "shared blocks must be copied first" }

// planZeroes changes the map for a discard or write-zeroes and returns the
// byte ranges of mapped blocks that must be zeroed in place. Blocks shared
// with a snapshot (found in an ancestor layer) are never zeroed in place:
// whole ones get a hole (discard) or a reservation (provision) in the
// head, partial ones are copied first (cowFirst).
func (v *Volume) planZeroes(off, length int64, unmap bool, hb *hostBacking) ([]zeroOp, chan struct{}, error) {
	p := v.p
	bs := p.blockSize
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := v.writableLocked(); err != nil {
		return nil, nil, err
	}
	layer := v.st.rec.Layer
	end := off + length
	first, last := uint64(off>>p.shift), uint64((end-1)>>p.shift)
	for k, f := range p.filling {
		if k.layer == layer && k.vb >= first && k.vb <= last {
			return nil, f.done, nil
		}
	}
	volSize := int64(v.Size())
	// covered returns the part of block vb inside the range, and whether
	// that is the whole block (up to the volume's end).
	covered := func(vb uint64) (a, b int64, whole bool) {
		start := int64(vb) << p.shift
		a, b = max(start, off), min(start+bs, end)
		return a, b, a == start && (b == start+bs || b == volSize)
	}
	var zeros []zeroOp
	zeroIn := func(e pebblemeta.Entry, vb uint64) {
		a, b, _ := covered(vb)
		zeros = append(zeros, zeroOp{int64(e.PBlock)<<p.shift + a - int64(vb)<<p.shift, b - a})
	}
	existing := map[uint64]pebblemeta.Entry{}
	if err := p.rangeLocked(layer, first, last, func(vb uint64, e pebblemeta.Entry) { existing[vb] = e }); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", v.name, err)
	}
	anc, err := p.ancestorsRangeLocked(layer, first, last, existing)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", v.name, err)
	}
	// A partial zeroing of a shared mapped block needs its copy first;
	// provisioning also needs a reservation for each whole block the head
	// has no entry for, unless it takes over one the volume already has
	// (reserve mode's, or the copy-on-write reservation of a provisioned
	// shared block). The space for all of it is checked before anything
	// changes, so a request that fails for lack of space changes nothing.
	var cow []zeroOp
	var need, copies uint64
	for vb, e := range anc {
		if a, b, whole := covered(vb); e.Mapped() && !whole {
			cow = append(cow, zeroOp{a, b - a})
			if !e.Provisioned() && !v.st.rec.ReserveMode {
				need++
				copies++
			}
		}
	}
	if !unmap {
		for vb := first; vb <= last; vb++ {
			e, ok := existing[vb]
			_, _, whole := covered(vb)
			switch {
			case ok && !e.Hole():
			case v.st.rec.ReserveMode:
			case !ok && anc[vb].Provisioned():
			case !ok && anc[vb].Mapped() && !whole:
				// Counted above: its copy is mapped and then provisioned.
			default:
				need++
			}
		}
	}
	// A receive's reservation covers what it provisions (receive.go).
	fromRecv := min(need, v.st.recvRes)
	if need-fromRecv > p.freeLocked() {
		return nil, nil, p.noSpaceLocked()
	}
	// The receive's reservation has its spares already (holdForReceive).
	// The copies are unreserved writes, made before anything is reserved:
	// spares held for them too would keep them from the free blocks the
	// check above counted (a request fitting exactly failed).
	res := need - copies
	res -= min(res, v.st.recvRes)
	if h := p.zeroesHostNeedLocked(unmap, res, existing, hb); h != nil {
		return nil, nil, h
	}
	if len(cow) > 0 {
		return nil, nil, &cowFirst{cow}
	}
	hole := pebblemeta.Entry{Flags: pebblemeta.FlagHole}
	if unmap {
		released := false
		for vb, e := range existing {
			if e.Hole() {
				continue
			}
			if _, _, whole := covered(vb); !whole {
				if e.Mapped() {
					zeroIn(e, vb)
				}
				continue
			}
			ne := pebblemeta.Entry{}
			if p.parentLocked(layer) != 0 {
				// An ancestor may have an entry this one hides.
				if ae, _, err := p.resolveLocked(p.parentLocked(layer), vb); err != nil {
					return nil, nil, fmt.Errorf("%s: %w", v.name, err)
				} else if ae.Flags != 0 && !ae.Hole() {
					ne = hole
				}
			}
			// Nothing provisioned shows through: ne is a hole, or there is
			// no ancestor entry but a hole.
			p.setLocked(v.st, vb, e, ne, false)
			if e.Mapped() {
				p.releaseLocked(e.PBlock)
				released = true
			}
			if e.Reserved() {
				released = true
			}
		}
		for vb, a := range anc {
			if _, _, whole := covered(vb); whole && !a.Hole() {
				p.setLocked(v.st, vb, pebblemeta.Entry{}, hole, a.Provisioned())
				if a.Provisioned() {
					released = true // its copy-on-write reservation
				}
				// The last sharer to hide a frozen block frees it.
				p.dropIfUnreadLocked(a.layer, vb, a.Entry)
			}
		}
		if released {
			// Reservations given back are free at once; queued writers
			// wake, and commit to make the released blocks reusable.
			p.spaceFreedLocked()
		}
	} else {
		for vb := first; vb <= last; vb++ {
			e, ok := existing[vb]
			switch {
			case !ok || e.Hole():
				p.setLocked(v.st, vb, e, pebblemeta.Entry{Flags: pebblemeta.FlagProvisioned}, !ok && anc[vb].Provisioned())
				if a, shared := anc[vb]; !ok && shared && !a.Hole() {
					// The reservation hides the frozen block as a hole would.
					p.dropIfUnreadLocked(a.layer, vb, a.Entry)
				}
			case e.Mapped():
				zeroIn(e, vb)
				if !e.Provisioned() {
					ne := e
					ne.Flags |= pebblemeta.FlagProvisioned
					p.setLocked(v.st, vb, e, ne, false)
				}
			}
		}
		if fromRecv > 0 {
			v.st.recvRes -= fromRecv
			p.reaccountLocked(v.st)
		}
		if need > 0 {
			p.noteSpaceLocked()
		}
	}
	if len(p.dirty) >= p.opts.MaxPending {
		p.kickCommit()
	}
	p.intentWriteLocked()
	return zeros, nil, nil
}
