package blk_test

import (
	"syscall"
	"testing"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// batch is a set of requests written once into the ring's descriptors and
// re-published for every round, so that the driver side allocates nothing.
type batch struct {
	h     *harness
	d     *virtiotest.Driver
	heads []uint16
	stats []uint64
	last  uint16
}

func newBatch(tb testing.TB, h *harness, qd int, typ uint32, size uint32) *batch {
	b := &batch{h: h, d: h.drv[0]}
	for i := range qd {
		sector := uint64(i) * uint64(size) / 512
		hdr := b.d.AllocBuf(16, false, header(typ, sector))
		data := b.d.AllocBuf(size, typ == blk.TypeIn, pattern(int(size), byte(i)))
		st := b.d.AllocBuf(1, true, nil)
		b.heads = append(b.heads, b.d.WriteChain(hdr, data, st))
		b.stats = append(b.stats, st.Addr)
	}
	b.last = b.d.UsedIdx()
	return b
}

// round submits every request of the batch, kicks once, and waits for all
// of them.
func (b *batch) round(tb testing.TB) {
	old := b.d.AvailIdx()
	for _, h := range b.heads {
		b.d.Publish(h)
	}
	if b.d.NeedKick(old) {
		if err := b.d.KickNow(); err != nil {
			tb.Fatal(err)
		}
	}
	want := b.last + uint16(len(b.heads))
	for {
		b.d.SetUsedEvent(want - 1) // interrupt me when the last completes
		if b.d.UsedIdx() == want {
			break
		}
		b.d.WaitCall(1000)
	}
	b.last = want
	for _, a := range b.stats {
		if s := b.h.mem.Bytes(a, 1)[0]; s != blk.StatusOK {
			tb.Fatalf("status %d", s)
		}
	}
}

func TestRoundTripDoesNotAllocate(t *testing.T) {
	for _, storage := range []string{"sync", "io_uring"} {
		t.Run(storage, func(t *testing.T) {
			var s blockdev.Storage = newFileStorage(t, diskSize)
			if storage == "io_uring" {
				s = openRawdisk(t, diskSize)
			}
			h := newHarness(t, s, blk.Options{}, 128, allFeat)
			for _, c := range []struct {
				name string
				qd   int
				typ  uint32
			}{{"read qd1", 1, blk.TypeIn}, {"write qd1", 1, blk.TypeOut}, {"read qd16", 16, blk.TypeIn}, {"flush qd1", 1, blk.TypeFlush}} {
				b := newBatch(t, h, c.qd, c.typ, 4096)
				b.round(t) // warm-up: slots grow to their chains
				if n := testing.AllocsPerRun(200, func() { b.round(t) }); n != 0 {
					t.Errorf("%s: %.2f allocations per round of %d requests", c.name, n, c.qd)
				}
			}
		})
	}
}

func benchRoundTrip(b *testing.B, qd int, typ uint32, size uint32) {
	h := newHarness(b, newFileStorage(b, diskSize), blk.Options{}, 128, allFeat)
	bt := newBatch(b, h, qd, typ, size)
	bt.round(b)
	b.ReportAllocs()
	b.SetBytes(int64(size) * int64(qd))
	cpu0 := cpuTime()
	b.ResetTimer()
	for b.Loop() {
		bt.round(b)
	}
	// CPU time (device and driver side together) says more than wall
	// time on a machine shared with other work.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N*qd), "cpu-ns/req")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*qd), "ns/req")
}

func BenchmarkRead4KQD1(b *testing.B)   { benchRoundTrip(b, 1, blk.TypeIn, 4096) }
func BenchmarkRead4KQD32(b *testing.B)  { benchRoundTrip(b, 32, blk.TypeIn, 4096) }
func BenchmarkWrite4KQD1(b *testing.B)  { benchRoundTrip(b, 1, blk.TypeOut, 4096) }
func BenchmarkWrite4KQD32(b *testing.B) { benchRoundTrip(b, 32, blk.TypeOut, 4096) }

// cpuTime is the process's user+system CPU time in nanoseconds.
func cpuTime() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}
