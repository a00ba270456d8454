package thin

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// hostSpace is a simulated host file system of limited capacity holding
// one data file: it knows which 4 KiB pages of the file are allocated.
// Writes to unallocated pages, Allocate and ZeroRange fail with ENOSPC
// (doing nothing) when they would take the host past its limit, and so
// does a punch while the host is full (a real file system may need a
// block to split an extent). Allocations not yet synced may be lost in a
// crash, like the data.
type hostSpace struct {
	mu     sync.Mutex
	pages  map[int64]bool
	synced map[int64]bool
	limit  int // pages; 0 = unlimited
}

const hostPage = 4096

func newHostSpace(limit int) *hostSpace {
	return &hostSpace{pages: map[int64]bool{}, synced: map[int64]bool{}, limit: limit}
}

func (h *hostSpace) used() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.pages)
}

func (h *hostSpace) setLimit(pages int) {
	h.mu.Lock()
	h.limit = pages
	h.mu.Unlock()
}

// take allocates the pages of [off, off+n), all or none.
func (h *hostSpace) take(op string, off, n int64) error {
	if n <= 0 {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	var fresh []int64
	for pg := off / hostPage; pg <= (off+n-1)/hostPage; pg++ {
		if !h.pages[pg] {
			fresh = append(fresh, pg)
		}
	}
	if h.limit > 0 && len(fresh) > 0 && len(h.pages)+len(fresh) > h.limit {
		return fmt.Errorf("%s %d+%d on the limited host: %w", op, off, n, unix.ENOSPC)
	}
	for _, pg := range fresh {
		h.pages[pg] = true
	}
	return nil
}

func (h *hostSpace) punch(off, n int64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.limit > 0 && len(h.pages) >= h.limit {
		return fmt.Errorf("punch %d+%d on the full host: %w", off, n, unix.ENOSPC)
	}
	for pg := (off + hostPage - 1) / hostPage; (pg+1)*hostPage <= off+n; pg++ {
		delete(h.pages, pg)
	}
	return nil
}

func (h *hostSpace) sync() {
	h.mu.Lock()
	defer h.mu.Unlock()
	clear(h.synced)
	for pg := range h.pages {
		h.synced[pg] = true
	}
}

// crash returns the host after a power cut: synced allocations, and any
// of the others.
func (h *hostSpace) crash(rng *rand.Rand) *hostSpace {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	n := newHostSpace(h.limit)
	for pg := range h.pages {
		if h.synced[pg] || rng.IntN(2) == 0 {
			n.pages[pg] = true
			n.synced[pg] = true
		}
	}
	return n
}

// hostLimitData is a data file on a hostSpace.
type hostLimitData struct {
	dataFile
	h *hostSpace
}

func (d *hostLimitData) WriteAt(p []byte, off int64) (int, error) {
	if err := d.h.take("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	return d.dataFile.WriteAt(p, off)
}

func (d *hostLimitData) WriteVAt(bufs [][]byte, off int64) error {
	if err := d.h.take("write", off, int64(totalLen(bufs))); err != nil {
		return err
	}
	return d.dataFile.WriteVAt(bufs, off)
}

func (d *hostLimitData) ZeroRange(off, n int64) error {
	if err := d.h.take("zero range", off, n); err != nil {
		return err
	}
	return d.dataFile.ZeroRange(off, n)
}

func (d *hostLimitData) Allocate(off, n int64) error {
	if err := d.h.take("allocate", off, n); err != nil {
		return err
	}
	return d.dataFile.Allocate(off, n)
}

func (d *hostLimitData) PunchHole(off, n int64) error {
	if err := d.h.punch(off, n); err != nil {
		return err
	}
	return d.dataFile.PunchHole(off, n)
}

func (d *hostLimitData) Sync() error {
	if err := d.dataFile.Sync(); err != nil {
		return err
	}
	d.h.sync()
	return nil
}

func (d *hostLimitData) hostFree() (free, total uint64, err error) {
	d.h.mu.Lock()
	defer d.h.mu.Unlock()
	if d.h.limit == 0 {
		return 1 << 40, 1 << 40, nil
	}
	return uint64(max(0, d.h.limit-len(d.h.pages))) * hostPage, uint64(d.h.limit) * hostPage, nil
}

// newHostLimitedPool creates and opens a pool of 4 KiB blocks on real
// files whose data file sits on a hostSpace (no limit until set).
func newHostLimitedPool(t *testing.T, blocks uint64) (*Pool, *hostSpace) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pool")
	if err := Create(dir, CreateOptions{Size: blocks * 4 * kib, BlockSize: 4 * kib}); err != nil {
		t.Fatal(err)
	}
	host := newHostSpace(0)
	e := &env{fs: osEnv.fs, openData: func(path string, create bool) (dataFile, error) {
		d, err := openOSDataFile(path, create)
		if err != nil {
			return nil, err
		}
		return &hostLimitData{dataFile: d, h: host}, nil
	}}
	p, err := open(dir, quietOpts(), e)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, host
}

// TestSpareSetLeavesOutFreshFills: a commit cut while a write fills a
// fresh block (not a spare) must not persist that block as a spare. The
// spare set is persisted with the blocks being filled from spares (their
// reservations come back after a crash), and only those: the fresh block's
// map entry commits later in a batch that does not rewrite the spare chunk,
// which left "spare blocks are owned by map entries" on disk (TestModel
// failed so after a crash, when a background commit landed mid-write).
func TestSpareSetLeavesOutFreshFills(t *testing.T) {
	p, _ := newHostLimitedPool(t, 64)
	v := mustVolume(t, p, "v", 32*bs4k)
	if err := v.WriteZeroes(0, 4*bs4k, false); err != nil { // 4 reservations, 4 spares
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	// A write to unprovisioned block 10 is planned: a fresh block, in flight.
	plans, wait, err := v.planWrite(10*bs4k, bs4k)
	if err == errRaiseZero { // a new pool's first blocks above the zero mark
		if err := p.commit(); err != nil {
			t.Fatal(err)
		}
		plans, wait, err = v.planWrite(10*bs4k, bs4k)
	}
	if err != nil || wait != nil {
		t.Fatalf("plan: %v %v", err, wait)
	}
	if plans[0].f == nil || plans[0].f.spare {
		t.Fatalf("block 10 should take a fresh block, got %+v", plans[0])
	}
	// Meanwhile a write into the provisioned range takes a spare (its
	// chunk of the spare set is rewritten) and a commit cuts.
	if err := v.WriteAt([][]byte{pattern(bs4k, 1)}, 0); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.doWrite(plans, [][]byte{pattern(bs4k, 2)}, 10*bs4k, bs4k); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(nil); err != nil {
		t.Fatal(err)
	}
}

// TestReserveDiscardCommitsItsSpares: a discard in reserve mode reserves
// again each block it releases, and the released block becomes the spare
// for that reservation. The commit that makes the discard durable must
// record those spares too: a crash after it, before the release phase
// made them spares in memory (and the next commit recorded them), left a
// committed state with more reservations than spares. Reopened on a full
// host, the pool could not back them (fresh free blocks need new host
// space; the released blocks, host-allocated, were not picked), and Check
// reported it (TestModelSnapshotsCrashPoints seeds 1039, 2019, 2095).
func TestReserveDiscardCommitsItsSpares(t *testing.T) {
	m := newMachine()
	m.host = newHostSpace(0)
	const dir = "/pool"
	if err := create(dir, CreateOptions{Size: 64 * bs4k, BlockSize: bs4k}, m.env()); err != nil {
		t.Fatal(err)
	}
	p, err := open(dir, quietOpts(), m.env())
	if err != nil {
		t.Fatal(err)
	}
	w := mustVolume(t, p, "w", 8*bs4k)
	v := mustVolume(t, p, "v", 16*bs4k)
	// w's block comes first in the pool; v's 8 blocks after it.
	if err := w.WriteAt([][]byte{pattern(bs4k, 1)}, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt([][]byte{pattern(8*bs4k, 2)}, 0); err != nil {
		t.Fatal(err)
	}
	// Free w's block: punched, a hole on the host, the first free block
	// a reopened pool would pick for a new spare.
	if err := w.Discard(0, bs4k); err != nil {
		t.Fatal(err)
	}
	if err := p.commit(); err != nil {
		t.Fatal(err)
	}
	if err := p.SetReserveMode("v", true); err != nil { // 8 spares
		t.Fatal(err)
	}
	if err := p.commit(); err != nil {
		t.Fatal(err)
	}
	m.host.setLimit(m.host.used()) // the host is full from now on
	if err := v.Discard(0, 2*bs4k); err != nil {
		t.Fatal(err)
	}
	// The release phase waits for requests in flight: one held here keeps
	// the released blocks from becoming spares in memory before the crash.
	p.ioGate.RLock()
	if err := p.Flush(); err != nil {
		p.ioGate.RUnlock()
		t.Fatal(err)
	}
	crashed := m.crash(rand.New(rand.NewPCG(1, 2)))
	p.ioGate.RUnlock()
	p.abandon()

	q, err := open(dir, quietOpts(), crashed.env())
	if err != nil {
		t.Fatal(err)
	}
	defer q.abandon()
	if err := q.Check(nil); err != nil {
		t.Fatal(err)
	}
	st := q.Status()
	if st.Pool.ReservedUnbackedBytes != 0 {
		t.Fatalf("%d bytes of reservations unbacked after the crash", st.Pool.ReservedUnbackedBytes)
	}
	if want := uint64(10 * bs4k); st.Pool.ReservedBytes != want {
		t.Fatalf("reserved %d bytes after the crash, want %d (reserve mode over 6 written blocks of 16)", st.Pool.ReservedBytes, want)
	}
	// Every promised block of v can be written on the full host.
	vq, err := q.Volume("v")
	if err != nil {
		t.Fatal(err)
	}
	for b := int64(0); b < 16; b++ {
		if err := vq.WriteAt([][]byte{pattern(bs4k, byte(b))}, b*bs4k); err != nil {
			t.Fatalf("promised write of block %d on the full host: %v", b, err)
		}
	}
}
