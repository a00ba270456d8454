package blk_test

import (
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/virtio/blk"
)

// TestStatsWhileStopping: a ring being stopped while its requests wait in
// the storage (a write waiting for pool space, while QEMU stops the VM)
// does not hold up Stats, which a metrics scrape calls; the write counts
// once it completes.
func TestStatsWhileStopping(t *testing.T) {
	fs := newFileStorage(t, diskSize)
	s := blockingWrites{fs, make(chan struct{})}
	h := newHarness(t, s, blk.Options{}, 128, allFeat)
	release := sync.OnceFunc(func() { close(s.gate) })
	t.Cleanup(release) // before the harness's: Close waits for the write
	d := h.drv[0]
	h.mu[0].Lock()
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeOut, 0)), d.AllocBuf(4096, false, nil), d.AllocBuf(1, true, nil))
	d.KickNow()
	h.mu[0].Unlock()
	for start := time.Now(); h.dev.InFlight() != 1; time.Sleep(time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			t.Fatal("the write was not taken")
		}
	}
	stopped := make(chan error, 1)
	go func() {
		_, err := h.dev.StopQueue(0)
		stopped <- err
	}()
	time.Sleep(50 * time.Millisecond) // StopQueue is waiting for the write
	got := make(chan blk.Stats, 1)
	go func() { got <- h.dev.Stats() }()
	select {
	case st := <-got:
		if st.InFlight != 1 || st.Ops[blk.OpWrite].Completed != 0 {
			t.Errorf("while the write waits: %d in flight, %d writes completed; want 1 and 0", st.InFlight, st.Ops[blk.OpWrite].Completed)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stats waits for the queue being stopped")
	}
	release()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	if st := h.dev.Stats(); st.Ops[blk.OpWrite].Completed != 1 || st.Ops[blk.OpWrite].Bytes != 4096 || st.InFlight != 0 {
		t.Errorf("after the write: %+v, %d in flight", st.Ops[blk.OpWrite], st.InFlight)
	}
}
