package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestClient(t *testing.T) {
	ts := startServer(t, Options{Version: "3.1.4"})
	ts.Register("sum", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			A int `json:"a"`
			B int `json:"b"`
		}
		if err := DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return a.A + a.B, nil
	})
	ts.Register("missing", func(context.Context, json.RawMessage) (any, error) {
		return nil, &Error{Class: ClassDeviceNotFound, Desc: "no volume x"}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, ts.path)
	if err != nil {
		t.Fatal(err)
	}
	if g := c.Greeting(); g.QMP.Version.QEMU.Major != 3 || g.QMP.Version.QEMU.Micro != 4 || g.QMP.Version.Package != "thinblk 3.1.4" {
		t.Fatalf("greeting %+v", g)
	}

	// Concurrent calls get their own replies.
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var n int
			if err := c.Execute(ctx, "sum", map[string]int{"a": i, "b": 1000}, &n); err != nil || n != i+1000 {
				t.Errorf("sum %d: %d, %v", i, n, err)
			}
		}()
	}
	wg.Wait()

	var qe *Error
	if err := c.Execute(ctx, "missing", nil, nil); !errors.As(err, &qe) || qe.Class != ClassDeviceNotFound || qe.Desc != "no volume x" {
		t.Fatalf("error reply: %#v", err)
	}
	if err := c.Execute(ctx, "sum", map[string]any{"a": "x", "b": 1}, nil); !errors.As(err, &qe) || !strings.Contains(qe.Desc, "'a'") {
		t.Fatalf("bad argument: %v", err)
	}
	if err := c.Execute(ctx, "sum", func() {}, nil); err == nil {
		t.Fatal("unencodable arguments accepted")
	}

	ts.Emit("THING", map[string]string{"k": "v"})
	select {
	case ev := <-c.Events():
		if ev.Event != "THING" || string(ev.Data) != `{"k":"v"}` {
			t.Fatalf("event %+v", ev)
		}
	case <-ctx.Done():
		t.Fatal("no event")
	}

	// The server going away fails calls and closes the event channel.
	ts.Close()
	if err := c.Execute(ctx, "sum", nil, nil); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("after server close: %v", err)
	}
	select {
	case _, ok := <-c.Events():
		if ok {
			t.Fatal("event after close")
		}
	case <-ctx.Done():
		t.Fatal("events channel not closed")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestClientContext(t *testing.T) {
	ts := startServer(t, Options{})
	release := make(chan struct{})
	ts.Register("slow", func(ctx context.Context, _ json.RawMessage) (any, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return "late", nil
	})
	c, err := Dial(context.Background(), ts.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "slow", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want deadline exceeded, got %v", err)
	}
	// The late reply is dropped and the next call gets its own.
	close(release)
	var v struct{ Package string }
	if err := c.Execute(context.Background(), "query-version", nil, &v); err != nil || !strings.HasPrefix(v.Package, "thinblk") {
		t.Fatalf("after a timed-out call: %+v %v", v, err)
	}
}

// TestDialNotQMP checks that Dial fails cleanly on servers that do not
// speak QMP, and that the handshake honours the context.
func TestDialNotQMP(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name  string
		serve func(net.Conn)
	}{
		{"silent", func(nc net.Conn) { time.Sleep(time.Second) }},
		{"garbage", func(nc net.Conn) { nc.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) }},
		{"json-not-greeting", func(nc net.Conn) { nc.Write([]byte(`{"hello":1}` + "\n")) }},
		{"refuses-capabilities", func(nc net.Conn) {
			nc.Write([]byte(`{"QMP":{"version":{},"capabilities":[]}}` + "\n"))
			buf := make([]byte, 512)
			nc.Read(buf)
			nc.Write([]byte(`{"error":{"class":"GenericError","desc":"no"},"id":1}` + "\n"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".sock")
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				nc, err := ln.Accept()
				if err != nil {
					return
				}
				defer nc.Close()
				tc.serve(nc)
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			c, err := Dial(ctx, path)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("Dial took %v", time.Since(start))
			}
		})
	}
}
