package thin

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The snapshot model test drives volumes, read-only snapshots and clones
// with random writes, discards, provisioning, snapshots, deletes, reserve
// mode, flushes, crashes (power cuts) and kills of the process, and checks
// after every step:
//   - every sector of every volume reads what the model says (tags are
//     unique across the pool, so data of another volume or of the wrong
//     moment shows up as an unknown tag); after a crash, one of the values
//     the sector may hold;
//   - a write that touches only promised blocks (provisioned in the
//     volume's view, or any block in reserve mode) never fails, and no
//     request fails for a reason other than lack of space;
//   - Check is clean and allocated + reserved + free = size;
//   - now and then the pool is filled from a filler volume and every
//     promised block of every writable volume is written.
// Space is not predicted block by block here (sharing makes that the
// pool's business); the promise and Check are the contract.

type snapVol struct {
	name     string
	writable bool
	reserve  bool
	sectors  []modelSector
	prov     []bool // provisioned in this volume's view
}

type snapModel struct {
	t       *testing.T
	rng     *rand.Rand
	m       *machine
	p       *Pool
	dir     string
	vols    []*snapVol
	nextTag uint64
	nextVol int
	log     []string
	points  *crashPoints // TestModelSnapshotsCrashPoints'
	tune    *tuning      // the pool's, at random
}

func (md *snapModel) fatalf(format string, args ...any) {
	md.t.Helper()
	tail := md.log
	if len(tail) > 80 {
		tail = tail[len(tail)-80:]
	}
	md.t.Fatalf("%s\nlast operations:\n%s", fmt.Sprintf(format, args...), strings.Join(tail, "\n"))
}

func (md *snapModel) vol(v *snapVol) *Volume {
	h, err := md.p.Volume(v.name)
	if err != nil {
		md.fatalf("volume %s: %v", v.name, err)
	}
	return h
}

func (md *snapModel) promised(v *snapVol, first, n int) bool {
	if v.reserve {
		return true
	}
	for b := first / mPerBlk; b <= (first+n-1)/mPerBlk; b++ {
		if !v.prov[b] {
			return false
		}
	}
	return true
}

func (md *snapModel) write(v *snapVol, first, n int) {
	md.t.Helper()
	tag := md.nextTag
	md.nextTag++
	buf := make([]byte, n*mSector)
	for i := range n {
		fillSector(buf[i*mSector:(i+1)*mSector], tag, 0, uint64(first+i))
	}
	err := md.vol(v).WriteAt([][]byte{buf}, int64(first)*mSector)
	md.log = append(md.log, fmt.Sprintf("  tag %d -> %s %d+%d: %v", tag, v.name, first, n, err))
	if err != nil {
		if !errors.Is(err, ErrNoSpace) || md.promised(v, first, n) {
			md.fatalf("write %s %d+%d (promised %v): %v", v.name, first, n, md.promised(v, first, n), err)
		}
		if errors.Is(err, unix.ENOSPC) {
			md.adoptPartialWrite(v, first, n, tag)
		}
		return
	}
	for i := range n {
		s := &v.sectors[first+i]
		s.cur = tag
		s.cands = append(s.cands, tag)
	}
}

// adoptPartialWrite learns what a write the host refused midway left:
// each sector holds its old value or the write's.
func (md *snapModel) adoptPartialWrite(v *snapVol, first, n int, tag uint64) {
	md.t.Helper()
	buf := make([]byte, n*mSector)
	if err := md.vol(v).ReadAt([][]byte{buf}, int64(first)*mSector); err != nil {
		md.fatalf("read back %s: %v", v.name, err)
	}
	for i := range n {
		s := &v.sectors[first+i]
		got, err := decodeSector(buf[i*mSector:(i+1)*mSector], 0, uint64(first+i))
		if err != nil || got != s.cur && got != tag {
			md.fatalf("after a write the host refused, %s sector %d holds %d (%v): neither %d nor %d", v.name, first+i, got, err, s.cur, tag)
		}
		s.cur = got
		s.cands = append(s.cands, tag)
	}
}

func (md *snapModel) zero(v *snapVol, first, n int, unmap bool) {
	md.t.Helper()
	err := md.vol(v).WriteZeroes(int64(first)*mSector, int64(n)*mSector, unmap)
	if err != nil {
		// Provisioning may lack space; a partial discard of a shared block
		// copies it first, which may lack space too, unless promised.
		if !errors.Is(err, ErrNoSpace) || unmap && md.promised(v, first, n) {
			md.fatalf("zero %s %d+%d unmap=%v: %v", v.name, first, n, unmap, err)
		}
		if errors.Is(err, unix.ENOSPC) {
			// The host refused a copy of a shared block midway (its
			// reservations were backed first): some copies hold zeros.
			md.adoptPartialWrite(v, first, n, 0)
		}
		return
	}
	for i := range n {
		s := &v.sectors[first+i]
		s.cur = 0
		s.cands = append(s.cands, 0)
	}
	for b := first / mPerBlk; b <= (first+n-1)/mPerBlk; b++ {
		whole := first <= b*mPerBlk && first+n >= (b+1)*mPerBlk
		switch {
		case !unmap:
			v.prov[b] = true
		case whole:
			v.prov[b] = false
		}
	}
}

// durable records that everything written so far is durable (Flush, and
// every snapshot and delete, which commit the whole pool).
func (md *snapModel) durable() {
	for _, v := range md.vols {
		for i := range v.sectors {
			s := &v.sectors[i]
			s.cands = append(s.cands[:0], s.cur)
		}
	}
}

func (md *snapModel) snapshot(o *snapVol, writable bool) {
	md.t.Helper()
	name := fmt.Sprintf("s%d", md.nextVol)
	md.nextVol++
	err := md.p.CreateSnapshot(o.name, name, writable)
	md.log = append(md.log, fmt.Sprintf("  %s of %s (writable %v): %v", name, o.name, writable, err))
	if err != nil {
		if !errors.Is(err, ErrNoSpace) {
			md.fatalf("snapshot %s of %s: %v", name, o.name, err)
		}
		return
	}
	md.points.check(md)
	md.durable()
	nv := &snapVol{name: name, writable: writable, prov: slices.Clone(o.prov), sectors: make([]modelSector, len(o.sectors))}
	for i, s := range o.sectors {
		nv.sectors[i] = modelSector{cur: s.cur, cands: []uint64{s.cur}}
	}
	md.vols = append(md.vols, nv)
}

func (md *snapModel) verifyAll() {
	md.t.Helper()
	for _, v := range md.vols {
		buf := make([]byte, mVolBlks*mBlock)
		if err := md.vol(v).ReadAt([][]byte{buf}, 0); err != nil {
			md.fatalf("read %s: %v", v.name, err)
		}
		for i := range v.sectors {
			tag, err := decodeSector(buf[i*mSector:(i+1)*mSector], 0, uint64(i))
			if err != nil || tag != v.sectors[i].cur {
				md.fatalf("volume %s sector %d: got tag %d (%v), model says %d", v.name, i, tag, err, v.sectors[i].cur)
			}
		}
	}
}

func (md *snapModel) check() {
	md.t.Helper()
	s := md.p.Status()
	if s.Pool.AllocatedBytes+s.Pool.ReservedBytes+s.Pool.FreeBytes != s.Pool.SizeBytes {
		md.fatalf("allocated+reserved+free != size: %+v", s.Pool)
	}
	if err := md.p.Check(nil); err != nil {
		md.fatalf("check: %v", err)
	}
	// Every block some volume overrode (copied, discarded, provisioned over) is freed by the
	// last sharer to do so, and deletes prune: nothing unreadable stays allocated.
	if got, want := heldBlocks(md.p), reachableBlocks(md.t, md.p); got != want {
		md.fatalf("pool holds %d blocks (allocated, not being released), volumes can read %d", got, want)
	}
	for _, v := range md.vols {
		for _, vs := range s.Volumes {
			if vs.Name == v.name && vs.ReserveMode != v.reserve {
				md.fatalf("volume %s: reserve mode %v, model %v", v.name, vs.ReserveMode, v.reserve)
			}
		}
	}
}

// fillAndKeepPromises fills the pool, writes every promised block of every
// writable volume (none may fail), then frees the filler again.
func (md *snapModel) fillAndKeepPromises() {
	md.t.Helper()
	fill, err := md.p.Volume("fill")
	if err != nil {
		md.fatalf("%v", err)
	}
	if h := md.m.host; h != nil {
		// The host too is just above what the pool holds now: the
		// promised writes may need no new host space.
		base := h.limit
		h.setLimit(h.used() + md.rng.IntN(3))
		md.log = append(md.log, fmt.Sprintf("  host limit %d pages (%d used)", h.limit, h.used()))
		defer h.setLimit(base)
	}
	blk := make([]byte, mBlock)
	for vb := int64(0); ; vb++ {
		if vb*mBlock >= int64(fill.Size()) {
			md.fatalf("filler never ran out of space")
		}
		err := fill.WriteAt([][]byte{blk}, vb*mBlock)
		if errors.Is(err, ErrNoSpace) {
			break
		}
		if err != nil {
			md.fatalf("fill: %v", err)
		}
	}
	for _, v := range md.vols {
		if !v.writable {
			continue
		}
		for b := range mVolBlks {
			if md.promised(v, b*mPerBlk, mPerBlk) {
				md.write(v, b*mPerBlk+md.rng.IntN(mPerBlk), 1)
			}
		}
	}
	if err := fill.Discard(0, int64(fill.Size())); err != nil {
		md.fatalf("free the filler: %v", err)
	}
}

func (md *snapModel) crash() {
	md.t.Helper()
	md.points.check(md)
	md.p.abandon()
	md.p = nil
	md.m = md.m.crash(md.rng)
	md.open()
	if err := md.p.Check(nil); err != nil {
		md.fatalf("check after crash: %v", err)
	}
	for _, v := range md.vols {
		tags, err := survivingTags(md.vol(v), allowedValues{name: v.name, sectors: v.sectors})
		if err != nil {
			md.fatalf("after crash: %v", err)
		}
		for i, tag := range tags {
			v.sectors[i] = modelSector{cur: tag, cands: append(v.sectors[i].cands[:0], tag)}
		}
		// Provisioning since the last commit may be lost: adopt the pool's.
		md.p.mu.Lock()
		st := md.p.vols[v.name]
		for b := range v.prov {
			e, _, err := md.p.resolveLocked(st.rec.Layer, uint64(b))
			if err != nil {
				md.p.mu.Unlock()
				md.fatalf("lookup: %v", err)
			}
			v.prov[b] = e.Provisioned()
		}
		md.p.mu.Unlock()
	}
}

// kill ends the process (not the machine: the page cache and the files
// stay): every completed change must be there after reopening, exactly.
func (md *snapModel) kill() {
	md.t.Helper()
	md.p.abandon()
	md.p = nil
	md.open()
	if err := md.p.Check(nil); err != nil {
		md.fatalf("check after kill: %v", err)
	}
	for _, v := range md.vols {
		buf := make([]byte, mVolBlks*mBlock)
		if err := md.vol(v).ReadAt([][]byte{buf}, 0); err != nil {
			md.fatalf("read after kill: %v", err)
		}
		for i := range v.sectors {
			if tag, err := decodeSector(buf[i*mSector:(i+1)*mSector], 0, uint64(i)); err != nil || tag != v.sectors[i].cur {
				md.fatalf("after kill volume %s sector %d holds tag %d (%v), want %d", v.name, i, tag, err, v.sectors[i].cur)
			}
		}
		md.p.mu.Lock()
		st := md.p.vols[v.name]
		for b := range v.prov {
			e, _, err := md.p.resolveLocked(st.rec.Layer, uint64(b))
			if err != nil || e.Provisioned() != v.prov[b] {
				md.p.mu.Unlock()
				md.fatalf("after kill volume %s block %d provisioned %v (%v), want %v", v.name, b, e.Provisioned(), err, v.prov[b])
			}
		}
		md.p.mu.Unlock()
	}
	// Nothing became durable: what a power cut may lose stays possible
	// (overwrites in place are only in the page cache).
}

func (md *snapModel) open() {
	p, err := openForModel(md.dir, md.rng, md.m, md.tune)
	if err != nil {
		md.fatalf("reopen: %v", err)
	}
	md.p = p
}

func TestModelSnapshots(t *testing.T) { forModelSeeds(t, 600, runSnapModel) }

// snapCrashPoints makes runSnapModel take crash clones inside commits.
var snapCrashPoints bool

func runSnapModel(t *testing.T, seed uint64, steps int) {
	md := &snapModel{t: t, rng: rand.New(rand.NewPCG(seed, 7)), m: newMachine(), dir: "/pool", nextTag: 1}
	// The data file's host holds 60 to 119 blocks of the 96-block pool, or
	// has no limit; the promise rounds set it just above what is used.
	md.m.host = newHostSpace(0)
	if md.rng.IntN(3) > 0 {
		md.m.host.limit = 60 + md.rng.IntN(60)
	}
	if snapCrashPoints {
		md.points = newCrashPoints(md.m, seed)
	}
	if err := create(md.dir, CreateOptions{Size: 96 * mBlock, BlockSize: mBlock}, md.m.env()); err != nil {
		t.Fatal(err)
	}
	md.tune = randomTuning(md.rng)
	md.open()
	defer func() {
		if md.p != nil {
			md.p.abandon()
		}
	}()
	if err := md.p.CreateVolume("fill", 200*mBlock); err != nil {
		t.Fatal(err)
	}
	newVol := func() {
		name := fmt.Sprintf("v%d", md.nextVol)
		md.nextVol++
		if err := md.p.CreateVolume(name, mVolBlks*mBlock); err != nil {
			md.fatalf("create: %v", err)
		}
		md.points.check(md)
		md.durable()
		v := &snapVol{name: name, writable: true, sectors: make([]modelSector, mVolBlks*mPerBlk), prov: make([]bool, mVolBlks)}
		for i := range v.sectors {
			v.sectors[i].cands = []uint64{0}
		}
		md.vols = append(md.vols, v)
	}
	newVol()
	total := mVolBlks * mPerBlk
	for step := range steps {
		var ws []*snapVol
		for _, v := range md.vols {
			if v.writable {
				ws = append(ws, v)
			}
		}
		if len(ws) == 0 {
			newVol()
			continue
		}
		v := ws[md.rng.IntN(len(ws))]
		any := md.vols[md.rng.IntN(len(md.vols))]
		n := 1 + md.rng.IntN(3*mPerBlk)
		if md.rng.IntN(2) == 0 {
			n = mPerBlk * (1 + md.rng.IntN(3))
		}
		first := md.rng.IntN(total - n + 1)
		if md.rng.IntN(2) == 0 {
			first = first / mPerBlk * mPerBlk
			n = min(n, total-first)
		}
		r := md.rng.IntN(100)
		var op string
		switch {
		case r < 30:
			op = "write"
		case r < 38:
			op = "discard"
		case r < 52:
			op = "provision"
		case r < 58:
			op = "flush"
		case r < 66:
			op = "snapshot"
		case r < 72:
			op = "clone"
		case r < 78:
			op = "delete"
		case r < 82:
			op = "reserve"
		case r < 86:
			op = "promise"
		case r < 92 && md.points == nil:
			// Not with crash points: a clone taken inside a commit after a
			// reopen on the same in-memory fs sometimes misses Pebble's
			// MANIFEST (not understood yet; see the report of issue 13).
			op = "kill"
		default:
			op = "crash"
		}
		md.log = append(md.log, fmt.Sprintf("%d:%s %s/%s %d+%d", step, op, v.name, any.name, first, n))
		md.points.arm(md, op)
		switch op {
		case "write":
			md.write(v, first, n)
		case "discard":
			md.zero(v, first, n, true)
		case "provision":
			md.zero(v, first, n, false)
		case "flush":
			if err := md.p.Flush(); err != nil {
				md.fatalf("flush: %v", err)
			}
			md.points.check(md)
			md.durable()
		case "snapshot", "clone":
			if len(md.vols) < 8 {
				md.snapshot(any, op == "clone")
			}
		case "delete":
			if len(md.vols) > 1 {
				if err := md.p.DeleteVolume(any.name); err != nil {
					md.fatalf("delete %s: %v", any.name, err)
				}
				md.points.check(md)
				md.durable()
				md.vols = slices.DeleteFunc(md.vols, func(x *snapVol) bool { return x == any })
			}
		case "reserve":
			on := md.rng.IntN(2) == 0
			err := md.p.SetReserveMode(v.name, on)
			switch {
			case err == nil:
				v.reserve = on
			case !on || !errors.Is(err, ErrNoSpace):
				md.fatalf("reserve mode %v on %s: %v", on, v.name, err)
			}
		case "promise":
			md.fillAndKeepPromises()
		case "crash":
			md.crash()
		case "kill":
			// Changes made since the last commit (every step's check
			// commits): a few writes, discards and provisionings.
			for range 1 + md.rng.IntN(6) {
				w := ws[md.rng.IntN(len(ws))]
				n := 1 + md.rng.IntN(3*mPerBlk)
				first := md.rng.IntN(total - n + 1)
				switch md.rng.IntN(4) {
				case 0:
					md.zero(w, first, n, true)
				case 1:
					md.zero(w, first, n, false)
				default:
					md.write(w, first, n)
				}
			}
			md.kill()
		}
		md.check()
		if step%10 == 0 {
			md.verifyAll()
		}
	}
	md.verifyAll()
}

// heldBlocks counts the pool's allocated blocks less those being released (they stay allocated
// until the commit that makes them reusable). Status cannot say it exactly: while reservations
// count on blocks still being released its numbers must add up to the pool's size.
func heldBlocks(p *Pool) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := p.alloc.count - p.pend.count
	if p.pendOld != nil {
		n -= p.pendOld.count
	}
	return n
}
