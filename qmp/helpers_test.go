package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

type testServer struct {
	*Server
	path string
	logs *testenv.Buffer
	done chan error // Serve's result
}

// startServer runs a server on a fresh socket; it is closed at cleanup.
func startServer(t *testing.T, opts Options) *testServer {
	t.Helper()
	logs := &testenv.Buffer{}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if opts.Version == "" {
		opts.Version = "1.2.3-test"
	}
	s := NewServer(opts)
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := s.ListenUnix(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: s, path: path, logs: logs, done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		select {
		case err := <-ts.done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after Close")
		}
	})
	return ts
}

func (ts *testServer) clientCount() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.clients)
}

// rawConn speaks the wire protocol by hand.
type rawConn struct {
	t  *testing.T
	nc net.Conn
	r  *bufio.Reader
}

func dialRaw(t *testing.T, path string) *rawConn {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &rawConn{t: t, nc: nc, r: bufio.NewReaderSize(nc, 1<<20)}
}

// negotiated dials, reads the greeting and enters command mode.
func negotiated(t *testing.T, path string) *rawConn {
	t.Helper()
	rc := dialRaw(t, path)
	rc.readMsg()
	rc.send(`{"execute":"qmp_capabilities"}`)
	if m := rc.readMsg(); m["return"] == nil {
		rc.t.Fatalf("qmp_capabilities failed: %v", m)
	}
	return rc
}

func (rc *rawConn) send(s string) {
	rc.t.Helper()
	rc.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(rc.nc, s); err != nil {
		rc.t.Fatalf("send: %v", err)
	}
}

// readLine reads one line from the server, which must end in CRLF.
func (rc *rawConn) readLine() string {
	rc.t.Helper()
	rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := rc.r.ReadString('\n')
	if err != nil {
		rc.t.Fatalf("read: %v (got %q)", err, line)
	}
	if !strings.HasSuffix(line, "\r\n") {
		rc.t.Fatalf("server line does not end in CRLF: %q", line)
	}
	for i := 0; i < len(line); i++ {
		if line[i] >= 0x80 {
			rc.t.Fatalf("server sent non-ASCII output: %q", line)
		}
	}
	return line
}

func (rc *rawConn) readMsg() map[string]any {
	rc.t.Helper()
	line := rc.readLine()
	var m map[string]any
	if err := json.Unmarshal([]byte(line), &m); err != nil {
		rc.t.Fatalf("server sent invalid JSON %q: %v", line, err)
	}
	return m
}

// readReply reads messages until one that is not an event.
func (rc *rawConn) readReply() map[string]any {
	rc.t.Helper()
	for {
		m := rc.readMsg()
		if _, ok := m["event"]; !ok {
			return m
		}
	}
}

// expectError reads a reply and checks it is an error of class whose
// description contains desc.
func (rc *rawConn) expectError(class, desc string) map[string]any {
	rc.t.Helper()
	m := rc.readReply()
	e, ok := m["error"].(map[string]any)
	if !ok {
		rc.t.Fatalf("want error %s %q, got %v", class, desc, m)
	}
	if e["class"] != class || !strings.Contains(e["desc"].(string), desc) {
		rc.t.Fatalf("want error %s %q, got %v", class, desc, e)
	}
	return m
}

// expectClosed checks that the server closed the connection.
func (rc *rawConn) expectClosed() {
	rc.t.Helper()
	rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		_, err := rc.r.ReadByte()
		if err == nil {
			continue // drain what was queued before the close
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			rc.t.Fatal("connection still open")
		}
		return
	}
}
