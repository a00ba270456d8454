package thin

import (
	"bytes"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestBitmapRuns(t *testing.T) {
	b := newBitmap(300)
	for _, r := range [][2]uint64{{0, 3}, {62, 70}, {200, 1}, {299, 1}} {
		b.setRun(r[0], r[1])
	}
	var got [][2]uint64
	b.runs(func(first, n uint64) bool { got = append(got, [2]uint64{first, n}); return true })
	want := [][2]uint64{{0, 3}, {62, 70}, {200, 1}, {299, 1}}
	if len(got) != len(want) {
		t.Fatalf("runs = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("runs = %v, want %v", got, want)
		}
	}
	n := 0
	b.runs(func(uint64, uint64) bool { n++; return false })
	if n != 1 {
		t.Fatalf("runs went on after false: %d calls", n)
	}
}

// dataBytes is the space the pool's data file takes on the host.
func dataBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, dataName), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestFreedBlocksArePunched: discarded blocks leave the host file once
// their release is durable, and a partial write to a reused block reads
// zeros around it, never the previous owner's bytes.
func TestFreedBlocksArePunched(t *testing.T) {
	tune := defaultTuning()
	tune.punchChunk = 5 // long runs go in pieces
	const blocks = 64
	p, dir := newTunedPool(t, blocks, CreateOptions{BlockSize: 64 * kib}, &tune)
	a := mustVolume(t, p, "a", blocks*64*kib)
	old := pattern(blocks*64*kib, 9)
	write(t, a, 0, old)
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	full := dataBytes(t, dir)
	if full < blocks*64*kib {
		t.Fatalf("data file takes %d bytes after writing %d", full, blocks*64*kib)
	}
	if err := a.Discard(0, blocks*64*kib); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	settle(p)
	if got := dataBytes(t, dir); got > full/4 {
		t.Fatalf("data file takes %d bytes after every block was discarded (was %d): not punched", got, full)
	}
	if got := p.Status().Pool.DataHostBytes; got != uint64(dataBytes(t, dir)) {
		t.Fatalf("status reports %d bytes of data file on the host, stat says %d", got, dataBytes(t, dir))
	}
	p.mu.Lock()
	zeroed := p.zeroed.count
	p.mu.Unlock()
	if zeroed != blocks {
		t.Fatalf("%d blocks known zero after the release, want %d", zeroed, blocks)
	}
	// Every block is reused now (the pool is full again afterwards).
	b := mustVolume(t, p, "b", blocks*64*kib)
	small := pattern(512, 3)
	for i := int64(0); i < blocks; i++ {
		write(t, b, i*64*kib+4096, small)
	}
	want := make([]byte, 64*kib)
	copy(want[4096:], small)
	for i := int64(0); i < blocks; i++ {
		if got := read(t, b, i*64*kib, 64*kib); !bytes.Equal(got, want) {
			t.Fatalf("block %d of the new volume does not read as its one write plus zeros", i)
		}
	}
	p.mu.Lock()
	zeroed = p.zeroed.count
	p.mu.Unlock()
	if zeroed != 0 {
		t.Fatalf("%d blocks still marked zero after all were reused", zeroed)
	}
	checkAccounting(t, p)
}

// TestZeroMarkRaisedAhead: allocation halfway to the never-written mark
// has a background commit raise it, so that no write waits for a commit
// to pass it.
func TestZeroMarkRaisedAhead(t *testing.T) {
	tune := defaultTuning()
	tune.zeroStep = 64
	p, _ := newTunedPool(t, 1000, CreateOptions{}, &tune)
	v := mustVolume(t, p, "v", 1000*4*kib)
	buf := pattern(4*kib, 1)
	write(t, v, 0, buf) // a new pool's first write raises the mark itself
	p.mu.Lock()
	start := p.zeroDurable
	p.mu.Unlock()
	if start < tune.zeroStep {
		t.Fatalf("zero mark %d after the first write", start)
	}
	// Up to just below the mark, past its halfway point.
	for i := int64(1); i < int64(start)-1; i++ {
		write(t, v, i*4*kib, buf)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		p.mu.Lock()
		durable := p.zeroDurable
		p.mu.Unlock()
		if durable > start {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("zero mark still %d (was %d) without a flush: not raised ahead", durable, start)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// blockingData holds reads of one offset until released, so that a test
// can keep a request in flight across a commit.
type blockingData struct {
	dataFile
	off     atomic.Int64 // -1: block nothing
	reached chan struct{}
	release chan struct{}
}

func (d *blockingData) ReadAt(p []byte, off int64) (int, error) {
	if off == d.off.Load() {
		d.off.Store(-1)
		close(d.reached)
		<-d.release
	}
	return d.dataFile.ReadAt(p, off)
}

// TestPunchWaitsForReadsInFlight: a block released while a read of other
// bytes of it is still in flight (the volume's own copy-on-write dropped
// it) is not punched under that read, which must return the old bytes.
// openWrapped creates and opens a pool of 8 blocks of bs on a crashable machine, its data file
// wrapped by wrap once the pool opens it.
func openWrapped(t *testing.T, bs int64, wrap func(dataFile) dataFile) *Pool {
	t.Helper()
	return openWrappedTuned(t, bs, 8, nil, wrap)
}

// openWrappedTuned is openWrapped for a pool of the given size in blocks and tuning.
func openWrappedTuned(t *testing.T, bs int64, blocks int64, tune *tuning, wrap func(dataFile) dataFile) *Pool {
	t.Helper()
	e := newMachine().env()
	openData := e.openData
	e.openData = func(path string, create bool) (dataFile, error) {
		d, err := openData(path, create)
		if err == nil && !create {
			d = wrap(d)
		}
		return d, err
	}
	if err := create("/pool", CreateOptions{Size: uint64(blocks * bs), BlockSize: uint32(bs)}, e); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.tuning = tune
	p, err := open("/pool", o, e)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPunchWaitsForReadsInFlight(t *testing.T) {
	const bs = 64 * kib
	var bd *blockingData
	p := openWrapped(t, bs, func(d dataFile) dataFile {
		bd = &blockingData{dataFile: d, reached: make(chan struct{}), release: make(chan struct{})}
		bd.off.Store(-1)
		return bd
	})
	defer p.Close()
	v := mustVolume(t, p, "v", 4*bs)
	old := pattern(bs, 5)
	write(t, v, 0, old)
	if err := p.CreateSnapshot("v", "c", true); err != nil {
		t.Fatal(err)
	}
	c, err := p.Volume("c")
	if err != nil {
		t.Fatal(err)
	}
	write(t, c, 0, pattern(bs, 6)) // the clone no longer reads the shared block
	p.mu.Lock()
	shared, _, err := p.resolveLocked(p.vols["v"].rec.Layer, 0)
	p.mu.Unlock()
	if err != nil || !shared.Mapped() {
		t.Fatalf("shared block: %+v %v", shared, err)
	}
	// A read of the first 4 KiB, held in flight ...
	bd.off.Store(int64(shared.PBlock) * bs)
	got := make([]byte, 4*kib)
	readDone := make(chan error, 1)
	go func() { readDone <- v.ReadAt([][]byte{got}, 0) }()
	<-bd.reached
	// ... while a write to the same block's last 4 KiB copies it, and the
	// release of the shared block commits.
	write(t, v, bs-4*kib, pattern(4*kib, 7))
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush() }()
	select {
	case err := <-flushed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(300 * time.Millisecond):
	}
	close(bd.release)
	if err := <-readDone; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, old[:4*kib]) {
		t.Fatal("a read in flight across the release of its block returned other bytes (punched under it)")
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
}

// TestPunchBudget: when punching runs out of time, the blocks left are
// released unpunched (reused with padding), never lost or marked zero.
func TestPunchBudget(t *testing.T) {
	tune := defaultTuning()
	tune.punchBudget = -time.Second // nothing gets punched
	const blocks = 16
	p, dir := newTunedPool(t, blocks, CreateOptions{BlockSize: 64 * kib}, &tune)
	a := mustVolume(t, p, "a", blocks*64*kib)
	write(t, a, 0, pattern(blocks*64*kib, 1))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	full := dataBytes(t, dir)
	for i := int64(0); i < blocks; i += 2 { // scattered runs
		if err := a.Discard(i*64*kib, 64*kib); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	settle(p)
	p.mu.Lock()
	zeroed := p.zeroed.count
	p.mu.Unlock()
	if zeroed != 0 || dataBytes(t, dir) != full {
		t.Fatalf("with no time to punch: %d blocks marked zero, data file %d bytes (was %d)", zeroed, dataBytes(t, dir), full)
	}
	b := mustVolume(t, p, "b", blocks*64*kib)
	for i := int64(0); i < blocks/2; i++ {
		write(t, b, i*64*kib+512, pattern(512, 2))
	}
	want := make([]byte, 64*kib)
	copy(want[512:], pattern(512, 2))
	for i := int64(0); i < blocks/2; i++ {
		if !bytes.Equal(read(t, b, i*64*kib, 64*kib), want) {
			t.Fatalf("reused unpunched block %d shows more than its one write", i)
		}
	}
	checkAccounting(t, p)
}

// TestPunchCarriesOver: blocks a release could not punch within its budget are punched by a
// later pass, except those reused meanwhile; the host gets their space back, and they read
// as zeros when reused.
func TestPunchCarriesOver(t *testing.T) {
	tune := defaultTuning()
	tune.punchBudget = -time.Second // releases punch nothing; the test runs the later pass
	const blocks, bs = 32, 64 * kib
	p, dir := newTunedPool(t, blocks, CreateOptions{BlockSize: bs}, &tune)
	a := mustVolume(t, p, "a", blocks*bs)
	write(t, a, 0, pattern(blocks*bs, 1))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	full := dataBytes(t, dir)
	for i := int64(0); i < blocks; i += 2 { // scattered runs
		if err := a.Discard(i*bs, bs); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	settle(p)
	if got := dataBytes(t, dir); got != full {
		t.Fatalf("the release punched with no budget: data file %d bytes, was %d", got, full)
	}
	// Four freed blocks are reused before the later pass: it must leave them alone.
	b := mustVolume(t, p, "b", 4*bs)
	write(t, b, 0, pattern(4*bs, 2))
	if n := p.punchLater(time.Minute); n != blocks/2-4 {
		t.Fatalf("the later pass punched %d blocks, want the %d still free", n, blocks/2-4)
	}
	// The file system may add a block of its own (ext4's extent tree grows with the holes).
	if got, want := dataBytes(t, dir), full-(blocks/2-4)*bs; got < want || got > want+bs/2 {
		t.Fatalf("data file holds %d bytes on the host after the later pass, want %d", got, want)
	}
	if n := p.punchLater(time.Minute); n != 0 {
		t.Fatalf("a second pass punched %d blocks again", n)
	}
	if !bytes.Equal(read(t, b, 0, 4*bs), pattern(4*bs, 2)) {
		t.Fatal("a block reused before the later pass lost its data")
	}
	for i := int64(0); i < blocks; i++ {
		want := make([]byte, bs)
		if i%2 == 1 {
			want = pattern(blocks*bs, 1)[i*bs : (i+1)*bs]
		}
		if !bytes.Equal(read(t, a, i*bs, bs), want) {
			t.Fatalf("block %d of a reads wrong after the later pass", i)
		}
	}
	// A punched block reused by a partial write reads zeros around it.
	c := mustVolume(t, p, "c", 4*bs)
	write(t, c, 512, pattern(512, 3))
	want := make([]byte, bs)
	copy(want[512:], pattern(512, 3))
	if !bytes.Equal(read(t, c, 0, bs), want) {
		t.Fatal("a partial write to a block punched later shows more than its write")
	}
	checkAccounting(t, p)
}

// TestPunchLaterSkipsBlocksInUse: while a later pass punches a run, allocation hands out
// other blocks, never one being punched.
func TestPunchLaterSkipsBlocksInUse(t *testing.T) {
	tune := defaultTuning()
	tune.punchBudget = -time.Second
	tune.punchChunk = 2
	const blocks, bs = 16, 64 * kib
	var pb *punchBlocking
	p := openWrappedTuned(t, bs, blocks, &tune, func(d dataFile) dataFile {
		pb = &punchBlocking{dataFile: d, reached: make(chan struct{}), release: make(chan struct{})}
		return pb
	})
	defer p.Close()
	release := sync.OnceFunc(func() { close(pb.release) })
	defer release()
	v := mustVolume(t, p, "v", blocks*bs)
	write(t, v, 0, pattern(blocks*bs, 1)) // the whole pool
	if err := v.Discard(0, blocks/2*bs); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	settle(p)
	punched := make(chan uint64, 1)
	go func() { punched <- p.punchLater(time.Minute) }()
	<-pb.reached // one run of 2 blocks is being punched
	// The 6 other free blocks are all the pool can hand out now.
	write(t, v, 0, pattern(6*bs, 2))
	release()
	if n := <-punched; n != 2 {
		t.Fatalf("the later pass punched %d blocks, want the 2 it held (the rest were reused)", n)
	}
	if !bytes.Equal(read(t, v, 0, 6*bs), pattern(6*bs, 2)) {
		t.Fatal("data written while a later pass punched reads back different: a punch hit a reused block")
	}
	// The punched run is free again, and reads as zeros around a partial write.
	write(t, v, 6*bs+512, pattern(512, 3))
	want := make([]byte, bs)
	copy(want[512:], pattern(512, 3))
	if !bytes.Equal(read(t, v, 6*bs, bs), want) {
		t.Fatal("a partial write to a block punched later shows more than its write")
	}
	checkAccounting(t, p)
}

// punchBlocking holds the first punch until released.
type punchBlocking struct {
	dataFile
	once             sync.Once
	reached, release chan struct{}
}

func (d *punchBlocking) PunchHole(off, n int64) error {
	d.once.Do(func() {
		close(d.reached)
		<-d.release
	})
	return d.dataFile.PunchHole(off, n)
}

// TestFlushDoesNotWaitForPunching: a FLUSH returns once the release is durable; punching and
// making the blocks reusable go on behind it (they take up to a second after a large trim).
// Meanwhile the blocks count as releasing, and a write that needs them waits for them rather
// than failing.
func TestFlushDoesNotWaitForPunching(t *testing.T) {
	const bs = 64 * kib
	var pb *punchBlocking
	p := openWrapped(t, bs, func(d dataFile) dataFile {
		pb = &punchBlocking{dataFile: d, reached: make(chan struct{}), release: make(chan struct{})}
		return pb
	})
	defer p.Close()
	release := sync.OnceFunc(func() { close(pb.release) })
	defer release() // before Close, which waits for the release phase
	v := mustVolume(t, p, "v", 16*bs)
	write(t, v, 0, pattern(8*bs, 1)) // the whole pool
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.Discard(0, 4*bs); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- p.Flush() }()
	<-pb.reached // the release phase is punching
	select {
	case err := <-flushed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("FLUSH waited for the punching of the blocks it released")
	}
	if got := p.Status().Pool.ReleasingBytes; got != 4*bs {
		t.Fatalf("%d bytes releasing while their punch is held, want %d", got, 4*bs)
	}
	// A write that needs a freed block (the pool is otherwise full) waits for the release.
	wrote := make(chan error, 1)
	go func() { wrote <- v.WriteAt([][]byte{pattern(bs, 2)}, 8*bs) }()
	release()
	if err := <-wrote; err != nil {
		t.Fatalf("write needing a block being released: %v", err)
	}
	if got := read(t, v, 8*bs, bs); !bytes.Equal(got, pattern(bs, 2)) {
		t.Fatal("write into a released block reads back different")
	}
	if got := read(t, v, 0, 4*bs); !bytes.Equal(got, make([]byte, 4*bs)) {
		t.Fatal("discarded blocks do not read as zeros")
	}
	checkAccounting(t, p)
}
