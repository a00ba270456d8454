package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

func TestGreeting(t *testing.T) {
	ts := startServer(t, Options{Version: "v4.5.6-7-gabcdef"})
	rc := dialRaw(t, ts.path)
	m := rc.readMsg()
	want := map[string]any{"QMP": map[string]any{
		"version": map[string]any{
			"qemu":    map[string]any{"major": 4.0, "minor": 5.0, "micro": 6.0},
			"package": "thinblk v4.5.6-7-gabcdef",
		},
		"capabilities": []any{},
	}}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("greeting %v, want %v", m, want)
	}
}

func TestNegotiationMode(t *testing.T) {
	ts := startServer(t, Options{})
	ts.Register("noop", func(context.Context, json.RawMessage) (any, error) { return nil, nil })
	rc := dialRaw(t, ts.path)
	rc.readMsg()

	// Only qmp_capabilities runs; the id is still echoed.
	rc.send(`{"execute":"query-version","id":"a"}`)
	m := rc.expectError(ClassCommandNotFound, "Expecting capabilities negotiation")
	if m["id"] != "a" {
		t.Fatalf("id not echoed: %v", m)
	}
	rc.send(`{"execute":"noop"}`)
	rc.expectError(ClassCommandNotFound, "Expecting capabilities negotiation")
	rc.send(`{"execute":"no-such-command"}`)
	rc.expectError(ClassCommandNotFound, "Expecting capabilities negotiation")

	// No events before command mode.
	ts.Emit("EARLY", nil)

	// No capability is offered, so enabling one fails and stays in
	// negotiation mode.
	rc.send(`{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}`)
	rc.expectError(ClassGenericError, "Capability 'oob' not available")
	rc.send(`{"execute":"qmp_capabilities","arguments":{"bogus":1}}`)
	rc.expectError(ClassGenericError, "Parameter 'bogus' is unexpected")
	rc.send(`{"execute":"noop"}`)
	rc.expectError(ClassCommandNotFound, "Expecting capabilities negotiation")

	rc.send(`{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":2}`)
	m = rc.readMsg()
	if !reflect.DeepEqual(m, map[string]any{"return": map[string]any{}, "id": 2.0}) {
		t.Fatalf("qmp_capabilities reply %v (an event before it?)", m)
	}
	rc.send(`{"execute":"qmp_capabilities","id":3}`)
	rc.expectError(ClassCommandNotFound, "Capabilities negotiation is already complete")
	rc.send(`{"execute":"noop","id":4}`)
	if m := rc.readMsg(); !reflect.DeepEqual(m, map[string]any{"return": map[string]any{}, "id": 4.0}) {
		t.Fatalf("noop reply %v", m)
	}
}

func TestIDsEchoed(t *testing.T) {
	ts := startServer(t, Options{})
	ts.Register("echo", func(_ context.Context, args json.RawMessage) (any, error) { return args, nil })
	rc := negotiated(t, ts.path)
	for _, id := range []string{`1`, `-7.5`, `"x"`, `"ünïcode"`, `{"a":[1,{"b":null}]}`, `[1,"2"]`, `true`, `null`} {
		rc.send(`{"id":` + id + `,"execute":"echo","arguments":{"v":` + id + `}}`)
		line := rc.readLine()
		var got struct {
			Return struct{ V json.RawMessage }
			ID     json.RawMessage
		}
		if err := json.Unmarshal([]byte(line), &got); err != nil {
			t.Fatal(err)
		}
		if !jsonEqual(t, got.ID, []byte(id)) || !jsonEqual(t, got.Return.V, []byte(id)) {
			t.Errorf("id %s: reply %q", id, line)
		}
	}
	// Without an id, the reply has none.
	rc.send(`{"execute":"echo"}`)
	if m := rc.readMsg(); !reflect.DeepEqual(m, map[string]any{"return": map[string]any{}}) {
		t.Fatalf("reply without id: %v", m)
	}
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal(a, &va); err != nil {
		t.Fatalf("%q: %v", a, err)
	}
	if err := json.Unmarshal(b, &vb); err != nil {
		t.Fatalf("%q: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

func TestBuiltinQueries(t *testing.T) {
	ts := startServer(t, Options{Version: "0.9"})
	ts.Register("volume-list", func(context.Context, json.RawMessage) (any, error) { return []string{}, nil })
	rc := negotiated(t, ts.path)
	rc.send(`{"execute":"query-commands"}`)
	m := rc.readMsg()
	want := []any{
		map[string]any{"name": "qmp_capabilities"},
		map[string]any{"name": "query-commands"},
		map[string]any{"name": "query-version"},
		map[string]any{"name": "volume-list"},
	}
	if !reflect.DeepEqual(m["return"], want) {
		t.Fatalf("query-commands: %v", m)
	}
	rc.send(`{"execute":"query-version"}`)
	m = rc.readMsg()
	wantV := map[string]any{"qemu": map[string]any{"major": 0.0, "minor": 9.0, "micro": 0.0}, "package": "thinblk 0.9"}
	if !reflect.DeepEqual(m["return"], wantV) {
		t.Fatalf("query-version: %v", m)
	}
}

// TestMalformedInput sends bad input and checks the QMP error reply, then
// that the connection still works.
func TestMalformedInput(t *testing.T) {
	ts := startServer(t, Options{})
	ts.Register("add", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			A int `json:"a"`
			B int `json:"b,omitempty"`
		}
		if err := DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return a.A + a.B, nil
	})
	cases := []struct {
		in, class, desc string
		id              any // expected id in the reply, nil for none
	}{
		{`{"execute": }`, ClassGenericError, "JSON parse error", nil},
		{`{"execute":"add",}`, ClassGenericError, "JSON parse error", nil},
		{`]`, ClassGenericError, "JSON parse error", nil},
		{`nonsense `, ClassGenericError, "JSON parse error", nil},
		{`42 `, ClassGenericError, "QMP input must be a JSON object", nil},
		{`"execute"`, ClassGenericError, "QMP input must be a JSON object", nil},
		{`[{"execute":"add"}]`, ClassGenericError, "QMP input must be a JSON object", nil},
		{`{}`, ClassGenericError, "QMP input lacks member 'execute'", nil},
		{`{"id":5}`, ClassGenericError, "QMP input lacks member 'execute'", 5.0},
		{`{"execute":7,"id":"x"}`, ClassGenericError, "QMP input member 'execute' must be a string", "x"},
		{`{"execute":null}`, ClassGenericError, "QMP input member 'execute' must be a string", nil},
		{`{"execute":"add","arguments":[1]}`, ClassGenericError, "QMP input member 'arguments' must be an object", nil},
		{`{"execute":"add","arguments":null}`, ClassGenericError, "QMP input member 'arguments' must be an object", nil},
		{`{"execute":"add","extra":1,"id":1}`, ClassGenericError, "QMP input member 'extra' is unexpected", 1.0},
		{`{"exec-oob":"add","id":2}`, ClassGenericError, "'exec-oob' is unexpected", 2.0},
		{`{"execute":"nope","id":3}`, ClassCommandNotFound, "The command nope has not been found", 3.0},
		{`{"execute":"add","arguments":{"a":"1"},"id":4}`, ClassGenericError, "Invalid parameter type for 'a', expected: integer", 4.0},
		{`{"execute":"add","arguments":{"a":1,"c":2}}`, ClassGenericError, "Parameter 'c' is unexpected", nil},
		{`{"execute":"add","arguments":{"b":2}}`, ClassGenericError, "Parameter 'a' is missing", nil},
		{`{"execute":"add","arguments":{"a":null}}`, ClassGenericError, "Invalid parameter type for 'a', expected: integer", nil},
		{`{"execute":"add","arguments":{"a":1e400}}`, ClassGenericError, "Parameter 'a' expects integer, got number 1e400", nil},
		{"\x01", ClassGenericError, "JSON parse error, invalid byte 0x01", nil},
		{`{"execute":"add",` + "\xff", ClassGenericError, "JSON parse error, invalid byte 0xff", nil},
		{"{\"execute\":\"add\",\x00}", ClassGenericError, "JSON parse error, invalid byte 0x00", nil},
		{`{"execute":"add","arguments":{"a":"` + "\n" + `"}}`, ClassGenericError, "JSON parse error", nil},
		{`{"execute":"add","arguments":{"a":"\u00zz"}}`, ClassGenericError, "JSON parse error", nil},
	}
	rc := negotiated(t, ts.path)
	for _, tc := range cases {
		rc.send(tc.in)
		m := rc.expectError(tc.class, tc.desc)
		if m["id"] != tc.id {
			t.Errorf("%q: reply id %v, want %v", tc.in, m["id"], tc.id)
		}
		// A NUL byte is a lexical error that drops the message so far;
		// its tail is then garbage of its own.
		if strings.Contains(tc.in, "\x00") {
			rc.expectError(ClassGenericError, "JSON parse error")
		}
		// The stream is back in sync: a good command works.
		rc.send(`{"execute":"add","arguments":{"a":2,"b":3},"id":"ok"}`)
		if m := rc.readMsg(); m["return"] != 5.0 || m["id"] != "ok" {
			t.Fatalf("after %q: %v", tc.in, m)
		}
	}
}

// TestStreamFraming checks that messages need no separator and may arrive
// in pieces, as python's QMP clients and go-qemu's Run send them.
func TestStreamFraming(t *testing.T) {
	ts := startServer(t, Options{})
	ts.Register("echo", func(_ context.Context, args json.RawMessage) (any, error) { return args, nil })
	rc := negotiated(t, ts.path)
	rc.send(`{"execute":"echo","id":1}{"execute":"echo","arguments":{"s":"}{\"]"},"id":2}` + "\t\r\n " + `{"execute":"echo","id":3}`)
	for want := 1.0; want <= 3; want++ {
		if m := rc.readMsg(); m["id"] != want {
			t.Fatalf("want reply %v, got %v", want, m)
		}
	}
	msg := `{"execute":"echo","arguments":{"nested":[[{"x":"\\"}]]},"id":"slow"}`
	for i := range msg {
		rc.send(msg[i : i+1])
	}
	if m := rc.readMsg(); m["id"] != "slow" {
		t.Fatalf("byte-by-byte message: %v", m)
	}
}

func TestHandlerErrors(t *testing.T) {
	ts := startServer(t, Options{})
	ts.Register("fail-plain", func(context.Context, json.RawMessage) (any, error) {
		return nil, errors.New("volume vol0 is busy")
	})
	ts.Register("fail-class", func(context.Context, json.RawMessage) (any, error) {
		return nil, &Error{Class: ClassDeviceNotFound, Desc: "no volume vol9"}
	})
	ts.Register("fail-wrapped", func(context.Context, json.RawMessage) (any, error) {
		return nil, fmt.Errorf("snapshot s1: %w", &Error{Class: ClassDeviceNotActive, Desc: "volume not served"})
	})
	ts.Register("panic", func(context.Context, json.RawMessage) (any, error) { panic("handler bug") })
	ts.Register("bad-result", func(context.Context, json.RawMessage) (any, error) { return func() {}, nil })
	rc := negotiated(t, ts.path)
	rc.send(`{"execute":"fail-plain","id":1}`)
	rc.expectError(ClassGenericError, "volume vol0 is busy")
	rc.send(`{"execute":"fail-class","id":2}`)
	rc.expectError(ClassDeviceNotFound, "no volume vol9")
	rc.send(`{"execute":"fail-wrapped","id":3}`)
	rc.expectError(ClassDeviceNotActive, "snapshot s1: volume not served")
	rc.send(`{"execute":"panic","id":4}`)
	m := rc.expectError(ClassGenericError, "internal error: command panic failed")
	if m["id"] != 4.0 {
		t.Fatalf("panic reply lost the id: %v", m)
	}
	if !strings.Contains(ts.logs.String(), "handler bug") {
		t.Error("panic not logged")
	}
	rc.send(`{"execute":"bad-result"}`)
	rc.expectError(ClassGenericError, "cannot be encoded")
	// The server and this connection survive.
	rc.send(`{"execute":"query-version","id":5}`)
	if m := rc.readMsg(); m["id"] != 5.0 || m["return"] == nil {
		t.Fatalf("after handler failures: %v", m)
	}
}

func TestEventsToEveryClient(t *testing.T) {
	ts := startServer(t, Options{})
	var clients []*rawConn
	for range 3 {
		clients = append(clients, negotiated(t, ts.path))
	}
	waiting := dialRaw(t, ts.path) // stays in negotiation mode
	waiting.readMsg()

	ts.Emit("VOLUME_LOW_WATER", map[string]any{"volume": "vol0", "free": 12})
	ts.Emit("NO_DATA", nil)
	before := time.Now().Unix()
	for i, rc := range clients {
		m := rc.readMsg()
		if m["event"] != "VOLUME_LOW_WATER" || !reflect.DeepEqual(m["data"], map[string]any{"volume": "vol0", "free": 12.0}) {
			t.Fatalf("client %d: %v", i, m)
		}
		ts := m["timestamp"].(map[string]any)
		if s := ts["seconds"].(float64); s < float64(before-5) || s > float64(before+5) {
			t.Errorf("timestamp %v", ts)
		}
		if us := ts["microseconds"].(float64); us < 0 || us >= 1e6 {
			t.Errorf("timestamp %v", ts)
		}
		m = rc.readMsg()
		if _, has := m["data"]; m["event"] != "NO_DATA" || has {
			t.Fatalf("client %d: %v", i, m)
		}
	}
	// The negotiating client got nothing: its next message is the reply.
	waiting.send(`{"execute":"qmp_capabilities","id":"w"}`)
	if m := waiting.readMsg(); m["id"] != "w" {
		t.Fatalf("client in negotiation mode got %v", m)
	}
	// Bad event data is not sent.
	ts.Emit("BAD", 42)
	ts.Emit("", nil)
	ts.Emit("AFTER", struct {
		N int `json:"n"`
	}{7})
	if m := clients[0].readMsg(); m["event"] != "AFTER" {
		t.Fatalf("got %v", m)
	}
	if !strings.Contains(ts.logs.String(), "event data must be a JSON object") {
		t.Error("bad event data not logged")
	}
}

// TestSlowClientDropped checks that a client that stops reading is dropped
// when its queue overflows, and others get every event meanwhile.
func TestSlowClientDropped(t *testing.T) {
	ts := startServer(t, Options{QueueLength: 32, WriteTimeout: time.Minute})
	slow := negotiated(t, ts.path)
	fast := negotiated(t, ts.path)

	// Batches smaller than the queue, each read by the fast client before
	// the next: the fast client never falls behind, while the slow one's
	// socket buffer and queue fill up.
	const batches, batch = 40, 16
	big := strings.Repeat("x", 4096)
	start := time.Now()
	for b := range batches {
		for i := range batch {
			ts.Emit("E", map[string]any{"i": b*batch + i, "pad": big})
		}
		for i := range batch {
			m := fast.readMsg()
			if m["event"] != "E" || m["data"].(map[string]any)["i"] != float64(b*batch+i) {
				t.Fatalf("fast client: event %d: got %.100v", b*batch+i, m)
			}
		}
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("%d events took %v: Emit must not wait for slow clients", batches*batch, d)
	}
	slow.expectClosed()
	testenv.WaitFor(t, "slow client removed", func() bool { return ts.clientCount() == 1 })
	if !strings.Contains(ts.logs.String(), "queue overflowed") {
		t.Error("drop not logged")
	}
}

// TestStalledReaderDropped checks the write timeout: a client that sends
// commands but never reads replies is dropped, not kept forever.
func TestStalledReaderDropped(t *testing.T) {
	ts := startServer(t, Options{QueueLength: 4, WriteTimeout: 200 * time.Millisecond})
	ts.Register("big", func(context.Context, json.RawMessage) (any, error) { return strings.Repeat("y", 64<<10), nil })
	rc := negotiated(t, ts.path)
	other := negotiated(t, ts.path)
	go func() {
		for range 100 {
			if _, err := rc.nc.Write([]byte(`{"execute":"big"}`)); err != nil {
				return
			}
		}
	}()
	testenv.WaitFor(t, "stalled client dropped", func() bool { return ts.clientCount() == 1 })
	if !strings.Contains(ts.logs.String(), "stopped reading") {
		t.Error("drop not logged")
	}
	other.send(`{"execute":"query-version","id":1}`)
	if m := other.readMsg(); m["id"] != 1.0 {
		t.Fatalf("other client: %v", m)
	}
}

func TestHugeMessage(t *testing.T) {
	ts := startServer(t, Options{MaxMessageSize: 64 << 10})
	rc := negotiated(t, ts.path)
	huge := `{"execute":"query-version","arguments":{"pad":"` + strings.Repeat("z", 1<<20) + `"},"id":1}`
	go rc.nc.Write([]byte(huge)) // the reply comes while it is still being sent
	rc.expectError(ClassGenericError, "QMP input too large: more than 65536 bytes")
	if logs := ts.logs.String(); !strings.Contains(logs, "level=WARN msg=\"QMP message rejected and skipped\"") ||
		!strings.Contains(logs, `err="message too large"`) {
		t.Errorf("huge message not logged: %s", logs)
	}
	rc.send(`{"execute":"query-version","id":2}`)
	if m := rc.readMsg(); m["id"] != 2.0 {
		t.Fatalf("after huge message: %v", m)
	}
	// Deep nesting is cut off the same way.
	rc.send(strings.Repeat("[", 5000) + strings.Repeat("]", 5000))
	rc.expectError(ClassGenericError, "JSON nesting too deep")
	rc.send(`{"execute":"query-version","id":3}`)
	if m := rc.readMsg(); m["id"] != 3.0 {
		t.Fatalf("after deep message: %v", m)
	}
}

func TestDefaultMessageLimit(t *testing.T) {
	ts := startServer(t, Options{})
	ts.Register("len", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			S string `json:"s"`
		}
		if err := DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return len(a.S), nil
	})
	rc := negotiated(t, ts.path)
	under := `{"execute":"len","arguments":{"s":"` + strings.Repeat("a", DefaultMaxMessageSize-100) + `"}}`
	go rc.nc.Write([]byte(under))
	if m := rc.readMsg(); m["return"] != float64(DefaultMaxMessageSize-100) {
		t.Fatalf("message just under 1 MiB: %v", m)
	}
	over := `{"execute":"len","arguments":{"s":"` + strings.Repeat("a", DefaultMaxMessageSize) + `"}}`
	go rc.nc.Write([]byte(over))
	rc.expectError(ClassGenericError, "QMP input too large")
}

func TestTimeouts(t *testing.T) {
	ts := startServer(t, Options{HandshakeTimeout: 300 * time.Millisecond, MessageTimeout: 300 * time.Millisecond})
	silent := dialRaw(t, ts.path)
	silent.readMsg()
	silent.expectClosed()
	if !strings.Contains(ts.logs.String(), "no capabilities negotiation in time") {
		t.Error("handshake timeout not logged")
	}

	// An idle client in command mode stays; one that starts a message and
	// never finishes it (slowloris) is dropped.
	idle := negotiated(t, ts.path)
	loris := negotiated(t, ts.path)
	loris.send(`{"execute":`)
	loris.expectClosed()
	if !strings.Contains(ts.logs.String(), "message not completed in time") {
		t.Error("message timeout not logged")
	}
	idle.send(`{"execute":"query-version","id":1}`)
	if m := idle.readMsg(); m["id"] != 1.0 {
		t.Fatalf("idle client: %v", m)
	}
}

func TestMaxClients(t *testing.T) {
	ts := startServer(t, Options{MaxClients: 2})
	a := negotiated(t, ts.path)
	negotiated(t, ts.path)
	extra := dialRaw(t, ts.path)
	extra.expectError(ClassGenericError, "too many QMP clients")
	extra.expectClosed()
	a.nc.Close()
	testenv.WaitFor(t, "slot freed", func() bool { return ts.clientCount() == 1 })
	negotiated(t, ts.path)
}

func TestCloseCancelsHandlersAndRemovesSocket(t *testing.T) {
	ts := startServer(t, Options{})
	started := make(chan struct{})
	var cancelled bool
	ts.Register("wait", func(ctx context.Context, _ json.RawMessage) (any, error) {
		close(started)
		<-ctx.Done()
		cancelled = true
		return nil, ctx.Err()
	})
	rc := negotiated(t, ts.path)
	rc.send(`{"execute":"wait"}`)
	<-started
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	if !cancelled {
		t.Fatal("Close returned before the handler saw its context cancelled")
	}
	if _, err := os.Stat(ts.path); !os.IsNotExist(err) {
		t.Fatalf("socket still there after Close: %v", err)
	}
	rc.expectClosed()
	if err := <-ts.done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	ts.done <- nil // for the cleanup
}

func TestServeContextCancel(t *testing.T) {
	s := NewServer(Options{})
	path := filepath.Join(t.TempDir(), "q.sock")
	ln, err := s.ListenUnix(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	negotiated(t, path)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its context was cancelled")
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket still there when Serve returned: %v", err)
	}
	if err := s.Serve(context.Background(), ln); err == nil {
		t.Fatal("Serve after Close succeeded")
	}
}

func TestListenUnixSocketFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "q.sock")

	// Close removes the socket even if Serve never ran.
	s0 := NewServer(Options{})
	if _, err := s0.ListenUnix(path, 0); err != nil {
		t.Fatal(err)
	}
	if err := s0.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}
	if _, err := s0.ListenUnix(path, 0); err == nil {
		t.Fatal("ListenUnix after Close succeeded")
	}

	// The mode is applied.
	s1 := NewServer(Options{})
	if _, err := s1.ListenUnix(path, 0o660); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket file %v, %v", fi, err)
	}
	// A live socket is not taken over.
	s2 := NewServer(Options{})
	if _, err := s2.ListenUnix(path, 0); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second listener on a live socket: %v", err)
	}
	// A stale one (its listener gone without removing it) is replaced.
	s1.mu.Lock()
	for ln := range s1.listeners {
		ln.Close()
	}
	s1.sockets = nil // forget it, as a crashed process would
	s1.mu.Unlock()
	s1.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket should still exist: %v", err)
	}
	ln, err := s2.ListenUnix(path, 0)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	go s2.Serve(context.Background(), ln)
	negotiated(t, path)
	// Close leaves a socket that is no longer ours alone.
	os.Remove(path)
	other := filepath.Join(dir, "other")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(other, path); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal("Close removed a file that was not its socket")
	}
	// A regular file in the way is an error, not removed.
	s3 := NewServer(Options{})
	defer s3.Close()
	if _, err := s3.ListenUnix(path, 0); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listen over a regular file: %v", err)
	}
}

func TestRegisterPanics(t *testing.T) {
	s := NewServer(Options{})
	defer s.Close()
	for _, name := range []string{"qmp_capabilities", "query-version", ""} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Register(%q) did not panic", name)
				}
			}()
			s.Register(name, func(context.Context, json.RawMessage) (any, error) { return nil, nil })
		}()
	}
}

// TestCommandsInOrder checks that one client's commands run one at a
// time, in order, while another client's are served meanwhile.
func TestCommandsInOrder(t *testing.T) {
	ts := startServer(t, Options{})
	block := make(chan struct{})
	var mu sync.Mutex
	var order []int
	ts.Register("step", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			N int `json:"n"`
		}
		if err := DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		if a.N == 0 {
			<-block
		}
		mu.Lock()
		order = append(order, a.N)
		mu.Unlock()
		return a.N, nil
	})
	a := negotiated(t, ts.path)
	b := negotiated(t, ts.path)
	a.send(`{"execute":"step","arguments":{"n":0}}{"execute":"step","arguments":{"n":1}}`)
	b.send(`{"execute":"step","arguments":{"n":2}}`)
	if m := b.readMsg(); m["return"] != 2.0 {
		t.Fatalf("b: %v", m)
	}
	close(block)
	for want := 0.0; want < 2; want++ {
		if m := a.readMsg(); m["return"] != want {
			t.Fatalf("a: %v", m)
		}
	}
	if !reflect.DeepEqual(order, []int{2, 0, 1}) {
		t.Fatalf("order %v", order)
	}
}

// TestQueueBytesBound checks that a client pipelining commands with big
// replies and not reading cannot make the server queue more than
// QueueBytes for it, and still gets every reply once it reads.
func TestQueueBytesBound(t *testing.T) {
	const budget = 1 << 20
	ts := startServer(t, Options{QueueBytes: budget, WriteTimeout: time.Minute})
	reply := strings.Repeat("r", 200<<10)
	ts.Register("big", func(context.Context, json.RawMessage) (any, error) { return reply, nil })
	rc := negotiated(t, ts.path)
	const n = 40 // 8 MB of replies
	go func() {
		for i := range n {
			if _, err := fmt.Fprintf(rc.nc, `{"execute":"big","id":%d}`, i); err != nil {
				return
			}
		}
	}()
	var c *conn
	testenv.WaitFor(t, "the queue to fill", func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		for cc := range ts.clients {
			c = cc
		}
		return c != nil && c.queued.Load() > budget/2
	})
	time.Sleep(200 * time.Millisecond) // let it try to queue more
	for i := range n {
		m := rc.readMsg()
		if m["id"] != float64(i) || m["return"] != reply {
			t.Fatalf("reply %d: id %v", i, m["id"])
		}
	}
	if hw := c.queuedMax.Load(); hw > budget {
		t.Fatalf("queued %d bytes for one client; the budget is %d", hw, budget)
	}

	// Events that do not fit the byte budget drop the client: the first
	// fits the empty queue and blocks in the write, the second overflows.
	ts.Emit("BIG", map[string]string{"pad": strings.Repeat("e", budget)})
	ts.Emit("BIG", map[string]string{"pad": strings.Repeat("e", budget)})
	rc.expectClosed()
	if !strings.Contains(ts.logs.String(), "queue overflowed") {
		t.Error("drop not logged")
	}
}

// TestSteadyStreamNotTimedOut checks that the message timeout applies to
// one message: a client that keeps sending commands, each read ending in
// the middle of one, is not dropped.
func TestSteadyStreamNotTimedOut(t *testing.T) {
	ts := startServer(t, Options{MessageTimeout: 300 * time.Millisecond})
	rc := negotiated(t, ts.path)
	msg := `{"execute":"query-version","id":1}`
	half := len(msg) / 2
	rc.send(msg[:half])
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		rc.send(msg[half:] + msg[:half]) // ends one message, starts the next
		if m := rc.readMsg(); m["id"] != 1.0 {
			t.Fatalf("got %v", m)
		}
	}
	if strings.Contains(ts.logs.String(), "not completed in time") {
		t.Fatal("a client making progress was dropped")
	}
}
