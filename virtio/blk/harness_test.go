package blk_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"
	"golang.org/x/sys/unix"
)

var _ vhostuser.Device = (*blk.Device)(nil)

// fileStorage is a minimal file-backed blockdev.Storage for tests.
type fileStorage struct {
	f       *os.File
	size    atomic.Uint64
	flushes atomic.Int64
	fail    atomic.Bool // every operation fails
	noTrim  atomic.Bool // Discard and WriteZeroes are unsupported
}

func newFileStorage(t testing.TB, size int64) *fileStorage {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "disk.img"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	s := &fileStorage{f: f}
	s.size.Store(uint64(size))
	return s
}

var errInjected = errors.New("injected storage error")

func (s *fileStorage) Size() uint64 { return s.size.Load() }

func (s *fileStorage) ReadAt(bufs [][]byte, off int64) error {
	if s.fail.Load() {
		return errInjected
	}
	for _, b := range bufs {
		if _, err := s.f.ReadAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

func (s *fileStorage) WriteAt(bufs [][]byte, off int64) error {
	if s.fail.Load() {
		return errInjected
	}
	for _, b := range bufs {
		if _, err := s.f.WriteAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}

func (s *fileStorage) Flush() error {
	if s.fail.Load() {
		return errInjected
	}
	s.flushes.Add(1)
	return s.f.Sync()
}

func (s *fileStorage) Discard(off, length int64) error {
	if s.fail.Load() {
		return errInjected
	}
	if s.noTrim.Load() {
		return fmt.Errorf("discard: %w", errors.ErrUnsupported)
	}
	return unix.Fallocate(int(s.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (s *fileStorage) WriteZeroes(off, length int64, unmap bool) error {
	if s.fail.Load() {
		return errInjected
	}
	if s.noTrim.Load() {
		return fmt.Errorf("write zeroes: %w", errors.ErrUnsupported)
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if unmap {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	return unix.Fallocate(int(s.f.Fd()), mode, off, length)
}

// geomStorage adds a geometry to fileStorage.
type geomStorage struct {
	*fileStorage
	g blockdev.Geometry
}

func (g geomStorage) Geometry() blockdev.Geometry { return g.g }

const (
	diskSize = 64 << 20 // as QEMU's vhost-user-blk-test
	memBase  = 0x40000000
	memSize  = 32 << 20
	allFeat  = 1<<virtio.FeatureVersion1 | 1<<virtio.FeatureIndirectDesc | 1<<virtio.FeatureEventIdx
)

// harness is a device with one driver per queue.
type harness struct {
	dev     *blk.Device
	storage *fileStorage
	mem     *virtiotest.Memory
	drv     []*virtiotest.Driver
	mu      []sync.Mutex
}

func newHarness(t testing.TB, storage blockdev.Storage, opts blk.Options, ringSize uint16, features uint64) *harness {
	t.Helper()
	dev, err := blk.New(storage, opts)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{dev: dev, mem: virtiotest.NewMemory(memBase, memSize)}
	if fs, ok := storage.(*fileStorage); ok {
		h.storage = fs
	}
	if g, ok := storage.(geomStorage); ok {
		h.storage = g.fileStorage
	}
	n := dev.NumQueues()
	h.mu = make([]sync.Mutex, n)
	per := memSize / n
	for i := range n {
		m := &virtiotest.Memory{Base: memBase + uint64(i*per), Buf: h.mem.Buf[i*per : (i+1)*per]}
		d := virtiotest.NewDriver(m, ringSize, features)
		if err := d.WithEventfds(); err != nil {
			t.Fatal(err)
		}
		s := d.Setup(i)
		s.Mem = h.mem // the device sees all of guest memory
		if err := dev.StartQueue(s); err != nil {
			t.Fatal(err)
		}
		h.drv = append(h.drv, d)
	}
	t.Cleanup(func() {
		if err := dev.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		for i := range h.drv {
			dev.StopQueue(i)
			h.drv[i].Close()
		}
	})
	return h
}

func defaultHarness(t testing.TB) *harness {
	return newHarness(t, newFileStorage(t, diskSize), blk.Options{Serial: "thinblk-test"}, 128, allFeat)
}

// header builds a request header.
func header(typ uint32, sector uint64) []byte {
	b := make([]byte, blk.RequestHeaderSize)
	le.PutUint32(b[0:], typ)
	le.PutUint32(b[4:], 1) // ioprio, ignored
	le.PutUint64(b[8:], sector)
	return b
}

// segment builds a discard / write zeroes segment.
func segment(sector uint64, sectors, flags uint32) []byte {
	b := make([]byte, blk.DiscardSegmentSize)
	le.PutUint64(b[0:], sector)
	le.PutUint32(b[8:], sectors)
	le.PutUint32(b[12:], flags)
	return b
}

// submit makes a chain available on queue qi, kicks, and waits for its
// completion. It returns the used length.
func (h *harness) submit(t testing.TB, qi int, indirect bool, bufs ...virtiotest.Buf) uint32 {
	t.Helper()
	h.mu[qi].Lock()
	defer h.mu[qi].Unlock()
	d := h.drv[qi]
	var head uint16
	if indirect {
		head = d.AddIndirect(bufs...)
	} else {
		head = d.AddChain(bufs...)
	}
	if err := d.KickNow(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if u, ok := d.PopUsed(); ok {
			if u.ID != uint32(head) {
				t.Fatalf("used id %d, want %d", u.ID, head)
			}
			d.SetUsedEvent(d.UsedIdx())
			return u.Len
		}
		d.WaitCall(5)
	}
	t.Fatal("request not completed within 10s")
	return 0
}

// rw describes a request in the usual 3-descriptor layout.
type req struct {
	typ    uint32
	sector uint64
	out    []byte // data the device reads (after the header)
	in     int    // bytes the device writes before the status
}

// do runs r in the 3-descriptor layout (header, data, status) on queue 0
// and returns status, data written by the device, used length.
func (h *harness) do(t testing.TB, r req) (byte, []byte, uint32) {
	return h.doOn(t, 0, false, r)
}

func (h *harness) doOn(t testing.TB, qi int, indirect bool, r req) (byte, []byte, uint32) {
	t.Helper()
	d := h.drv[qi]
	h.mu[qi].Lock()
	bufs := []virtiotest.Buf{d.AllocBuf(blk.RequestHeaderSize, false, header(r.typ, r.sector))}
	if len(r.out) > 0 {
		bufs = append(bufs, d.AllocBuf(uint32(len(r.out)), false, r.out))
	}
	var in virtiotest.Buf
	if r.in > 0 {
		in = d.AllocBuf(uint32(r.in), true, nil)
		// Poison so that unwritten bytes show.
		for i := range d.Mem.Bytes(in.Addr, uint64(r.in)) {
			d.Mem.Bytes(in.Addr, uint64(r.in))[i] = 0xee
		}
		bufs = append(bufs, in)
	}
	st := d.AllocBuf(1, true, []byte{0xff})
	bufs = append(bufs, st)
	h.mu[qi].Unlock()
	n := h.submit(t, qi, indirect, bufs...)
	var data []byte
	if r.in > 0 {
		data = append([]byte(nil), h.mem.Bytes(in.Addr, uint64(r.in))...)
	}
	return h.mem.Bytes(st.Addr, 1)[0], data, n
}

func (h *harness) mustWrite(t testing.TB, sector uint64, data []byte) {
	t.Helper()
	if st, _, _ := h.do(t, req{typ: blk.TypeOut, sector: sector, out: data}); st != blk.StatusOK {
		t.Fatalf("write sector %d: status %d", sector, st)
	}
}

func (h *harness) mustRead(t testing.TB, sector uint64, n int) []byte {
	t.Helper()
	st, data, used := h.do(t, req{typ: blk.TypeIn, sector: sector, in: n})
	if st != blk.StatusOK {
		t.Fatalf("read sector %d: status %d", sector, st)
	}
	if used != uint32(n+1) {
		t.Fatalf("read used len %d, want %d", used, n+1)
	}
	return data
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func expectEqual(t testing.TB, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("data mismatch (len %d vs %d)", len(got), len(want))
	}
}
