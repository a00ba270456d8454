package blk_test

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/thinblk/thinblk/virtio/blk"
)

// gatedStorage holds reads at chosen offsets until the test releases them.
type gatedStorage struct {
	*fileStorage
	gates map[int64]*gate
}

type gate struct {
	entered, release chan struct{}
}

func (s *gatedStorage) ReadAt(bufs [][]byte, off int64) error {
	if g := s.gates[off]; g != nil {
		close(g.entered)
		<-g.release
	}
	return s.fileStorage.ReadAt(bufs, off)
}

func waitFor(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// TestDeferredCompletionAnnounced forces the interleaving of the lost
// interrupt: worker A finishes request 1 while request 3 waits for a
// worker, so A leaves the interrupt to whoever takes request 3; before A
// publishes its completion, worker B finishes request 2, takes request 3,
// serves it and completes it with an interrupt. A's completion then lands
// on the used ring after the last interrupt check, and must still be
// announced.
func TestDeferredCompletionAnnounced(t *testing.T) {
	const n = 3
	gs := &gatedStorage{fileStorage: newFileStorage(t, diskSize), gates: map[int64]*gate{}}
	for _, off := range []int64{0, 4096} { // requests 1 and 2
		gs.gates[off] = &gate{entered: make(chan struct{}), release: make(chan struct{})}
	}
	hookEntered, hookRelease := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	blk.SetTestHookDeferring(func() {
		if first.CompareAndSwap(false, true) { // only worker A waits
			close(hookEntered)
			<-hookRelease
		}
	})
	t.Cleanup(func() { blk.SetTestHookDeferring(nil) })
	h := newHarness(t, gs, blk.Options{Workers: 2}, 128, allFeat)
	// Registered after the harness, so it runs before the device closes.
	released := false
	t.Cleanup(func() { // unblock everything if the test fails early
		if !released {
			close(hookRelease)
		}
		for _, g := range gs.gates {
			select {
			case <-g.release:
			default:
				close(g.release)
			}
		}
	})

	d := h.drv[0]
	for i := range n {
		d.AddChain(
			d.AllocBuf(blk.RequestHeaderSize, false, header(blk.TypeIn, uint64(i*8))),
			d.AllocBuf(4096, true, nil),
			d.AllocBuf(1, true, []byte{0xff}),
		)
	}
	if err := d.KickNow(); err != nil {
		t.Fatal(err)
	}
	// Both workers are busy with requests 1 and 2; request 3 waits.
	waitFor(t, "request 1 in storage", gs.gates[0].entered)
	waitFor(t, "request 2 in storage", gs.gates[4096].entered)
	close(gs.gates[0].release)
	waitFor(t, "worker A deferring", hookEntered)
	close(gs.gates[4096].release)

	// Requests 2 and 3 complete; A's is still held back.
	deadline := time.Now().Add(10 * time.Second)
	for d.UsedIdx() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("used idx %d, want 2", d.UsedIdx())
		}
		time.Sleep(time.Millisecond)
	}
	for range 2 {
		d.PopUsed()
	}
	// Ask for an interrupt at the next completion, forget earlier ones.
	d.SetUsedEvent(d.UsedIdx())
	d.CallPending()

	released = true
	close(hookRelease)
	signalled, err := d.WaitCall(5000)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.UsedIdx(); got != n {
		t.Fatalf("used idx %d after A's completion, want %d", got, n)
	}
	if !signalled {
		t.Fatal("request 1 completed on the used ring but the driver was never interrupted")
	}
}
