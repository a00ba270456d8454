package qmp

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"testing"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"

	"github.com/thinblk/thinblk/internal/testenv"
)

// These tests drive the server with go-qemu's QMP client, which libvirt-
// style Go tools use against QEMU, to prove the two interoperate.

func goqemuMonitor(t *testing.T, path string) *goqmp.SocketMonitor {
	t.Helper()
	mon, err := goqmp.NewSocketMonitor("unix", path, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		t.Fatalf("go-qemu Connect: %v", err)
	}
	t.Cleanup(func() { mon.Disconnect() })
	return mon
}

func TestGoQemuCommands(t *testing.T) {
	ts := startServer(t, Options{Version: "2.7.1"})
	type volume struct {
		Name string `json:"name"`
		Size uint64 `json:"size"`
	}
	ts.Register("volume-create", func(_ context.Context, raw json.RawMessage) (any, error) {
		var v volume
		if err := DecodeArgs(raw, &v); err != nil {
			return nil, err
		}
		return v, nil
	})
	mon := goqemuMonitor(t, ts.path)
	if got := mon.Version.String(); got != "2.7.1" || mon.Version.Package != "thinblk 2.7.1" {
		t.Fatalf("go-qemu sees version %s, package %q", got, mon.Version.Package)
	}

	cmd, _ := json.Marshal(goqmp.Command{Execute: "volume-create", Args: volume{Name: "vol0", Size: 1 << 30}})
	out, err := mon.Run(cmd)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	var r struct{ Return volume }
	if err := json.Unmarshal(out, &r); err != nil || r.Return != (volume{"vol0", 1 << 30}) {
		t.Fatalf("reply %s: %v", out, err)
	}

	// Errors reach go-qemu as errors carrying the description.
	for _, tc := range []struct{ cmd, desc string }{
		{`{"execute":"volume-create","arguments":{"name":"v","size":"big"}}`, "Invalid parameter type for 'size'"},
		{`{"execute":"volume-create","arguments":{"name":"v"}}`, "Parameter 'size' is missing"},
		{`{"execute":"no-such"}`, "The command no-such has not been found"},
		{`{"execute":"qmp_capabilities"}`, "Capabilities negotiation is already complete"},
		{`{"execute":"volume-create",}`, "JSON parse error"},
		{`[]`, "QMP input must be a JSON object"},
	} {
		_, err := mon.Run([]byte(tc.cmd))
		if err == nil || !strings.Contains(err.Error(), tc.desc) {
			t.Errorf("%s: got %v, want an error with %q", tc.cmd, err, tc.desc)
		}
	}

	// query-version as go-qemu's raw monitor would decode it.
	out, err = mon.Run([]byte(`{"execute":"query-version"}`))
	if err != nil {
		t.Fatal(err)
	}
	var v struct{ Return goqmp.Version }
	if err := json.Unmarshal(out, &v); err != nil || v.Return.String() != "2.7.1" {
		t.Fatalf("query-version %s: %v", out, err)
	}
}

func TestGoQemuEvents(t *testing.T) {
	ts := startServer(t, Options{})
	mons := []*goqmp.SocketMonitor{goqemuMonitor(t, ts.path), goqemuMonitor(t, ts.path)}
	var streams []<-chan goqmp.Event
	for _, m := range mons {
		ch, err := m.Events(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, ch)
	}
	testenv.WaitFor(t, "both clients in command mode", func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		n := 0
		for c := range ts.clients {
			if c.commandMode.Load() {
				n++
			}
		}
		return n == 2
	})
	ts.Emit("POOL_LOW_WATER", map[string]any{"pool": "p0", "free-bytes": 4096})
	ts.Emit("SNAPSHOT_DONE", map[string]any{"volume": "vol0", "snapshot": "s1"})
	for i, ch := range streams {
		for _, want := range []string{"POOL_LOW_WATER", "SNAPSHOT_DONE"} {
			select {
			case ev := <-ch:
				if ev.Event != want || ev.Timestamp.Seconds == 0 {
					t.Fatalf("client %d: event %+v, want %s", i, ev, want)
				}
				if want == "POOL_LOW_WATER" && (ev.Data["pool"] != "p0" || ev.Data["free-bytes"] != 4096.0) {
					t.Fatalf("client %d: data %v", i, ev.Data)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("client %d: no %s event", i, want)
			}
		}
	}
	// Commands still work between events.
	if _, err := mons[0].Run([]byte(`{"execute":"query-commands"}`)); err != nil {
		t.Fatal(err)
	}
}

// TestServeTCPWithGoQemu serves a listener that is not a unix socket.
func TestServeTCPWithGoQemu(t *testing.T) {
	s := NewServer(Options{Version: "0.1.0"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), ln) }()
	mon, err := goqmp.NewSocketMonitor("tcp", ln.Addr().String(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		t.Fatal(err)
	}
	out, err := mon.Run([]byte(`{"execute":"query-version"}`))
	if err != nil || !strings.Contains(string(out), `"package":"thinblk 0.1.0"`) {
		t.Fatalf("query-version over TCP: %s %v", out, err)
	}
	mon.Disconnect()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
