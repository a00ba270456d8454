package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

// TestConcurrentUse runs clients that connect, call, take events and go
// away while events are emitted and commands registered, then closes the
// server and checks that no goroutine is left behind. Run it with -race.
func TestConcurrentUse(t *testing.T) {
	before := runtime.NumGoroutine()
	s := NewServer(Options{QueueLength: 32})
	path := filepath.Join(t.TempDir(), "q.sock")
	ln, err := s.ListenUnix(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background(), ln) }()
	s.Register("echo", func(_ context.Context, raw json.RawMessage) (any, error) { return raw, nil })

	stop := make(chan struct{})
	var emitters sync.WaitGroup
	emitters.Add(2)
	go func() {
		defer emitters.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			s.Emit("TICK", map[string]int{"i": i})
			time.Sleep(100 * time.Microsecond)
		}
	}()
	go func() {
		defer emitters.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			s.Register(fmt.Sprintf("dyn-%d", i), func(context.Context, json.RawMessage) (any, error) { return i, nil })
		}
	}()

	var clients sync.WaitGroup
	var calls atomic.Int64
	for w := range 6 {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for round := range 5 {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := Dial(ctx, path)
				if errors.Is(err, ErrClientClosed) {
					// Dropped for falling behind on events: allowed.
					cancel()
					continue
				}
				if err != nil {
					t.Errorf("client %d: %v", w, err)
					cancel()
					return
				}
				calls.Add(1)
				for i := range 20 {
					var got map[string]int
					err := c.Execute(ctx, "echo", map[string]int{"w": w, "r": round, "i": i}, &got)
					if err != nil {
						break // dropped because this client fell behind on events
					}
					if got["w"] != w || got["r"] != round || got["i"] != i {
						t.Errorf("client %d got %v", w, got)
					}
				}
				c.Close()
				cancel()
			}
		}()
	}
	clients.Wait()
	if calls.Load() == 0 {
		t.Error("no client got through")
	}
	close(stop)
	emitters.Wait()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}
