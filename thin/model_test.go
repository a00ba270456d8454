package thin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/thinblk/thinblk/pebblemeta"
)

// The model-based test drives a pool with random operations, crashes it at
// random points (dropping unsynced data and metadata), and compares every
// step with a simple model:
//   - every sector has a current value (a tag; 0 = zeros) and the set of
//     values it may hold after a crash (the value at the last completed
//     flush plus everything written since);
//   - every block is mapped, reserved-and-provisioned, or free, so the
//     model knows exactly when a write or provisioning must fail for lack
//     of space.
// THIN_MODEL_STEPS and THIN_MODEL_SEEDS make it run longer; THIN_MODEL_SEED
// picks the first seed (to replay a failure).

const (
	mBlock   = 4096
	mSector  = 512
	mPerBlk  = mBlock / mSector
	mVolBlks = 24
)

type modelSector struct {
	cur   uint64
	cands []uint64
}

type modelBlock struct{ mapped, prov bool }

type modelVol struct {
	name    string
	idx     uint64
	sectors []modelSector
	blocks  []modelBlock
}

type model struct {
	t       *testing.T
	rng     *rand.Rand
	m       *machine
	p       *Pool
	dir     string
	size    uint64 // pool blocks
	vols    []*modelVol
	nextTag uint64
	log     []string
	asyncs  map[*Volume]*asyncIO // TestModelAsync's queues
	faults  *faultRun            // TestModelFaults' injection
	tune    *tuning              // the pool's, at random
}

// volumeIO is how the model reads and writes a volume.
type volumeIO interface {
	ReadAt(bufs [][]byte, off int64) error
	WriteAt(bufs [][]byte, off int64) error
}

// modelIO, if set, routes the model's reads and writes (TestModelAsync:
// through asynchronous queues); modelClose then runs before the pool is
// dropped.
var (
	modelIO    func(md *model, v *Volume) volumeIO
	modelClose func(md *model)
)

func (md *model) io(v *modelVol) volumeIO {
	h := md.vol(v)
	if modelIO != nil {
		return modelIO(md, h)
	}
	return h
}

func (md *model) dropIO() {
	if modelClose != nil {
		modelClose(md)
	}
}

func fillSector(b []byte, tag, vol, sector uint64) {
	if tag == 0 {
		clear(b)
		return
	}
	binary.LittleEndian.PutUint64(b, tag)
	x := tag*0x9e3779b97f4a7c15 ^ vol<<40 ^ sector
	for i := 8; i < len(b); i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
}

var zeroSector [mSector]byte

// decodeSector returns the tag a sector holds, or an error when its bytes
// are not exactly what some write of this volume and sector produced.
func decodeSector(b []byte, vol, sector uint64) (uint64, error) {
	if string(b) == string(zeroSector[:]) {
		return 0, nil
	}
	tag := binary.LittleEndian.Uint64(b)
	var want [mSector]byte
	fillSector(want[:], tag, vol, sector)
	if tag == 0 || string(want[:]) != string(b) {
		return 0, fmt.Errorf("garbage (tag %d, first bytes %x)", tag, b[:16])
	}
	return tag, nil
}

func (md *model) fatalf(format string, args ...any) {
	md.t.Helper()
	tail := md.log
	if len(tail) > 30 {
		tail = tail[len(tail)-30:]
	}
	md.t.Fatalf("%s\nlast operations:\n%v", fmt.Sprintf(format, args...), tail)
}

func (md *model) vol(v *modelVol) *Volume {
	h, err := md.p.Volume(v.name)
	if err != nil && md.faulted(err, nil, 0, 0, 0) {
		// A background commit met the fault: the pool restarted.
		h, err = md.p.Volume(v.name)
	}
	if err != nil {
		md.fatalf("volume %s: %v", v.name, err)
	}
	return h
}

func (md *model) free() uint64 {
	var used uint64
	for _, v := range md.vols {
		for _, b := range v.blocks {
			if b.mapped || b.prov {
				used++
			}
		}
	}
	return md.size - used
}

func (md *model) verify(v *modelVol, firstSector, n int) {
	md.t.Helper()
	buf := make([]byte, n*mSector)
	if err := md.io(v).ReadAt([][]byte{buf}, int64(firstSector)*mSector); err != nil {
		if md.faulted(err, nil, 0, 0, 0) {
			return
		}
		md.fatalf("read %s: %v", v.name, err)
	}
	for i := range n {
		s := firstSector + i
		tag, err := decodeSector(buf[i*mSector:(i+1)*mSector], v.idx, uint64(s))
		if err != nil || tag != v.sectors[s].cur {
			md.fatalf("volume %s sector %d: got tag %d (%v), model says %d", v.name, s, tag, err, v.sectors[s].cur)
		}
	}
}

func (md *model) verifyAccounting() {
	md.t.Helper()
	st := md.p.Status()
	bs := uint64(mBlock)
	if st.Pool.AllocatedBytes+st.Pool.ReservedBytes+st.Pool.FreeBytes != st.Pool.SizeBytes || st.Pool.SizeBytes != md.size*bs {
		md.fatalf("pool accounting %+v, model size %d blocks", st.Pool, md.size)
	}
	if st.Pool.FreeBytes+st.Pool.ReleasingBytes != md.free()*bs {
		md.fatalf("pool free %d + releasing %d, model free %d", st.Pool.FreeBytes, st.Pool.ReleasingBytes, md.free()*bs)
	}
	for i, v := range md.vols {
		var mapped, prov, res uint64
		for _, b := range v.blocks {
			if b.mapped {
				mapped++
			}
			if b.prov {
				prov++
				if !b.mapped {
					res++
				}
			}
		}
		vs := st.Volumes[i]
		if vs.MappedBytes != mapped*bs || vs.ProvisionedBytes != prov*bs || vs.ReservedBytes != res*bs {
			md.fatalf("volume %s status %+v, model mapped/prov/reserved %d/%d/%d blocks", v.name, vs, mapped, prov, res)
		}
	}
}

func (md *model) write(v *modelVol, first, n int) {
	tag := md.nextTag
	md.nextTag++
	buf := make([]byte, n*mSector)
	for i := range n {
		fillSector(buf[i*mSector:(i+1)*mSector], tag, v.idx, uint64(first+i))
	}
	// Split the buffer to exercise scatter-gather.
	cut := md.rng.IntN(len(buf)/mSector+1) * mSector
	// Taking the volume may restart a pool a background commit failed
	// (the model then adopts the restarted pool's blocks): count what the
	// write needs after that.
	h := md.io(v)
	var need uint64
	for b := first / mPerBlk; b <= (first+n-1)/mPerBlk; b++ {
		if !v.blocks[b].mapped && !v.blocks[b].prov {
			need++
		}
	}
	err := h.WriteAt([][]byte{buf[:cut], buf[cut:]}, int64(first)*mSector)
	if need > md.free() {
		if !errors.Is(err, ErrNoSpace) && !md.faulted(err, nil, 0, 0, 0) {
			md.fatalf("write needing %d blocks with %d free: %v, want ErrNoSpace", need, md.free(), err)
		}
		return
	}
	if err != nil {
		if md.faulted(err, v, first, n, tag) {
			return
		}
		md.fatalf("write: %v", err)
	}
	for i := range n {
		s := &v.sectors[first+i]
		s.cur = tag
		s.cands = append(s.cands, tag)
	}
	for b := first / mPerBlk; b <= (first+n-1)/mPerBlk; b++ {
		v.blocks[b].mapped = true
	}
}

func (md *model) zero(v *modelVol, first, n int, unmap, discard bool) {
	var err error
	h := md.vol(v)
	switch {
	case discard:
		err = h.Discard(int64(first)*mSector, int64(n)*mSector)
	default:
		err = h.WriteZeroes(int64(first)*mSector, int64(n)*mSector, unmap)
	}
	fb, lb := first/mPerBlk, (first+n-1)/mPerBlk
	if !unmap {
		var need uint64
		for b := fb; b <= lb; b++ {
			if !v.blocks[b].mapped && !v.blocks[b].prov {
				need++
			}
		}
		if need > md.free() {
			if !errors.Is(err, ErrNoSpace) && !md.faulted(err, nil, 0, 0, 0) {
				md.fatalf("provisioning %d blocks with %d free: %v, want ErrNoSpace", need, md.free(), err)
			}
			return
		}
	}
	if err != nil {
		if md.faulted(err, v, first, n, 0) {
			return
		}
		md.fatalf("zero (unmap=%v): %v", unmap, err)
	}
	for i := range n {
		s := &v.sectors[first+i]
		s.cur = 0
		s.cands = append(s.cands, 0)
	}
	for b := fb; b <= lb; b++ {
		whole := first <= b*mPerBlk && first+n >= (b+1)*mPerBlk
		switch {
		case !unmap:
			v.blocks[b].prov = true
		case whole:
			v.blocks[b] = modelBlock{}
		}
	}
}

func (md *model) flush() {
	err := md.p.Flush()
	md.checkClones()
	if err != nil {
		if md.faulted(err, nil, 0, 0, 0) {
			return
		}
		md.fatalf("flush: %v", err)
	}
	for _, v := range md.vols {
		for i := range v.sectors {
			s := &v.sectors[i]
			s.cands = append(s.cands[:0], s.cur)
		}
	}
}

func (md *model) open() {
	p, err := openForModel(md.dir, md.rng, md.m, md.tune)
	if err != nil {
		md.fatalf("reopen: %v", err)
	}
	md.p = p
	if md.faults != nil {
		md.watchFailures()
	}
}

// randomTuning picks a model test pool's internal limits at random: small
// ranges take the store-iterating
// path of rangeLocked too, the zero mark is raised often, and vectored
// writes are cut at a block, at two, or not at all, and freed blocks are
// punched a few at a time, or (no time budget) not at all: reused with
// zero padding.
func randomTuning(rng *rand.Rand) *tuning {
	t := defaultTuning()
	t.rangeLookupMax = uint64(rng.IntN(6))
	t.zeroStep = uint64(rng.IntN(4))
	t.writeRunMax = []int64{mBlock, 2 * mBlock, math.MaxInt64}[rng.IntN(3)]
	t.punchChunk = 1 + uint64(rng.IntN(3))
	if rng.IntN(2) == 0 {
		t.punchBudget = -time.Second
	}
	return &t
}

// openForModel opens a model test's pool with random small limits: they
// make implicit commits (and cache evictions) happen between flushes, so
// crashes also land after them.
func openForModel(dir string, rng *rand.Rand, m *machine, tune *tuning) (*Pool, error) {
	o := quietOpts()
	o.tuning = tune
	o.MaxPending = 1 + rng.IntN(48)
	o.MapCacheEntries = rng.IntN(64) - 8
	return open(dir, o, m.env())
}

func (md *model) crash() {
	md.checkClones() // against what may survive since the last flush
	md.dropIO()
	md.p.abandon()
	md.p = nil
	md.m = md.m.crash(md.rng)
	md.open()
	if err := md.p.Check(nil); err != nil {
		md.fatalf("check after crash: %v", err)
	}
	md.size = md.p.Status().Pool.SizeBytes / mBlock
	for _, v := range md.vols {
		tags, err := survivingTags(md.io(v), allowedValues{name: v.name, idx: v.idx, sectors: v.sectors})
		if err != nil {
			md.fatalf("after crash: %v", err)
		}
		for i, tag := range tags {
			v.sectors[i] = modelSector{cur: tag, cands: append(v.sectors[i].cands[:0], tag)}
		}
		// Which blocks survived as mapped or provisioned is the pool's
		// choice among committed states; adopt it (Check vouched for it).
		md.p.mu.Lock()
		layer := md.p.vols[v.name].rec.Layer
		for b := range v.blocks {
			e, err := md.p.lookupLocked(mapKey{layer, uint64(b)})
			if err != nil {
				md.p.mu.Unlock()
				md.fatalf("lookup: %v", err)
			}
			v.blocks[b] = modelBlock{mapped: e.Mapped(), prov: e.Provisioned()}
			if !e.Mapped() {
				for i := b * mPerBlk; i < (b+1)*mPerBlk; i++ {
					if v.sectors[i].cur != 0 {
						md.p.mu.Unlock()
						md.fatalf("unmapped block %d has data", b)
					}
				}
			}
		}
		md.p.mu.Unlock()
	}
}

func envInt(name string, def int) int {
	if s := os.Getenv(name); s != "" {
		if n, err := strconv.Atoi(s); err == nil {
			return n
		}
	}
	return def
}

func TestModel(t *testing.T) { forModelSeeds(t, 1000, runModel) }

// modelFaults makes runModel inject disk faults (TestModelFaults).
var modelFaults bool

// forModelSeeds runs a model test once per seed: 3 seeds of defSteps
// steps, or THIN_MODEL_SEEDS seeds from THIN_MODEL_SEED (replay: one seed)
// of THIN_MODEL_STEPS steps. It returns the steps per seed.
func forModelSeeds(t *testing.T, defSteps int, run func(t *testing.T, seed uint64, steps int)) (steps int) {
	steps = envInt("THIN_MODEL_STEPS", defSteps)
	seeds := envInt("THIN_MODEL_SEEDS", 3)
	first := 1
	if s := envInt("THIN_MODEL_SEED", 0); s != 0 {
		first, seeds = s, envInt("THIN_MODEL_SEEDS", 1)
	}
	for seed := first; seed < first+seeds; seed++ {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { run(t, uint64(seed), steps) })
	}
	return steps
}

// addVolumes creates volumes of mVolBlks blocks, zeros to the model.
func (md *model) addVolumes(names ...string) {
	md.t.Helper()
	for _, name := range names {
		if err := md.p.CreateVolume(name, mVolBlks*mBlock); err != nil {
			md.t.Fatal(err)
		}
		v := &modelVol{name: name, idx: uint64(len(md.vols)),
			sectors: make([]modelSector, mVolBlks*mPerBlk), blocks: make([]modelBlock, mVolBlks)}
		for j := range v.sectors {
			v.sectors[j].cands = []uint64{0}
		}
		md.vols = append(md.vols, v)
	}
}

func runModel(t *testing.T, seed uint64, steps int) {
	md := &model{t: t, rng: rand.New(rand.NewPCG(seed, 99)), m: newMachine(), dir: "/pool", size: 32, nextTag: 1}
	if err := create(md.dir, CreateOptions{Size: md.size * mBlock, BlockSize: mBlock}, md.m.env()); err != nil {
		t.Fatal(err)
	}
	md.tune = randomTuning(md.rng)
	if modelFaults {
		md.startFaults(seed)
	}
	md.open()
	defer func() {
		md.dropIO()
		if md.p != nil {
			md.p.abandon()
		}
	}()
	md.addVolumes("a", "b")
	total := mVolBlks * mPerBlk
	randRange := func() (int, int) {
		var n int
		switch md.rng.IntN(4) {
		case 0:
			n = 1 + md.rng.IntN(2)
		case 1:
			n = 1 + md.rng.IntN(mPerBlk*2)
		case 2:
			n = mPerBlk * (1 + md.rng.IntN(4))
		default:
			n = 1 + md.rng.IntN(total/2)
		}
		first := md.rng.IntN(total - n + 1)
		if md.rng.IntN(3) == 0 {
			first = first / mPerBlk * mPerBlk
			n = min(n, total-first)
		}
		return first, n
	}
	for step := range steps {
		v := md.vols[md.rng.IntN(len(md.vols))]
		first, n := randRange()
		r := md.rng.IntN(100)
		var op string
		switch {
		case r < 35:
			op = "write"
		case r < 50:
			op = "read"
		case r < 58:
			op = "discard"
		case r < 64:
			op = "zero-unmap"
		case r < 74:
			op = "provision"
		case r < 86:
			op = "flush"
		case r < 88:
			op = "grow"
		case r < 89:
			op = "recreate"
		default:
			op = "crash"
		}
		md.log = append(md.log, fmt.Sprintf("%d:%s %s %d+%d", step, op, v.name, first, n))
		md.armFaults(op)
		switch op {
		case "write":
			md.write(v, first, n)
		case "read":
			md.verify(v, first, n)
		case "discard":
			md.zero(v, first, n, true, true)
		case "zero-unmap":
			md.zero(v, first, n, true, false)
		case "provision":
			md.zero(v, first, n, false, false)
		case "flush":
			md.flush()
		case "grow":
			if md.size < 48 {
				md.size += 1 + uint64(md.rng.IntN(3))
				if err := md.p.Grow(md.size * mBlock); err != nil && !md.faulted(err, nil, 0, 0, 0) {
					md.fatalf("grow: %v", err)
				}
			}
		case "crash":
			md.crash()
		case "recreate":
			// Delete and create again: durable at once, reads as zeros,
			// its space back in the pool.
			md.checkClones() // taken when the volume still held its data
			if err := md.p.DeleteVolume(v.name); err != nil {
				md.fatalf("delete: %v", err)
			}
			if err := md.p.CreateVolume(v.name, mVolBlks*mBlock); err != nil {
				md.fatalf("create: %v", err)
			}
			for i := range v.sectors {
				v.sectors[i] = modelSector{cands: []uint64{0}}
			}
			clear(v.blocks)
		}
		md.endFaults()
		md.verifyAccounting()
		if step%25 == 0 {
			for _, v := range md.vols {
				md.verify(v, 0, total)
			}
		}
	}
	if err := md.p.Check(nil); err != nil {
		md.fatalf("final check: %v", err)
	}
	_ = pebblemeta.FlagMapped
}

// TestSyncFailureFailsPool: when the data file cannot be synced, Flush
// reports it, the pool refuses further I/O instead of committing
// metadata that points at data that may be lost, and after a restart the
// last good state is there and Check is clean.
func TestSyncFailureFailsPool(t *testing.T) {
	m := newMachine()
	if err := create("/pool", CreateOptions{Size: 16 * mBlock, BlockSize: mBlock}, m.env()); err != nil {
		t.Fatal(err)
	}
	p, err := open("/pool", quietOpts(), m.env())
	if err != nil {
		t.Fatal(err)
	}
	v := mustVolume(t, p, "v", 1<<20)
	write(t, v, 0, pattern(mBlock, 1))
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	write(t, v, mBlock, pattern(mBlock, 2))
	m.files["/pool/"+dataName].syncErr = errors.New("injected EIO")
	if err := v.Flush(); err == nil {
		t.Fatal("Flush succeeded although the data sync failed")
	}
	if err := v.WriteAt([][]byte{make([]byte, 512)}, 0); err == nil {
		t.Fatal("failed pool accepted a write")
	}
	p.abandon()
	m.files["/pool/"+dataName].syncErr = nil
	m2 := m.crash(rand.New(rand.NewPCG(1, 1)))
	p2, err := open("/pool", quietOpts(), m2.env())
	if err != nil {
		t.Fatal(err)
	}
	defer p2.abandon()
	if err := p2.Check(nil); err != nil {
		t.Fatal(err)
	}
	v2, _ := p2.Volume("v")
	if got := read(t, v2, 0, mBlock); string(got) != string(pattern(mBlock, 1)) {
		t.Fatal("flushed block lost")
	}
	if st := p2.Status(); st.Volumes[0].MappedBytes != mBlock {
		t.Fatalf("mapping of the unsynced block survived: %+v", st.Volumes[0])
	}
}
