package blk_test

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"

	"github.com/thinblk/thinblk/internal/testenv"
)

// A front-end that truncates the guest memory file under a running device
// makes every access to it fault. The device must survive: the queue stops,
// StopQueue returns, the process lives on.
func TestGuestMemoryTruncated(t *testing.T) {
	for _, when := range []string{"before the kick", "during a request"} {
		t.Run(when, func(t *testing.T) {
			fs := newFileStorage(t, diskSize)
			s := slowStorage{fs, make(chan struct{})}
			var logs testenv.Buffer
			dev, err := blk.New(s, blk.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			if err != nil {
				t.Fatal(err)
			}
			mem, f, unmap, err := virtiotest.NewMemfdMemory(memBase, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			defer unmap()
			d := virtiotest.NewDriver(mem, 16, allFeat)
			if err := d.WithEventfds(); err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if err := dev.StartQueue(d.Setup(0)); err != nil {
				t.Fatal(err)
			}
			d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), d.AllocBuf(4096, true, nil), d.AllocBuf(1, true, nil))
			if when == "before the kick" {
				close(s.gate)
				if err := f.Truncate(0); err != nil {
					t.Fatal(err)
				}
				d.KickNow()
			} else {
				d.KickNow()
				for start := time.Now(); dev.InFlight() != 1; time.Sleep(time.Millisecond) {
					if time.Since(start) > 5*time.Second {
						t.Fatal("request not taken")
					}
				}
				if err := f.Truncate(0); err != nil {
					t.Fatal(err)
				}
				close(s.gate)
			}
			done := make(chan error, 1)
			go func() {
				time.Sleep(50 * time.Millisecond) // let the device hit the fault
				_, err := dev.StopQueue(0)
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
			if n := dev.InFlight(); n != 0 {
				t.Fatalf("in flight %d", n)
			}
			if !strings.Contains(logs.String(), "guest memory fault") {
				t.Fatalf("no fault logged:\n%s", logs.String())
			}
		})
	}
}

// The same with asynchronous storage: the completion goroutine hits the
// fault when it writes the status; the request is abandoned, not lost.
func TestGuestMemoryTruncatedAsync(t *testing.T) {
	s := &heldAsync{fileStorage: newFileStorage(t, diskSize), release: make(chan struct{})}
	var logs testenv.Buffer
	dev, err := blk.New(s, blk.Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	mem, f, unmap, err := virtiotest.NewMemfdMemory(memBase, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer unmap()
	d := virtiotest.NewDriver(mem, 16, allFeat)
	if err := d.WithEventfds(); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := dev.StartQueue(d.Setup(0)); err != nil {
		t.Fatal(err)
	}
	d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), d.AllocBuf(4096, true, nil), d.AllocBuf(1, true, nil))
	d.KickNow()
	for start := time.Now(); s.started.Load() != 1; time.Sleep(time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			t.Fatal("request not started asynchronously")
		}
	}
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	close(s.release)
	done := make(chan error, 1)
	go func() {
		_, err := dev.StopQueue(0)
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
	if n := dev.InFlight(); n != 0 {
		t.Fatalf("in flight %d", n)
	}
	if !strings.Contains(logs.String(), "guest memory fault") {
		t.Fatalf("no fault logged:\n%s", logs.String())
	}
}
