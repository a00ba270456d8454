package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
)

func benchServer(b *testing.B) (*Server, string) {
	s := NewServer(Options{Logger: slog.New(slog.DiscardHandler), QueueLength: 4096})
	path := filepath.Join(b.TempDir(), "q.sock")
	ln, err := s.ListenUnix(path, 0)
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(context.Background(), ln)
	b.Cleanup(func() { s.Close() })
	return s, path
}

// BenchmarkExecute measures one command round trip through the client.
func BenchmarkExecute(b *testing.B) {
	s, path := benchServer(b)
	s.Register("volume-status", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Name string `json:"name"`
		}
		if err := DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return map[string]any{"name": a.Name, "size": 1 << 30, "mapped": 12345}, nil
	})
	ctx := context.Background()
	c, err := Dial(ctx, path)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	args := map[string]string{"name": "vol0"}
	var out struct{ Mapped int }
	for b.Loop() {
		if err := c.Execute(ctx, "volume-status", args, &out); err != nil || out.Mapped != 12345 {
			b.Fatal(out, err)
		}
	}
}

// BenchmarkEmit measures delivering one event to four clients, in
// batches that the clients read before the next (a paced stream, as the
// drop policy expects).
func BenchmarkEmit(b *testing.B) {
	s, path := benchServer(b)
	const clients, batch = 4, 100
	var progress []chan struct{}
	for range clients {
		nc, err := net.Dial("unix", path)
		if err != nil {
			b.Fatal(err)
		}
		defer nc.Close()
		r := bufio.NewReader(nc)
		r.ReadBytes('\n') // greeting
		nc.Write([]byte(`{"execute":"qmp_capabilities"}`))
		r.ReadBytes('\n')
		ch := make(chan struct{}, 1)
		progress = append(progress, ch)
		go func() {
			for n := 1; ; n++ {
				if _, err := r.ReadBytes('\n'); err != nil {
					close(ch)
					return
				}
				if n%batch == 0 {
					ch <- struct{}{}
				}
			}
		}()
	}
	data := map[string]any{"pool": "p0", "free": 4096}
	events := 0
	for b.Loop() {
		s.Emit("POOL_LOW_WATER", data)
		events++
		if events%batch == 0 {
			for _, ch := range progress {
				if _, ok := <-ch; !ok {
					b.Fatal("client dropped")
				}
			}
		}
	}
}
