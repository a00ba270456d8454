package frontend

import (
	"bytes"
	"runtime"
	"testing"

	"github.com/thinblk/thinblk/vhostuser"
)

// TestUnusedRingsCost: a back-end offering every ring a vhost-user front-end
// can address (thinblk serve's default) to a front-end that sets up one
// costs no goroutine and a few hundred bytes per ring it never enables,
// against a back-end that offers exactly one. QEMU asks for one queue per
// vCPU unless told otherwise, so serve offers them all by default; this is
// the price of that default.
func TestUnusedRingsCost(t *testing.T) {
	type cost struct {
		goroutines int
		heap       uint64
	}
	measure := func(offered int) cost {
		img := newImage(t, imgSize)
		before := snapshotRuntime()
		sock := startThinblk(t, img, serveOpts{queues: offered})
		d := dial(t, sock, Options{NumQueues: 1})
		if d.MaxQueues() != offered {
			t.Fatalf("back-end offers %d queues, want %d", d.MaxQueues(), offered)
		}
		want := bytes.Repeat([]byte{0xa5}, 4096)
		mustWrite(t, d, want, 8192)
		if got := mustRead(t, d, 4096, 8192); !bytes.Equal(got, want) {
			t.Fatal("read back differs")
		}
		after := snapshotRuntime()
		return cost{after.goroutines - before.goroutines, after.heap - min(after.heap, before.heap)}
	}
	// Warm up (first-use allocations of the runtime and packages).
	measure(1)
	one := measure(1)
	all := measure(vhostuser.MaxRings)
	unused := vhostuser.MaxRings - 1
	perRing := (float64(all.heap) - float64(one.heap)) / float64(unused)
	t.Logf("1 ring offered: %d goroutines, %d heap bytes; %d offered: %d goroutines, %d heap bytes; %.0f bytes per unused ring",
		one.goroutines, one.heap, vhostuser.MaxRings, all.goroutines, all.heap, perRing)
	if all.goroutines != one.goroutines {
		t.Errorf("offering %d rings costs %d goroutines, offering 1 costs %d: an unused ring must cost none",
			vhostuser.MaxRings, all.goroutines, one.goroutines)
	}
	// The session's ring state and the device's queue slot (about 130
	// bytes), with room for heap measurement noise.
	if perRing > 512 {
		t.Errorf("%.0f heap bytes per unused ring; want at most 512", perRing)
	}
}

type runtimeCost struct {
	goroutines int
	heap       uint64
}

func snapshotRuntime() runtimeCost {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return runtimeCost{runtime.NumGoroutine(), ms.HeapAlloc}
}
