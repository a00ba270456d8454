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
