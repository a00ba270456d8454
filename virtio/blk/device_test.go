package blk_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/eventfd"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

var le = binary.LittleEndian

func TestNewRejectsBadOptions(t *testing.T) {
	s := newFileStorage(t, diskSize)
	for _, o := range []blk.Options{
		{Serial: "a serial that is too long"},
		{QueueSize: 100},
		{QueueSize: 2},
		{NumQueues: -1},
	} {
		if _, err := blk.New(s, o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
	odd := newFileStorage(t, 1000)
	if _, err := blk.New(odd, blk.Options{}); err == nil {
		t.Error("storage size not a multiple of 512 accepted")
	}
}

func TestFeaturesAndConfig(t *testing.T) {
	s := geomStorage{newFileStorage(t, diskSize), blockdev.Geometry{
		LogicalBlockSize: 512, PhysicalBlockSize: 4096, OptimalIOSize: 65536, DiscardGranularity: 65536,
	}}
	dev, err := blk.New(s, blk.Options{NumQueues: 2, QueueSize: 128})
	if err != nil {
		t.Fatal(err)
	}
	f := dev.Features()
	for _, bit := range []uint{virtio.FeatureVersion1, virtio.FeatureEventIdx, virtio.FeatureIndirectDesc,
		blk.FeatureSegMax, blk.FeatureBlkSize, blk.FeatureTopology, blk.FeatureFlush, blk.FeatureConfigWCE,
		blk.FeatureMQ, blk.FeatureDiscard, blk.FeatureWriteZeroes} {
		if f&(1<<bit) == 0 {
			t.Errorf("feature %d not offered", bit)
		}
	}
	if f&(1<<blk.FeatureRO) != 0 {
		t.Error("RO offered on a writable device")
	}
	if dev.NumQueues() != 2 || dev.MaxQueueSize() != 128 {
		t.Errorf("queues %d size %d", dev.NumQueues(), dev.MaxQueueSize())
	}
	c := make([]byte, blk.ConfigSize)
	dev.ReadConfig(c, 0)
	check := func(name string, got, want uint64) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	check("capacity", le.Uint64(c[blk.ConfigCapacity:]), diskSize/512)
	check("seg_max", uint64(le.Uint32(c[blk.ConfigSegMax:])), 126)
	check("blk_size", uint64(le.Uint32(c[blk.ConfigBlkSize:])), 512)
	check("physical_block_exp", uint64(c[blk.ConfigPhysicalBlockExp]), 3)
	check("min_io_size", uint64(le.Uint16(c[blk.ConfigMinIOSize:])), 8)
	check("opt_io_size", uint64(le.Uint32(c[blk.ConfigOptIOSize:])), 128)
	check("writeback", uint64(c[blk.ConfigWritebackMode]), 1)
	check("num_queues", uint64(le.Uint16(c[blk.ConfigNumQueues:])), 2)
	check("max_discard_sectors", uint64(le.Uint32(c[blk.ConfigMaxDiscardSectors:])), blk.DefaultMaxDiscardSectors)
	check("max_discard_seg", uint64(le.Uint32(c[blk.ConfigMaxDiscardSeg:])), 1)
	check("discard_sector_alignment", uint64(le.Uint32(c[blk.ConfigDiscardSectorAlign:])), 128)
	check("max_write_zeroes_sectors", uint64(le.Uint32(c[blk.ConfigMaxWriteZeroesSectors:])), blk.DefaultMaxDiscardSectors)
	check("max_write_zeroes_seg", uint64(le.Uint32(c[blk.ConfigMaxWriteZeroesSeg:])), 1)
	check("write_zeroes_may_unmap", uint64(c[blk.ConfigWriteZeroesMayUnmap]), 1)

	// Partial reads at an offset, and past the end.
	p := make([]byte, 8)
	dev.ReadConfig(p, blk.ConfigNumQueues)
	if le.Uint16(p) != 2 {
		t.Errorf("partial read at num_queues: %x", p)
	}
	for i := range p {
		p[i] = 0xaa
	}
	dev.ReadConfig(p, 1000)
	if !bytes.Equal(p, make([]byte, 8)) {
		t.Errorf("read beyond config: %x", p)
	}

	// Capacity follows the storage.
	s.size.Store(2 * diskSize)
	dev.ReadConfig(c, 0)
	check("grown capacity", le.Uint64(c[blk.ConfigCapacity:]), 2*diskSize/512)

	// Only writeback is writable.
	if err := dev.WriteConfig([]byte{0}, blk.ConfigWritebackMode); err != nil {
		t.Fatal(err)
	}
	dev.ReadConfig(c, 0)
	check("writeback after disable", uint64(c[blk.ConfigWritebackMode]), 0)
	if err := dev.WriteConfig([]byte{1, 2, 3, 4}, blk.ConfigCapacity); err == nil {
		t.Error("capacity write accepted")
	}
	if err := dev.WriteConfig([]byte{7}, blk.ConfigWritebackMode); err == nil {
		t.Error("writeback 7 accepted")
	}

	ro, err := blk.New(s, blk.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if f := ro.Features(); f&(1<<blk.FeatureRO) == 0 || f&(1<<blk.FeatureMQ) != 0 || f&(1<<blk.FeatureDiscard) != 0 {
		t.Errorf("read-only features %#x", f)
	}
}

// The basic test of QEMU's vhost-user-blk-test.c: write and read with the
// 3-descriptor layout, write zeroes, discard, the invalid discard/write
// zeroes requests, and the 2-descriptor (any layout) requests.
func TestQEMUBasic(t *testing.T) {
	h := defaultHarness(t)
	data := make([]byte, 512)
	copy(data, "TEST")
	h.mustWrite(t, 0, data)
	expectEqual(t, h.mustRead(t, 0, 512), data)

	// WRITE_ZEROES on the same sector.
	if st, _, _ := h.do(t, req{typ: blk.TypeWriteZeroes, out: segment(0, 1, 0)}); st != blk.StatusOK {
		t.Fatalf("write zeroes: status %d", st)
	}
	expectEqual(t, h.mustRead(t, 0, 512), make([]byte, 512))
	testInvalidDiscardWriteZeroes(t, h, blk.TypeWriteZeroes)

	if st, _, _ := h.do(t, req{typ: blk.TypeDiscard, out: segment(0, 1, 0)}); st != blk.StatusOK {
		t.Fatalf("discard: status %d", st)
	}
	testInvalidDiscardWriteZeroes(t, h, blk.TypeDiscard)

	// 2-descriptor write: header and data in one buffer, status alone.
	d := h.drv[0]
	one := append(header(blk.TypeOut, 1), data...)
	wbuf := d.AllocBuf(uint32(len(one)), false, one)
	st := d.AllocBuf(1, true, []byte{0xff})
	h.submit(t, 0, false, wbuf, st)
	if s := h.mem.Bytes(st.Addr, 1)[0]; s != blk.StatusOK {
		t.Fatalf("2-descriptor write: status %d", s)
	}
	// 2-descriptor read: header alone, data and status in one buffer.
	hdr := d.AllocBuf(16, false, header(blk.TypeIn, 1))
	in := d.AllocBuf(513, true, nil)
	if used := h.submit(t, 0, false, hdr, in); used != 513 {
		t.Fatalf("2-descriptor read: used len %d", used)
	}
	got := h.mem.Bytes(in.Addr, 513)
	if got[512] != blk.StatusOK {
		t.Fatalf("2-descriptor read: status %d", got[512])
	}
	expectEqual(t, got[:512], data)
}

// test_invalid_discard_write_zeroes of vhost-user-blk-test.c, plus the
// unmap flag on DISCARD.
func testInvalidDiscardWriteZeroes(t *testing.T, h *harness, typ uint32) {
	t.Helper()
	cases := []struct {
		name string
		seg  []byte
		want byte
	}{
		{"two segments with max one", append(segment(0, 1, 0), segment(1, 1, 0)...), blk.StatusUnsupp},
		{"num_sectors beyond the limit", segment(0, 0xffffffff, 0), blk.StatusIOErr},
		{"sector beyond capacity", segment(diskSize/512+1, 1, 0), blk.StatusIOErr},
		{"range straddles the end", segment(diskSize/512-1, 2, 0), blk.StatusIOErr},
		{"reserved flag bits", segment(0, 1, ^uint32(blk.DiscardFlagUnmap)), blk.StatusUnsupp},
		{"short segment", segment(0, 1, 0)[:8], blk.StatusIOErr},
	}
	if typ == blk.TypeDiscard {
		cases = append(cases, struct {
			name string
			seg  []byte
			want byte
		}{"unmap flag on discard", segment(0, 1, blk.DiscardFlagUnmap), blk.StatusUnsupp})
	}
	for _, c := range cases {
		st, _, used := h.do(t, req{typ: typ, out: c.seg})
		if st != c.want || used != 1 {
			t.Errorf("type %d, %s: status %d used %d, want status %d used 1", typ, c.name, st, used, c.want)
		}
	}
}

// The indirect test of vhost-user-blk-test.c.
func TestQEMUIndirect(t *testing.T) {
	h := defaultHarness(t)
	d := h.drv[0]
	data := make([]byte, 512)
	copy(data, "TEST")
	one := append(header(blk.TypeOut, 0), data...)
	wbuf := d.AllocBuf(uint32(len(one)), false, one)
	st := d.AllocBuf(1, true, []byte{0xff})
	h.submit(t, 0, true, wbuf, st)
	if s := h.mem.Bytes(st.Addr, 1)[0]; s != blk.StatusOK {
		t.Fatalf("indirect write: status %d", s)
	}
	hdr := d.AllocBuf(16, false, header(blk.TypeIn, 0))
	in := d.AllocBuf(513, true, nil)
	h.submit(t, 0, true, hdr, in)
	got := h.mem.Bytes(in.Addr, 513)
	if got[512] != blk.StatusOK {
		t.Fatalf("indirect read: status %d", got[512])
	}
	expectEqual(t, got[:512], data)
}

func TestReadWriteLayouts(t *testing.T) {
	h := defaultHarness(t)
	d := h.drv[0]
	data := pattern(8192, 3)

	// Header split over two descriptors, data over three odd pieces.
	hdr := header(blk.TypeOut, 16)
	bufs := []virtiotest.Buf{
		d.AllocBuf(5, false, hdr[:5]),
		d.AllocBuf(11+100, false, append(hdr[5:], data[:100]...)),
		d.AllocBuf(4000, false, data[100:4100]),
		d.AllocBuf(4092, false, data[4100:]),
		d.AllocBuf(1, true, []byte{0xff}),
	}
	if used := h.submit(t, 0, false, bufs...); used != 1 {
		t.Fatalf("write used len %d", used)
	}
	if s := h.mem.Bytes(bufs[4].Addr, 1)[0]; s != blk.StatusOK {
		t.Fatalf("split write: status %d", s)
	}
	// Read back into pieces, status sharing the last piece.
	rh := d.AllocBuf(16, false, header(blk.TypeIn, 16))
	p1 := d.AllocBuf(1000, true, nil)
	p2 := d.AllocBuf(8192-1000+1, true, nil)
	if used := h.submit(t, 0, true, rh, p1, p2); used != 8193 {
		t.Fatalf("read used len %d", used)
	}
	got := append(append([]byte(nil), h.mem.Bytes(p1.Addr, 1000)...), h.mem.Bytes(p2.Addr, 8192-1000+1)...)
	if got[8192] != blk.StatusOK {
		t.Fatalf("split read: status %d", got[8192])
	}
	expectEqual(t, got[:8192], data)

	// A zero-length read succeeds, writes only the status.
	if st, _, used := h.do(t, req{typ: blk.TypeIn, sector: 0}); st != blk.StatusOK || used != 1 {
		t.Fatalf("empty read: status %d used %d", st, used)
	}
	// The last sector is readable.
	h.mustRead(t, diskSize/512-1, 512)
}

func TestRequestErrors(t *testing.T) {
	h := defaultHarness(t)
	last := uint64(diskSize / 512)
	cases := []struct {
		name string
		r    req
		want byte
	}{
		{"read beyond capacity", req{typ: blk.TypeIn, sector: last, in: 512}, blk.StatusIOErr},
		{"read straddles the end", req{typ: blk.TypeIn, sector: last - 1, in: 1024}, blk.StatusIOErr},
		{"read huge sector", req{typ: blk.TypeIn, sector: ^uint64(0), in: 512}, blk.StatusIOErr},
		{"write beyond capacity", req{typ: blk.TypeOut, sector: last, out: make([]byte, 512)}, blk.StatusIOErr},
		{"write huge sector", req{typ: blk.TypeOut, sector: 1 << 60, out: make([]byte, 512)}, blk.StatusIOErr},
		{"read odd length", req{typ: blk.TypeIn, in: 100}, blk.StatusIOErr},
		{"write odd length", req{typ: blk.TypeOut, out: make([]byte, 100)}, blk.StatusIOErr},
		{"unknown type", req{typ: 99}, blk.StatusUnsupp},
		{"get lifetime", req{typ: blk.TypeGetLifetime, in: 12}, blk.StatusUnsupp},
		{"secure erase", req{typ: blk.TypeSecureErase, out: segment(0, 1, 0)}, blk.StatusUnsupp},
		{"flush", req{typ: blk.TypeFlush}, blk.StatusOK},
		{"barrier bit ignored", req{typ: blk.TypeFlush | 1<<31}, blk.StatusOK},
	}
	for _, c := range cases {
		st, _, used := h.do(t, c.r)
		if st != c.want {
			t.Errorf("%s: status %d, want %d", c.name, st, c.want)
		}
		if c.want != blk.StatusOK && used != 1 {
			t.Errorf("%s: used len %d, want 1", c.name, used)
		}
	}
}

func TestGetID(t *testing.T) {
	h := defaultHarness(t)
	st, id, used := h.do(t, req{typ: blk.TypeGetID, in: blk.IDBytes})
	if st != blk.StatusOK || used != blk.IDBytes+1 {
		t.Fatalf("status %d used %d", st, used)
	}
	want := make([]byte, blk.IDBytes)
	copy(want, "thinblk-test")
	expectEqual(t, id, want)
	// A short buffer gets a prefix.
	st, id, used = h.do(t, req{typ: blk.TypeGetID, in: 4})
	if st != blk.StatusOK || used != 5 || string(id) != "thin" {
		t.Fatalf("short: status %d used %d id %q", st, used, id)
	}
	// A long buffer gets exactly 20 bytes.
	_, id, used = h.do(t, req{typ: blk.TypeGetID, in: 64})
	if used != blk.IDBytes+1 || !bytes.Equal(id[blk.IDBytes:], bytes.Repeat([]byte{0xee}, 64-blk.IDBytes)) {
		t.Fatalf("long: used %d id %x", used, id)
	}
}

func TestDiscardAndWriteZeroesClear(t *testing.T) {
	h := defaultHarness(t)
	data := pattern(64<<10, 9)
	for _, c := range []struct {
		typ   uint32
		flags uint32
	}{{blk.TypeDiscard, 0}, {blk.TypeWriteZeroes, 0}, {blk.TypeWriteZeroes, blk.DiscardFlagUnmap}} {
		h.mustWrite(t, 100, data)
		// Zero the middle 16 sectors.
		if st, _, _ := h.do(t, req{typ: c.typ, out: segment(108, 16, c.flags)}); st != blk.StatusOK {
			t.Fatalf("type %d flags %d: status %d", c.typ, c.flags, st)
		}
		want := append([]byte(nil), data...)
		clear(want[8*512 : 24*512])
		expectEqual(t, h.mustRead(t, 100, len(data)), want)
		// Zero sectors is a successful no-op.
		if st, _, _ := h.do(t, req{typ: c.typ, out: segment(0, 0, c.flags)}); st != blk.StatusOK {
			t.Fatalf("empty: status %d", st)
		}
	}
}

func TestReadOnly(t *testing.T) {
	s := newFileStorage(t, diskSize)
	h := newHarness(t, s, blk.Options{ReadOnly: true}, 64, allFeat)
	for _, r := range []req{
		{typ: blk.TypeOut, out: make([]byte, 512)},
		{typ: blk.TypeDiscard, out: segment(0, 1, 0)},
		{typ: blk.TypeWriteZeroes, out: segment(0, 1, 0)},
	} {
		if st, _, _ := h.do(t, r); st != blk.StatusIOErr {
			t.Errorf("type %d on read-only: status %d", r.typ, st)
		}
	}
	h.mustRead(t, 0, 4096)
	if st, _, _ := h.do(t, req{typ: blk.TypeFlush}); st != blk.StatusOK {
		t.Errorf("flush on read-only: status %d", st)
	}
}

func TestStorageErrors(t *testing.T) {
	s := newFileStorage(t, diskSize)
	h := newHarness(t, s, blk.Options{}, 64, allFeat)
	s.fail.Store(true)
	for _, r := range []req{
		{typ: blk.TypeIn, in: 512},
		{typ: blk.TypeOut, out: make([]byte, 512)},
		{typ: blk.TypeFlush},
		{typ: blk.TypeDiscard, out: segment(0, 1, 0)},
		{typ: blk.TypeWriteZeroes, out: segment(0, 1, 1)},
	} {
		st, _, used := h.do(t, r)
		if st != blk.StatusIOErr || used != 1 {
			t.Errorf("type %d with failing storage: status %d used %d", r.typ, st, used)
		}
	}
	s.fail.Store(false)
	s.noTrim.Store(true)
	for _, r := range []req{
		{typ: blk.TypeDiscard, out: segment(0, 1, 0)},
		{typ: blk.TypeWriteZeroes, out: segment(0, 1, 0)},
	} {
		if st, _, _ := h.do(t, r); st != blk.StatusUnsupp {
			t.Errorf("type %d on storage without it: status %d, want UNSUPP", r.typ, st)
		}
	}
}

func TestWriteThrough(t *testing.T) {
	s := newFileStorage(t, diskSize)
	h := newHarness(t, s, blk.Options{}, 64, allFeat)
	h.mustWrite(t, 0, make([]byte, 512))
	if n := s.flushes.Load(); n != 0 {
		t.Fatalf("writeback mode flushed %d times", n)
	}
	if err := h.dev.WriteConfig([]byte{0}, blk.ConfigWritebackMode); err != nil {
		t.Fatal(err)
	}
	base := s.flushes.Load()
	if base != 1 {
		t.Fatalf("disabling the write cache flushed %d times, want 1", base)
	}
	h.mustWrite(t, 0, make([]byte, 512))
	h.do(t, req{typ: blk.TypeWriteZeroes, out: segment(0, 1, 0)})
	if n := s.flushes.Load() - base; n != 2 {
		t.Fatalf("write-through: %d flushes for 2 writes", n)
	}
}

func TestMalformedChainCompletes(t *testing.T) {
	h := defaultHarness(t)
	d := h.drv[0]
	// Readable after writable: the device answers IOERR in the last
	// writable byte it found.
	st := d.AllocBuf(1, true, []byte{0xff})
	used := h.submit(t, 0, false, d.AllocBuf(16, false, header(blk.TypeIn, 0)), st, d.AllocBuf(16, false, nil))
	if used != 1 || h.mem.Bytes(st.Addr, 1)[0] != blk.StatusIOErr {
		t.Fatalf("used %d status %d", used, h.mem.Bytes(st.Addr, 1)[0])
	}
	// Outside guest memory, nothing writable: completed with length 0.
	if used := h.submit(t, 0, false, virtiotest.Buf{Addr: 16, Len: 16}); used != 0 {
		t.Fatalf("used %d", used)
	}
	// No status byte at all.
	if used := h.submit(t, 0, false, d.AllocBuf(16, false, header(blk.TypeFlush, 0))); used != 0 {
		t.Fatalf("no status: used %d", used)
	}
	// A short header.
	st = d.AllocBuf(1, true, []byte{0xff})
	if used := h.submit(t, 0, false, d.AllocBuf(8, false, nil), st); used != 1 || h.mem.Bytes(st.Addr, 1)[0] != blk.StatusIOErr {
		t.Fatalf("short header: used %d", used)
	}
	// The queue still works.
	h.mustRead(t, 0, 512)
}

// Many requests in flight on several queues at once, data verified.
func TestConcurrentQueues(t *testing.T) {
	s := newFileStorage(t, diskSize)
	h := newHarness(t, s, blk.Options{NumQueues: 4, Workers: 8}, 128, allFeat)
	const perQueue = 96 // in flight at once on each queue
	const reqSize = 4096
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for qi := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := h.drv[qi]
			type sub struct {
				head     uint16
				in, stat virtiotest.Buf
				want     []byte
			}
			for round := range 3 {
				h.mu[qi].Lock()
				subs := map[uint16]sub{}
				for i := range perQueue {
					sector := uint64((qi*perQueue+i)*reqSize/512) + uint64(round)*4096
					data := pattern(reqSize, byte(qi*31+i+round))
					hdr := d.AllocBuf(16, false, header(blk.TypeOut, sector))
					buf := d.AllocBuf(reqSize, false, data)
					stat := d.AllocBuf(1, true, []byte{0xff})
					head := d.AddIndirect(hdr, buf, stat)
					subs[head] = sub{head: head, stat: stat, want: data}
				}
				d.KickNow()
				for len(subs) > 0 {
					u, ok := d.PopUsed()
					if !ok {
						d.SetUsedEvent(d.UsedIdx())
						d.WaitCall(5)
						continue
					}
					sb := subs[uint16(u.ID)]
					if st := h.mem.Bytes(sb.stat.Addr, 1)[0]; st != blk.StatusOK {
						errs <- fmt.Errorf("queue %d: write status %d", qi, st)
					}
					delete(subs, uint16(u.ID))
				}
				h.mu[qi].Unlock()
				for i := range perQueue {
					sector := uint64((qi*perQueue+i)*reqSize/512) + uint64(round)*4096
					got := h.mustReadOn(t, qi, sector, reqSize)
					if !bytes.Equal(got, pattern(reqSize, byte(qi*31+i+round))) {
						errs <- fmt.Errorf("queue %d round %d: sector %d mismatch", qi, round, sector)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// The count drops just after the used ring shows the completion.
	for start := time.Now(); h.dev.InFlight() != 0; time.Sleep(time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("in flight after all completed: %d", h.dev.InFlight())
		}
	}
}

func (h *harness) mustReadOn(t testing.TB, qi int, sector uint64, n int) []byte {
	st, data, _ := h.doOn(t, qi, false, req{typ: blk.TypeIn, sector: sector, in: n})
	if st != blk.StatusOK {
		t.Errorf("read on queue %d: status %d", qi, st)
	}
	return data
}

// slowStorage holds reads until released.
type slowStorage struct {
	*fileStorage
	gate chan struct{}
}

func (s slowStorage) ReadAt(bufs [][]byte, off int64) error {
	<-s.gate
	return s.fileStorage.ReadAt(bufs, off)
}

// newHeldDevice is a device whose reads wait for s.gate and a driver with
// eventfds on a 16-entry ring; both are closed when the test ends.
func newHeldDevice(t *testing.T) (slowStorage, *blk.Device, *virtiotest.Driver) {
	t.Helper()
	s := slowStorage{newFileStorage(t, diskSize), make(chan struct{})}
	dev, err := blk.New(s, blk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, 16, allFeat)
	if err := d.WithEventfds(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return s, dev, d
}

func TestStopWaitsForInFlight(t *testing.T) {
	fs := newFileStorage(t, diskSize)
	s := slowStorage{fs, make(chan struct{})}
	dev, err := blk.New(s, blk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, 16, allFeat)
	if err := d.WithEventfds(); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := dev.StartQueue(d.Setup(0)); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), d.AllocBuf(512, true, nil), d.AllocBuf(1, true, nil))
	}
	d.KickNow()
	for dev.InFlight() != 3 {
		d.WaitCall(1)
	}
	// Stop cannot finish while requests are held.
	ctx, cancel := context.WithTimeout(context.Background(), 50e6)
	defer cancel()
	if err := dev.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with requests held: %v", err)
	}
	done := make(chan uint16)
	go func() {
		last, err := dev.StopQueue(0)
		if err != nil {
			t.Error(err)
		}
		done <- last
	}()
	close(s.gate)
	if last := <-done; last != 3 {
		t.Fatalf("last avail %d, want 3", last)
	}
	n := 0
	for {
		if _, ok := d.PopUsed(); !ok {
			break
		}
		n++
	}
	if n != 3 {
		t.Fatalf("%d completions before stop returned, want 3", n)
	}
	if _, err := dev.StopQueue(0); !errors.Is(err, blk.ErrNotStarted) {
		t.Fatalf("second stop: %v", err)
	}

	// Restart where it stopped; new requests are served.
	s2 := d.Setup(0)
	s2.LastAvail = 3
	if err := dev.StartQueue(s2); err != nil {
		t.Fatal(err)
	}
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeFlush, 0)), d.AllocBuf(1, true, nil))
	d.KickNow()
	for {
		if _, ok := d.PopUsed(); ok {
			break
		}
		d.WaitCall(5)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	if last, err := dev.StopQueue(0); err != nil || last != 4 {
		t.Fatalf("stop after close: %d, %v", last, err)
	}
	if err := dev.StartQueue(d.Setup(0)); !errors.Is(err, blk.ErrClosed) {
		t.Fatalf("start after close: %v", err)
	}
}

func TestStartQueueChecks(t *testing.T) {
	dev, err := blk.New(newFileStorage(t, diskSize), blk.Options{QueueSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	mem := virtiotest.NewMemory(memBase, memSize)
	big := virtiotest.NewDriver(mem, 128, allFeat)
	if err := dev.StartQueue(big.Setup(0)); err == nil {
		t.Error("ring larger than MaxQueueSize accepted")
	}
	d := virtiotest.NewDriver(mem, 64, allFeat)
	if err := dev.StartQueue(d.Setup(1)); err == nil {
		t.Error("queue index 1 of 1 accepted")
	}
	if err := dev.StartQueue(d.Setup(0)); err != nil {
		t.Fatal(err)
	}
	if err := dev.StartQueue(d.Setup(0)); err == nil {
		t.Error("second start of a running queue accepted")
	}
	if _, err := dev.StopQueue(0); err != nil {
		t.Fatal(err)
	}
}

func TestNotifyResize(t *testing.T) {
	dev, err := blk.New(newFileStorage(t, diskSize), blk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.NotifyResize(); err != nil {
		t.Fatalf("without notifier: %v", err)
	}
	calls := 0
	dev.SetConfigChangeNotifier(func() error { calls++; return nil })
	dev.NotifyResize()
	if calls != 1 {
		t.Fatalf("notifier called %d times", calls)
	}
	dev.SetConfigChangeNotifier(func() error { return errInjected })
	if err := dev.NotifyResize(); !errors.Is(err, errInjected) {
		t.Fatalf("notifier error: %v", err)
	}
}

// Discard and write zeroes limits are the configured ones, not the 2 GiB
// read/write limit.
func TestLargeDiscard(t *testing.T) {
	const big = 8 << 30 // sparse
	h := newHarness(t, newFileStorage(t, big), blk.Options{MaxDiscardSectors: 1 << 24, MaxWriteZeroesSectors: 1 << 24}, 64, allFeat)
	for typ, flags := range map[uint32]uint32{blk.TypeDiscard: 0, blk.TypeWriteZeroes: blk.DiscardFlagUnmap} {
		if st, _, _ := h.do(t, req{typ: typ, out: segment(0, 5<<30/512, flags)}); st != blk.StatusOK {
			t.Errorf("type %d of 5 GiB: status %d", typ, st)
		}
		if st, _, _ := h.do(t, req{typ: typ, out: segment(0, 1<<24+1, 0)}); st != blk.StatusIOErr {
			t.Errorf("type %d beyond the limit: status %d", typ, st)
		}
	}
}

// seg_max (QueueSize-2) is advertised before the driver picks the ring
// size: a driver honouring it sends indirect tables longer than a smaller
// ring (Linux with QEMU's default queue-size 128 and seg_max 254).
func TestSegMaxOnSmallerRing(t *testing.T) {
	h := newHarness(t, newFileStorage(t, diskSize), blk.Options{}, 64, allFeat)
	d := h.drv[0]
	c := make([]byte, blk.ConfigSize)
	h.dev.ReadConfig(c, 0)
	segMax := int(le.Uint32(c[blk.ConfigSegMax:]))
	data := pattern(segMax*512, 1)
	bufs := []virtiotest.Buf{d.AllocBuf(16, false, header(blk.TypeOut, 0))}
	for i := range segMax {
		bufs = append(bufs, d.AllocBuf(512, false, data[i*512:(i+1)*512]))
	}
	st := d.AllocBuf(1, true, []byte{0xff})
	bufs = append(bufs, st)
	h.submit(t, 0, true, bufs...)
	if s := h.mem.Bytes(st.Addr, 1)[0]; s != blk.StatusOK {
		t.Fatalf("write of seg_max=%d segments on a 64-entry ring: status %d", segMax, s)
	}
	expectEqual(t, h.mustRead(t, 0, len(data)), data)
}

// blockingWrites holds every write until released.
type blockingWrites struct {
	*fileStorage
	gate chan struct{}
}

func (s blockingWrites) WriteAt(bufs [][]byte, off int64) error {
	<-s.gate
	return s.fileStorage.WriteAt(bufs, off)
}

// Writes that block in the storage (a thin pool waiting for space) hold up
// no other request: a read completes while the ring is full of them.
func TestBlockedWritesDoNotHoldUpReads(t *testing.T) {
	fs := newFileStorage(t, diskSize)
	s := blockingWrites{fs, make(chan struct{})}
	h := newHarness(t, s, blk.Options{}, 128, allFeat)
	t.Cleanup(func() { close(s.gate) }) // before the harness's: Close waits for the writes
	d := h.drv[0]
	const blocked = 100
	h.mu[0].Lock()
	for i := range blocked {
		d.AddIndirect(d.AllocBuf(16, false, header(blk.TypeOut, uint64(i))), d.AllocBuf(512, false, nil), d.AllocBuf(1, true, nil))
	}
	d.KickNow()
	h.mu[0].Unlock()
	for start := time.Now(); h.dev.InFlight() != blocked; time.Sleep(time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%d of %d writes taken", h.dev.InFlight(), blocked)
		}
	}
	// submit fails the test if the read does not complete within 10 s.
	if st, _, _ := h.doOn(t, 0, true, req{typ: blk.TypeIn, sector: 0, in: 512}); st != blk.StatusOK {
		t.Fatalf("read status %d", st)
	}
}

func TestDrainFlushes(t *testing.T) {
	s := newFileStorage(t, diskSize)
	h := newHarness(t, s, blk.Options{}, 64, allFeat)
	h.mustWrite(t, 0, make([]byte, 4096))
	before := s.flushes.Load()
	if err := h.dev.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s.flushes.Load() != before+1 {
		t.Fatal("Drain did not flush the storage")
	}
	// Drained queues take no new requests, and report where they stopped.
	d := h.drv[0]
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeFlush, 0)), d.AllocBuf(1, true, nil))
	d.KickNow()
	time.Sleep(20 * time.Millisecond)
	if _, ok := d.PopUsed(); ok {
		t.Fatal("request served after Drain")
	}
	if last, err := h.dev.StopQueue(0); err != nil || last != 1 {
		t.Fatalf("StopQueue after Drain: %d, %v", last, err)
	}
}

// A new call fd reaches a queue with requests held in the storage at
// once, and their completions interrupt through it.
func TestSetQueueCallWithRequestsHeld(t *testing.T) {
	s, dev, d := newHeldDevice(t)
	if err := dev.SetQueueCall(0, nil); !errors.Is(err, blk.ErrNotStarted) {
		t.Fatalf("SetQueueCall on a queue not started: %v", err)
	}
	if err := dev.StartQueue(d.Setup(0)); err != nil {
		t.Fatal(err)
	}
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), d.AllocBuf(512, true, nil), d.AllocBuf(1, true, nil))
	d.KickNow()
	for dev.InFlight() != 1 {
		d.WaitCall(1)
	}
	call, err := eventfd.New()
	if err != nil {
		t.Fatal(err)
	}
	defer call.Close()
	fd := call.Fd()
	if err := dev.SetQueueCall(0, call); err != nil {
		t.Fatal(err)
	}
	d.CallCount()
	var buf [8]byte
	unix.Read(fd, buf[:])
	close(s.gate)
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, err := unix.Poll(pfd, 5000); n != 1 || err != nil {
		t.Fatalf("no interrupt on the new call fd (%d, %v)", n, err)
	}
	if _, ok := d.PopUsed(); !ok {
		t.Fatal("request not completed")
	}
	if n := d.CallCount(); n != 0 {
		t.Fatalf("old call fd signalled %d times", n)
	}
}
