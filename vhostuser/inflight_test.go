package vhostuser

import (
	"encoding/binary"
	"os"
	"slices"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// getInflight sends GET_INFLIGHT_FD and returns the reply and its fd.
func (c *client) getInflight(numQueues, queueSize uint16) (Inflight, *os.File) {
	c.t.Helper()
	c.write(ReqGetInflightFd, 0, Inflight{NumQueues: numQueues, QueueSize: queueSize}.Encode())
	m := c.read(ReqGetInflightFd)
	in, err := DecodeInflight(m.Payload)
	if err != nil || len(m.Files) != 1 {
		c.t.Fatalf("GET_INFLIGHT_FD reply: %v, %d fds", err, len(m.Files))
	}
	c.t.Cleanup(func() { m.Files[0].Close() })
	return in, m.Files[0]
}

func mapFile(t *testing.T, f *os.File, size uint64) []byte {
	t.Helper()
	m, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

// GET_INFLIGHT_FD hands out a sealed memfd laid out as one QueueRegionSplit
// per queue; SET_INFLIGHT_FD takes it back and the rings start with it.
func TestInflightGetSet(t *testing.T) {
	dev, _, c := negotiated(t)
	setupMem(t, c)
	in, f := c.getInflight(2, 128)
	want := 2 * inflightQueueSize(128)
	if in.MmapSize != want || in.MmapOffset != 0 || in.NumQueues != 2 || in.QueueSize != 128 {
		t.Fatalf("GET_INFLIGHT_FD = %+v, want %d bytes at 0", in, want)
	}
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals&(unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL) != unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL {
		t.Fatalf("seals %#x, %v", seals, err)
	}
	if err := f.Truncate(0); err == nil {
		t.Fatal("the area's file could be shrunk")
	}
	area := mapFile(t, f, in.MmapSize)
	for q := range 2 {
		r := area[uint64(q)*inflightQueueSize(128):]
		if v, n := binary.LittleEndian.Uint16(r[8:]), binary.LittleEndian.Uint16(r[10:]); v != 1 || n != 128 {
			t.Fatalf("queue region %d: version %d desc_num %d", q, v, n)
		}
	}
	c.mustSend(ReqSetInflightFd, in.Encode(), f)
	c.startRing(t, 0, 128)
	q, ok := dev.runningQueue(0)
	if !ok || q.Inflight == nil {
		t.Fatalf("ring running %v with in-flight log %v", ok, q.Inflight)
	}
	// The log the device got writes into the front-end's area.
	q.Inflight.Popped(5)
	if d := area[inflightHeaderSize+5*inflightDescSize:]; d[0] != 1 {
		t.Fatal("Popped did not mark head 5 in flight in the shared area")
	}
	// Neither may change while a ring runs.
	if err := c.send(ReqSetInflightFd, in.Encode(), f); err == nil {
		t.Fatal("SET_INFLIGHT_FD accepted while a ring runs")
	}
}

// SET_INFLIGHT_FD's payload and descriptor are hostile input.
func TestInflightSetValidation(t *testing.T) {
	dev, ts, c := negotiated(t)
	setupMem(t, c)
	in, f := c.getInflight(2, 128)
	unsealed := newGuestRAM(t, int(in.MmapSize)+4096)
	for _, tc := range []struct {
		name string
		in   Inflight
		f    *os.File
	}{
		{"no queues", Inflight{MmapSize: in.MmapSize, NumQueues: 0, QueueSize: 128}, f},
		{"more queues than the device", Inflight{MmapSize: 3 * inflightQueueSize(128), NumQueues: 3, QueueSize: 128}, f},
		{"queue size not a power of two", Inflight{MmapSize: in.MmapSize, NumQueues: 2, QueueSize: 100}, f},
		{"queue size above the maximum", Inflight{MmapSize: 2 * inflightQueueSize(512), NumQueues: 2, QueueSize: 512}, f},
		{"size too small", Inflight{MmapSize: in.MmapSize - 64, NumQueues: 2, QueueSize: 128}, f},
		{"size too large", Inflight{MmapSize: 1 << 40, NumQueues: 2, QueueSize: 128}, f},
		{"offset past the file", Inflight{MmapSize: in.MmapSize, MmapOffset: 4096, NumQueues: 2, QueueSize: 128}, f},
		{"offset not page aligned", Inflight{MmapSize: in.MmapSize, MmapOffset: 64, NumQueues: 2, QueueSize: 128}, f},
		{"huge offset", Inflight{MmapSize: in.MmapSize, MmapOffset: 1 << 62, NumQueues: 2, QueueSize: 128}, f},
		{"file not sealed", in, unsealed.file},
		{"not a memfd", in, eventFd(t)},
	} {
		if err := c.send(ReqSetInflightFd, tc.in.Encode(), tc.f); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	// A ring whose size differs from the area's does not start with it.
	c.mustSend(ReqSetInflightFd, in.Encode(), f)
	c.startRing(t, 0, 64)
	if _, ok := dev.runningQueue(0); ok {
		t.Fatal("ring of 64 started with an in-flight area for 128")
	}
	ts.log.WaitContains(t, "in-flight region for 128 descriptors, ring has 64")
	// GET_INFLIGHT_FD with a bad request closes the connection (it has a
	// reply of its own, which cannot carry an error).
	c.write(ReqGetInflightFd, 0, Inflight{NumQueues: 9, QueueSize: 128}.Encode())
	c.expectClosed()
}

// newTestRing is a queue region in plain memory.
func newTestRing(t *testing.T, size uint16) *inflightRing {
	t.Helper()
	buf := make([]uint64, inflightQueueSize(size)/8)
	b := unsafeBytes(buf)
	q := &inflightRing{region: b, size: size}
	q.init()
	return q
}

// The spec's procedure survives a crash at every point: the runner's
// sequence for one completion is Pushing, the used element and index,
// Pushed; a new process (a fresh inflightRing over the same region) must
// find exactly the heads not yet on the used ring, oldest first.
func TestInflightCrashPoints(t *testing.T) {
	const size = 8
	for crash := range 4 {
		q := newTestRing(t, size)
		if p, err := q.Pending(0); err != nil || len(p) != 0 {
			t.Fatalf("fresh region pending %v %v", p, err)
		}
		for _, h := range []uint16{3, 1, 6, 2} {
			q.Popped(h)
		}
		used := uint16(0)
		// Complete 1 fully.
		q.Pushing(1)
		used++
		q.Pushed(1, used)
		// Crash while completing 6 at point crash.
		want := []uint16{3, 6, 2}
		switch crash {
		case 0: // before anything
		case 1: // Pushing done, used index not published
			q.Pushing(6)
		case 2: // used index published, flag not cleared
			q.Pushing(6)
			used++
			want = []uint16{3, 2}
		case 3: // flag cleared, used_idx not recorded
			q.Pushing(6)
			used++
			p := q.word64(q.desc(6))
			*p &^= 0xff
			want = []uint16{3, 2}
		}
		next := &inflightRing{region: q.region, size: size}
		if err := next.check(size); err != nil {
			t.Fatal(err)
		}
		got, err := next.Pending(used)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("crash point %d: pending %v (%v), want %v", crash, got, err, want)
		}
		// The next process keeps the order: new heads come after.
		next.Popped(7)
		got, _ = (&inflightRing{region: q.region, size: size}).Pending(used)
		if !slices.Equal(got, append(want, 7)) {
			t.Fatalf("crash point %d: after a new pop %v", crash, got)
		}
	}
}

// A region left over from before a device reset (used index far from the
// ring's) is reused only when nothing is in flight.
func TestInflightStaleRegion(t *testing.T) {
	q := newTestRing(t, 8)
	q.Pending(0)
	for i := range uint16(40) {
		q.Popped(i % 8)
		q.Pushing(i % 8)
		q.Pushed(i%8, i+1)
	}
	if p, err := (&inflightRing{region: q.region, size: 8}).Pending(0); err != nil || len(p) != 0 {
		t.Fatalf("empty stale region: %v %v", p, err)
	}
	q.Popped(2)
	if _, err := (&inflightRing{region: q.region, size: 8}).Pending(1000); err == nil {
		t.Fatal("stale region with a head in flight accepted")
	}
}

// FuzzInflightRegion: whatever a front-end puts in a queue region,
// checking and reading it never panics or loops, and what it returns is a
// set of distinct heads in counter order.
func FuzzInflightRegion(f *testing.F) {
	seed := func(fill func(q *inflightRing)) []byte {
		buf := make([]uint64, inflightQueueSize(16)/8)
		q := &inflightRing{region: unsafeBytes(buf), size: 16}
		q.init()
		fill(q)
		return append([]byte(nil), q.region...)
	}
	f.Add(seed(func(q *inflightRing) {}), uint16(0))
	f.Add(seed(func(q *inflightRing) { q.Popped(3); q.Popped(9); q.Pushing(3) }), uint16(1))
	f.Add(seed(func(q *inflightRing) {
		for i := range uint16(5) {
			q.Popped(i)
		}
		q.Pushing(1)
		q.Pushing(4)
	}), uint16(2))
	f.Fuzz(func(t *testing.T, data []byte, used uint16) {
		buf := make([]uint64, inflightQueueSize(16)/8)
		q := &inflightRing{region: unsafeBytes(buf), size: 16}
		copy(q.region, data)
		if err := q.check(16); err != nil {
			return
		}
		heads, err := q.Pending(used)
		if err != nil {
			return
		}
		seen := map[uint16]bool{}
		var last uint64
		for i, h := range heads {
			if h >= 16 || seen[h] {
				t.Fatalf("head %d out of range or repeated in %v", h, heads)
			}
			seen[h] = true
			c := binary.LittleEndian.Uint64(q.region[q.desc(h)+dsCounter:])
			if i > 0 && c < last {
				t.Fatalf("heads %v not in counter order", heads)
			}
			last = c
		}
		// New pops get counters above every one in the region.
		q.Popped(0)
		if c := binary.LittleEndian.Uint64(q.region[q.desc(0)+dsCounter:]); c < last {
			t.Fatalf("new counter %d below %d", c, last)
		}
	})
}

// FuzzInflightPayload: validation of GET/SET_INFLIGHT_FD payloads accepts
// only areas of the exact size for their queues.
func FuzzInflightPayload(f *testing.F) {
	f.Add(Inflight{MmapSize: 2 * inflightQueueSize(128), NumQueues: 2, QueueSize: 128}.Encode())
	f.Add(Inflight{MmapSize: 1 << 63, MmapOffset: 1 << 63, NumQueues: 0xffff, QueueSize: 0x8000}.Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		in, err := DecodeInflight(b)
		if err != nil {
			return
		}
		if validateInflight(in, 4, 256, true) == nil {
			if in.NumQueues == 0 || in.NumQueues > 4 || in.QueueSize == 0 || in.QueueSize > 256 ||
				in.MmapSize != uint64(in.NumQueues)*inflightQueueSize(in.QueueSize) || in.MmapOffset > maxInflightArea {
				t.Fatalf("accepted %+v", in)
			}
		}
	})
}

func TestInflightQueueSizeAligned(t *testing.T) {
	for n := uint16(1); n <= 1024; n *= 2 {
		if s := inflightQueueSize(n); s%64 != 0 || s < 16+16*uint64(n) {
			t.Fatalf("queue region for %d: %d bytes", n, s)
		}
	}
}

// unsafeBytes views 8-byte aligned memory as bytes (the region's atomics
// need that alignment).
func unsafeBytes(buf []uint64) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), len(buf)*8)
}

// QEMU's VhostUserInflight is 24 bytes (8+8+2+2, padded to 8): QEMU 7.2
// sends GET_INFLIGHT_FD with 24 and closes the connection on any other
// reply size. (20 made every QEMU reconnect fail: found by the guest test.)
func TestInflightPayloadIsQEMUs(t *testing.T) {
	b := Inflight{MmapSize: 1, MmapOffset: 2, NumQueues: 3, QueueSize: 4}.Encode()
	if len(b) != 24 {
		t.Fatalf("Inflight encodes to %d bytes, want 24", len(b))
	}
	want := []byte{1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0}
	if !slices.Equal(b, want) {
		t.Fatalf("Inflight encodes to % x, want % x", b, want)
	}
}
