package blk_test

import (
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/testenv"
)

// faultRig is a device whose queue 0 runs in memfd guest memory that the
// test can truncate under it, with one READ queued but not kicked.
type faultRig struct {
	dev  *blk.Device
	d    *virtiotest.Driver
	mem  *os.File
	logs testenv.Buffer
}

func newFaultRig(t *testing.T, s blockdev.Storage) *faultRig {
	t.Helper()
	r := &faultRig{}
	var err error
	if r.dev, err = blk.New(s, blk.Options{Logger: slog.New(slog.NewTextHandler(&r.logs, nil))}); err != nil {
		t.Fatal(err)
	}
	mem, f, unmap, err := virtiotest.NewMemfdMemory(memBase, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(unmap)
	r.mem = f
	r.d = virtiotest.NewDriver(mem, 16, allFeat)
	if err := r.d.WithEventfds(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.d.Close() })
	if err := r.dev.StartQueue(r.d.Setup(0)); err != nil {
		t.Fatal(err)
	}
	r.d.AddChain(r.d.AllocBuf(16, false, header(blk.TypeIn, 0)), r.d.AllocBuf(4096, true, nil), r.d.AllocBuf(1, true, nil))
	return r
}

func (r *faultRig) truncate(t *testing.T) {
	t.Helper()
	if err := r.mem.Truncate(0); err != nil {
		t.Fatal(err)
	}
}

// survived checks that the device lived through the fault: StopQueue
// returns (called after wait), nothing stays in flight, the fault is
// logged.
func (r *faultRig) survived(t *testing.T, wait time.Duration) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		time.Sleep(wait)
		_, err := r.dev.StopQueue(0)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("StopQueue hung after the guest memory fault")
	}
	if n := r.dev.InFlight(); n != 0 {
		t.Fatalf("in flight %d", n)
	}
	if !strings.Contains(r.logs.String(), "guest memory fault") {
		t.Fatalf("no fault logged:\n%s", r.logs.String())
	}
}

// A front-end that truncates the guest memory file under a running device
// makes every access to it fault. The device must survive: the queue stops,
// StopQueue returns, the process lives on.
func TestGuestMemoryTruncated(t *testing.T) {
	for _, when := range []string{"before the kick", "during a request"} {
		t.Run(when, func(t *testing.T) {
			s := slowStorage{newFileStorage(t, diskSize), make(chan struct{})}
			r := newFaultRig(t, s)
			if when == "before the kick" {
				close(s.gate)
				r.truncate(t)
				r.d.KickNow()
			} else {
				r.d.KickNow()
				for start := time.Now(); r.dev.InFlight() != 1; time.Sleep(time.Millisecond) {
					if time.Since(start) > 5*time.Second {
						t.Fatal("request not taken")
					}
				}
				r.truncate(t)
				close(s.gate)
			}
			r.survived(t, 50*time.Millisecond) // let the device hit the fault
		})
	}
}

// The same with asynchronous storage: the completion goroutine hits the
// fault when it writes the status; the request is abandoned, not lost.
func TestGuestMemoryTruncatedAsync(t *testing.T) {
	s := &heldAsync{fileStorage: newFileStorage(t, diskSize), release: make(chan struct{})}
	r := newFaultRig(t, s)
	r.d.KickNow()
	for start := time.Now(); s.started.Load() != 1; time.Sleep(time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			t.Fatal("request not started asynchronously")
		}
	}
	r.truncate(t)
	close(s.release)
	r.survived(t, 0)
}
