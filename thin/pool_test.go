package thin

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/pebblemeta"
)

var _ blockdev.Storage = (*Volume)(nil)

const kib = 1024

func quietOpts() OpenOptions {
	return OpenOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), FlushInterval: -1}
}

// newPool creates and opens a pool of blocks 4 KiB blocks on real files.
func newPool(t testing.TB, blocks uint64, co CreateOptions) (*Pool, string) {
	t.Helper()
	return newTunedPool(t, blocks, co, nil)
}

// newTunedPool is newPool with the internal limits tune (nil: defaults).
func newTunedPool(t testing.TB, blocks uint64, co CreateOptions, tune *tuning) (*Pool, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pool")
	if co.BlockSize == 0 {
		co.BlockSize = 4 * kib
	}
	co.Size = blocks * uint64(co.BlockSize)
	if err := Create(dir, co); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.tuning = tune
	p, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, dir
}

// settle waits until the blocks the last commit freed are reusable: a FLUSH does not wait for
// that (see releaseBlocks).
func settle(p *Pool) {
	p.flushMu.Lock()
	p.awaitReleaseLocked()
	p.flushMu.Unlock()
}

func mustVolume(t testing.TB, p *Pool, name string, size uint64) *Volume {
	t.Helper()
	if err := p.CreateVolume(name, size); err != nil {
		t.Fatal(err)
	}
	v, err := p.Volume(name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func read(t testing.TB, v *Volume, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	for i := range b {
		b[i] = 0xee // must be overwritten
	}
	if err := v.ReadAt([][]byte{b}, off); err != nil {
		t.Fatalf("read %d+%d: %v", off, n, err)
	}
	return b
}

func write(t testing.TB, v *Volume, off int64, b []byte) {
	t.Helper()
	if err := v.WriteAt([][]byte{b}, off); err != nil {
		t.Fatalf("write %d+%d: %v", off, len(b), err)
	}
}

// checkAccounting asserts the space identity and that Check is clean.
func checkAccounting(t testing.TB, p *Pool) Status {
	t.Helper()
	s := p.Status()
	if s.Pool.AllocatedBytes+s.Pool.ReservedBytes+s.Pool.FreeBytes != s.Pool.SizeBytes {
		t.Fatalf("allocated+reserved+free != size: %+v", s.Pool)
	}
	if err := p.Check(nil); err != nil {
		t.Fatalf("check: %v", err)
	}
	return p.Status() // after Check's commit: nothing releasing
}

// proceeds waits for a queued write's result on done, failing the test
// with stuck when none comes within 5 s, or on an error.
func proceeds(t *testing.T, done <-chan error, stuck string) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal(stuck)
	}
}

func TestCreateOpenReadWrite(t *testing.T) {
	p, dir := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "vol", 1<<30) // larger than the pool: thin
	if !bytes.Equal(read(t, v, 0, 8*kib), make([]byte, 8*kib)) {
		t.Fatal("unmapped read is not zeros")
	}
	data := pattern(6*kib, 1) // crosses a block boundary, partial at both ends
	write(t, v, 3*kib, data)
	got := read(t, v, 0, 12*kib)
	want := make([]byte, 12*kib)
	copy(want[3*kib:], data)
	if !bytes.Equal(got, want) {
		t.Fatal("read after partial writes to new blocks differs")
	}
	s := checkAccounting(t, p)
	if s.Volumes[0].MappedBytes != 12*kib || s.Pool.AllocatedBytes != 12*kib {
		t.Fatalf("status after 3 blocks: %+v", s)
	}
	// Scatter-gather: split buffers of odd sizes.
	a, b, c := make([]byte, 512), make([]byte, 5*512), make([]byte, 2*512)
	if err := v.ReadAt([][]byte{a, b, c}, 3*kib); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(append(append(a, b...), c...), data[:4*kib]) {
		t.Fatal("scatter read differs")
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p2, err := Open(dir, quietOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	v2, err := p2.Volume("vol")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, v2, 0, 12*kib), want) {
		t.Fatal("data differs after reopen")
	}
	checkAccounting(t, p2)
}

func TestOverwriteInPlaceTakesNoSpace(t *testing.T) {
	p, _ := newPool(t, 8, CreateOptions{})
	v := mustVolume(t, p, "v", 1<<20)
	write(t, v, 0, pattern(4*kib, 1))
	before := p.Status().Pool.AllocatedBytes
	write(t, v, 512, pattern(1024, 2))
	if p.Status().Pool.AllocatedBytes != before {
		t.Fatal("overwrite allocated")
	}
	want := pattern(4*kib, 1)
	copy(want[512:], pattern(1024, 2))
	if !bytes.Equal(read(t, v, 0, 4*kib), want) {
		t.Fatal("overwrite result differs")
	}
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	// Not a pool: clear error, nothing created.
	if _, err := Open(dir, quietOpts()); !errors.Is(err, ErrNotPool) {
		t.Fatalf("open empty dir: %v", err)
	}
	if _, err := Open(filepath.Join(dir, "nope"), quietOpts()); !errors.Is(err, ErrNotPool) {
		t.Fatalf("open missing dir: %v", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("open of a non-pool created files: %v", ents)
	}
	for _, co := range []CreateOptions{
		{Size: 0}, {Size: 1000}, {Size: 1 << 20, BlockSize: 3000}, {Size: 1 << 20, BlockSize: 1024},
		{Size: 1 << 20, LowWater: 2}, {Size: 1 << 20, NoSpace: 7},
	} {
		if err := Create(filepath.Join(dir, "p"), co); !errors.Is(err, ErrInvalid) {
			t.Errorf("create %+v: %v", co, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("invalid create left files: %v", ents)
	}
	p, pdir := newPool(t, 16, CreateOptions{})
	if err := Create(pdir, CreateOptions{Size: 1 << 20}); !errors.Is(err, ErrPoolExists) {
		t.Fatalf("create over pool: %v", err)
	}
	if _, err := Open(pdir, quietOpts()); !errors.Is(err, ErrLocked) {
		t.Fatalf("second opener: %v", err)
	}
	for _, name := range []string{"", "a/b", strings.Repeat("x", 200), "..", "sp ace"} {
		if err := p.CreateVolume(name, 1<<20); !errors.Is(err, ErrInvalid) {
			t.Errorf("volume name %q: %v", name, err)
		}
	}
	if err := p.CreateVolume("v", 1000); !errors.Is(err, ErrInvalid) {
		t.Errorf("volume size 1000: %v", err)
	}
	if len(p.Volumes()) != 0 {
		t.Fatal("bad volume requests created volumes")
	}
	v := mustVolume(t, p, "v", 1<<20)
	if err := p.CreateVolume("v", 1<<20); !errors.Is(err, ErrVolumeExists) {
		t.Fatalf("duplicate volume: %v", err)
	}
	if err := v.WriteAt([][]byte{make([]byte, 512)}, 1<<20); !errors.Is(err, ErrInvalid) {
		t.Fatalf("write past end: %v", err)
	}
	if err := v.ReadAt([][]byte{make([]byte, 100)}, 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("unaligned read: %v", err)
	}
	if err := v.Discard(-512, 512); !errors.Is(err, ErrInvalid) {
		t.Fatalf("negative discard: %v", err)
	}
	if err := p.ResizeVolume("v", 512); !errors.Is(err, ErrInvalid) {
		t.Fatalf("shrink: %v", err)
	}
	if err := p.Grow(8 * 4 * kib); !errors.Is(err, ErrInvalid) {
		t.Fatalf("pool shrink: %v", err)
	}
	p.Close()

	// Data file of the wrong size.
	if err := os.Truncate(filepath.Join(pdir, dataName), 8*4*kib); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(pdir, quietOpts()); !errors.Is(err, ErrDataSize) {
		t.Fatalf("short data file: %v", err)
	}
	if err := os.Truncate(filepath.Join(pdir, dataName), 16*4*kib); err != nil {
		t.Fatal(err)
	}
	// Newer format.
	st, err := pebblemeta.Open(filepath.Join(pdir, metaName), pebblemeta.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st.SetFormatForTest(pebblemeta.FormatVersion + 1)
	st.Close()
	if _, err := Open(pdir, quietOpts()); !errors.Is(err, ErrNewerFormat) {
		t.Fatalf("newer format: %v", err)
	}
}

func TestDiscardAndWriteZeroesUnmap(t *testing.T) {
	p, _ := newPool(t, 16, CreateOptions{})
	v := mustVolume(t, p, "v", 64*kib)
	write(t, v, 0, pattern(16*kib, 3))
	// Discard from the middle of block 0 to the middle of block 3: blocks
	// 1 and 2 are released, the partial ends zeroed.
	if err := v.Discard(2*kib, 12*kib); err != nil {
		t.Fatal(err)
	}
	want := pattern(16*kib, 3)
	clear(want[2*kib : 14*kib])
	if !bytes.Equal(read(t, v, 0, 16*kib), want) {
		t.Fatal("discarded range does not read as zeros")
	}
	s := checkAccounting(t, p)
	if s.Volumes[0].MappedBytes != 8*kib || s.Pool.AllocatedBytes != 8*kib {
		t.Fatalf("after discard: %+v", s)
	}
	if err := v.WriteZeroes(0, 16*kib, true); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, v, 0, 16*kib), make([]byte, 16*kib)) {
		t.Fatal("write-zeroes+unmap range not zero")
	}
	s = checkAccounting(t, p)
	if s.Volumes[0].MappedBytes != 0 || s.Pool.AllocatedBytes != 0 || s.Pool.FreeBytes != 64*kib {
		t.Fatalf("after unmap all: %+v", s)
	}
}

func TestProvisioning(t *testing.T) {
	p, _ := newPool(t, 8, CreateOptions{})
	a := mustVolume(t, p, "a", 1<<20)
	b := mustVolume(t, p, "b", 1<<20)
	write(t, a, 0, pattern(4*kib, 9))
	// Provision 4 blocks of a (one already mapped): 3 reservations.
	if err := a.WriteZeroes(0, 16*kib, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, a, 0, 16*kib), make([]byte, 16*kib)) {
		t.Fatal("provisioned range does not read as zeros")
	}
	s := checkAccounting(t, p)
	if s.Pool.ReservedBytes != 12*kib || s.Volumes[0].ProvisionedBytes != 16*kib || s.Volumes[0].ReservedBytes != 12*kib {
		t.Fatalf("after provisioning: %+v", s)
	}
	// Fill the pool from b: 4 blocks left, then nothing.
	for i := range 4 {
		write(t, b, int64(i)*4*kib, pattern(4*kib, byte(i)))
	}
	if err := b.WriteAt([][]byte{make([]byte, 512)}, 64*kib); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("write to a full pool: %v", err)
	}
	// All-or-nothing: provisioning 2 more blocks fails and changes nothing.
	if err := a.WriteZeroes(32*kib, 8*kib, false); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("provisioning beyond space: %v", err)
	}
	s2 := checkAccounting(t, p)
	if s2.Volumes[0] != s.Volumes[0] {
		t.Fatalf("failed provisioning changed the volume: %+v", s2.Volumes[0])
	}
	// The promise: writes to the provisioned range succeed on a full pool.
	write(t, a, 4*kib, pattern(12*kib, 5))
	s = checkAccounting(t, p)
	if s.Pool.FreeBytes != 0 || s.Pool.ReservedBytes != 0 || s.Volumes[0].MappedBytes != 16*kib || s.Volumes[0].ProvisionedBytes != 16*kib {
		t.Fatalf("after writing provisioned range: %+v", s)
	}
	// Discard clears provisioned state and gives the space back.
	if err := a.Discard(0, 16*kib); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	s = checkAccounting(t, p)
	if s.Volumes[0].ProvisionedBytes != 0 || s.Pool.FreeBytes != 16*kib {
		t.Fatalf("after discard: %+v", s)
	}
}

func TestFreedBlockReusedOnlyAfterCommit(t *testing.T) {
	p, _ := newPool(t, 2, CreateOptions{})
	a := mustVolume(t, p, "a", 1<<20)
	b := mustVolume(t, p, "b", 1<<20)
	write(t, a, 0, pattern(8*kib, 1))
	p.Flush()
	if err := a.Discard(0, 4*kib); err != nil {
		t.Fatal(err)
	}
	st := p.Status()
	if st.Pool.ReleasingBytes != 4*kib || st.Pool.FreeBytes != 0 {
		t.Fatalf("discarded block should be releasing, not free: %+v", st.Pool)
	}
	// The write finds no free block; the pool commits the release and
	// then hands the block out.
	write(t, b, 0, pattern(4*kib, 2))
	if p.Status().Pool.ReleasingBytes != 0 {
		t.Fatal("release not committed")
	}
	checkAccounting(t, p)
}

func TestQueueModeWaitsForGrow(t *testing.T) {
	p, _ := newPool(t, 1, CreateOptions{NoSpace: NoSpaceQueue, NoSpaceTimeout: 10 * time.Second})
	v := mustVolume(t, p, "v", 1<<20)
	write(t, v, 0, pattern(4*kib, 1))
	done := make(chan error, 1)
	go func() { done <- v.WriteAt([][]byte{pattern(4*kib, 2)}, 4*kib) }()
	// Another request is not held up meanwhile.
	time.Sleep(50 * time.Millisecond)
	write(t, v, 0, pattern(4*kib, 3))
	_ = read(t, v, 0, 4*kib)
	select {
	case err := <-done:
		t.Fatalf("queued write finished before space appeared: %v", err)
	default:
	}
	if err := p.Grow(2 * 4 * kib); err != nil {
		t.Fatal(err)
	}
	proceeds(t, done, "queued write did not proceed after grow")
	if !bytes.Equal(read(t, v, 4*kib, 4*kib), pattern(4*kib, 2)) {
		t.Fatal("queued write data wrong")
	}
	checkAccounting(t, p)
}

// TestPauseModeWaitsAndTellsWatchers: with the pause policy a write
// without space waits past any timeout, watchers hear OutOfSpace (to
// pause the VM) and SpaceAvailable once space appears, and the write
// then completes.
func TestPauseModeWaitsAndTellsWatchers(t *testing.T) {
	p, _ := newPool(t, 2, CreateOptions{NoSpace: NoSpacePause, NoSpaceTimeout: time.Millisecond, LowWater: 0.5})
	evs := make(chan Event, 16)
	defer p.Watch(func(e Event) { evs <- e })()
	v := mustVolume(t, p, "v", 1<<20)
	<-evs // created
	write(t, v, 0, pattern(8*kib, 1))
	next := func(want EventType) Event {
		t.Helper()
		select {
		case e := <-evs:
			if e.Type != want {
				t.Fatalf("event %v, want %v", e, want)
			}
			return e
		case <-time.After(10 * time.Second):
			t.Fatalf("no %v event", want)
		}
		return Event{}
	}
	if e := next(LowWater); e.Free != 0 {
		t.Fatalf("low water event %+v", e)
	}
	done := make(chan error, 1)
	go func() { done <- v.WriteAt([][]byte{pattern(4*kib, 2)}, 8*kib) }()
	if e := next(OutOfSpace); e.Volume != "v" {
		t.Fatalf("out of space event %+v", e)
	}
	time.Sleep(100 * time.Millisecond) // far beyond the 1ms queue timeout
	select {
	case err := <-done:
		t.Fatalf("paused write finished before space appeared: %v", err)
	default:
	}
	if err := p.Grow(8 * 4 * kib); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	seen := map[EventType]bool{}
	for len(seen) < 3 {
		seen[(<-evs).Type] = true
	}
	if !seen[SpaceAvailable] || !seen[PoolGrown] || !seen[AboveLowWater] {
		t.Fatalf("events after grow: %v", seen)
	}
	if got := p.Status().Pool.NoSpace; got != "pause" {
		t.Fatalf("policy shown as %q", got)
	}
	if pol, err := ParseNoSpacePolicy("pause"); err != nil || pol != NoSpacePause {
		t.Fatal(pol, err)
	}
}

func TestQueueModeTimesOut(t *testing.T) {
	p, _ := newPool(t, 1, CreateOptions{NoSpace: NoSpaceQueue, NoSpaceTimeout: 100 * time.Millisecond})
	v := mustVolume(t, p, "v", 1<<20)
	write(t, v, 0, pattern(4*kib, 1))
	start := time.Now()
	err := v.WriteAt([][]byte{pattern(4*kib, 2)}, 4*kib)
	if !errors.Is(err, ErrNoSpace) || time.Since(start) < 100*time.Millisecond {
		t.Fatalf("queued write: %v after %v", err, time.Since(start))
	}
}

func TestVolumeLifecycleAndEvents(t *testing.T) {
	p, _ := newPool(t, 16, CreateOptions{})
	var mu sync.Mutex
	var evs []Event
	stop := p.Watch(func(e Event) { mu.Lock(); evs = append(evs, e); mu.Unlock() })
	v := mustVolume(t, p, "v", 1<<20)
	write(t, v, 0, pattern(8*kib, 1))
	if err := p.ResizeVolume("v", 2<<20); err != nil {
		t.Fatal(err)
	}
	if v.Size() != 2<<20 {
		t.Fatal("handle did not see resize")
	}
	if err := p.Grow(32 * 4 * kib); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteVolume("v"); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt([][]byte{make([]byte, 512)}, 0); !errors.Is(err, ErrVolumeDeleted) {
		t.Fatalf("write to deleted volume: %v", err)
	}
	s := checkAccounting(t, p)
	if s.Pool.AllocatedBytes != 0 || s.Pool.SizeBytes != 32*4*kib || len(s.Volumes) != 0 {
		t.Fatalf("after delete: %+v", s)
	}
	stop()
	p.CreateVolume("w", 512)
	mu.Lock()
	defer mu.Unlock()
	want := []Event{{Type: VolumeCreated, Volume: "v", Size: 1 << 20}, {Type: VolumeResized, Volume: "v", Size: 2 << 20},
		{Type: PoolGrown, Size: 32 * 4 * kib}, {Type: VolumeDeleted, Volume: "v"}}
	if len(evs) != len(want) {
		t.Fatalf("events %v", evs)
	}
	for i := range want {
		if evs[i] != want[i] {
			t.Fatalf("event %d: %+v want %+v", i, evs[i], want[i])
		}
	}
	js, _ := json.Marshal(p.Status())
	for _, f := range []string{`"size_bytes"`, `"allocated_bytes"`, `"reserved_bytes"`, `"free_bytes"`, `"mapped_bytes"`, `"provisioned_bytes"`} {
		if !bytes.Contains(js, []byte(f)) {
			t.Fatalf("status JSON lacks %s: %s", f, js)
		}
	}
}

func TestLowWaterLoggedOncePerCrossing(t *testing.T) {
	var buf bytes.Buffer
	var mu sync.Mutex
	dir := filepath.Join(t.TempDir(), "p")
	if err := Create(dir, CreateOptions{Size: 10 * 4 * kib, BlockSize: 4 * kib, LowWater: 0.5}); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.Logger = slog.New(slog.NewTextHandler(&lockedWriter{w: &buf, mu: &mu}, nil))
	p, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	v := mustVolume(t, p, "v", 1<<20)
	for i := range 8 {
		write(t, v, int64(i)*4*kib, pattern(4*kib, 1))
	}
	if !p.Status().Pool.BelowLowWater {
		t.Fatal("status does not show low water")
	}
	v.Discard(0, 32*kib)
	p.Flush()
	for i := range 8 {
		write(t, v, int64(i)*4*kib, pattern(4*kib, 1))
	}
	mu.Lock()
	n := strings.Count(buf.String(), "fell below the low-water mark")
	mu.Unlock()
	if n != 2 {
		t.Fatalf("low-water warning logged %d times, want 2 (two crossings):\n%s", n, buf.String())
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func TestConcurrentWriters(t *testing.T) {
	p, _ := newPool(t, 512, CreateOptions{})
	v := mustVolume(t, p, "v", 4<<20)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 64 {
				// Every goroutine writes the same blocks (racing first
				// writes) at its own sector offset.
				blk := int64(i % 32)
				off := blk*4*kib + int64(g)*512
				if err := v.WriteAt([][]byte{pattern(512, byte(g))}, off); err != nil {
					t.Error(err)
					return
				}
				if i%16 == 0 {
					v.Flush()
				}
			}
		}()
	}
	wg.Wait()
	for blk := range int64(32) {
		got := read(t, v, blk*4*kib, 4*kib)
		for g := range 8 {
			if !bytes.Equal(got[g*512:(g+1)*512], pattern(512, byte(g))) {
				t.Fatalf("block %d sector %d lost a racing write", blk, g)
			}
		}
	}
	s := checkAccounting(t, p)
	if s.Volumes[0].MappedBytes != 32*4*kib {
		t.Fatalf("mapped %d, want 32 blocks", s.Volumes[0].MappedBytes)
	}
}

// TestUnalignedVolumeEnd: a volume whose size is not a multiple of the
// block size; its last block counts as whole up to the volume's end, and
// growing the volume exposes zeros, not stale bytes.
func TestUnalignedVolumeEnd(t *testing.T) {
	p, _ := newPool(t, 8, CreateOptions{})
	v := mustVolume(t, p, "v", 10*kib) // blocks 0, 1 and half of 2
	write(t, v, 8*kib, pattern(2*kib, 1))
	if s := checkAccounting(t, p); s.Volumes[0].MappedBytes != 4*kib {
		t.Fatalf("mapped %d", s.Volumes[0].MappedBytes)
	}
	if err := v.Discard(8*kib, 2*kib); err != nil {
		t.Fatal(err)
	}
	if s := checkAccounting(t, p); s.Volumes[0].MappedBytes != 0 {
		t.Fatalf("discard to the volume's end did not release the last block: %+v", s.Volumes[0])
	}
	write(t, v, 8*kib, pattern(2*kib, 2))
	if err := v.WriteZeroes(8*kib, 2*kib, false); err != nil {
		t.Fatal(err)
	}
	if err := p.ResizeVolume("v", 12*kib); err != nil {
		t.Fatal(err)
	}
	if got := read(t, v, 8*kib, 4*kib); !bytes.Equal(got, make([]byte, 4*kib)) {
		t.Fatal("grown tail or provisioned range not zero")
	}
	write(t, v, 10*kib, pattern(2*kib, 3))
	want := append(make([]byte, 2*kib), pattern(2*kib, 3)...)
	if got := read(t, v, 8*kib, 4*kib); !bytes.Equal(got, want) {
		t.Fatal("write to the grown tail reads back wrong")
	}
	if s := checkAccounting(t, p); s.Volumes[0].MappedBytes != 4*kib || s.Volumes[0].ProvisionedBytes != 4*kib {
		t.Fatalf("after growth: %+v", s.Volumes[0])
	}
}
