package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startQSD runs qemu-storage-daemon with a QMP monitor, the reference
// that the server is compared with and the client is tried against. Set
// THINBLK_SKIP_QSD=1 to skip on machines without it.
func startQSD(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		if os.Getenv("THINBLK_SKIP_QSD") == "1" {
			t.Skip("qemu-storage-daemon not installed and THINBLK_SKIP_QSD=1")
		}
		t.Fatalf("qemu-storage-daemon is needed (apt-get install qemu-utils), or set THINBLK_SKIP_QSD=1: %v", err)
	}
	path := filepath.Join(t.TempDir(), "qsd.sock")
	cmd := exec.Command(bin, "--chardev", "socket,id=m0,path="+path+",server=on,wait=off", "--monitor", "chardev=m0")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		// The socket file appears at bind, before listen, so wait for the
		// listening socket itself. Not by connecting: qsd's monitor serves one
		// client, and until it has seen a probe hang up it drops the next
		// connection (the test's Dial then read EOF for the greeting).
		if listening(path) {
			return path
		}
		select {
		case <-exited:
			t.Fatalf("qemu-storage-daemon exited: %s", stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-storage-daemon did not create its QMP socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestClientAgainstQSD runs the client against QEMU's own QMP server.
func TestClientAgainstQSD(t *testing.T) {
	path := startQSD(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	g := c.Greeting()
	if g.QMP.Version.QEMU.Major < 5 || !strings.Contains(strings.Join(g.QMP.Capabilities, ","), "oob") {
		t.Fatalf("greeting %+v", g)
	}
	var v struct {
		QEMU struct{ Major, Minor int }
	}
	if err := c.Execute(ctx, "query-version", nil, &v); err != nil || v.QEMU.Major != g.QMP.Version.QEMU.Major {
		t.Fatalf("query-version: %+v, %v", v, err)
	}
	var qe *Error
	err = c.Execute(ctx, "no-such-command", nil, nil)
	if !errors.As(err, &qe) || qe.Class != ClassCommandNotFound {
		t.Fatalf("unknown command: %v", err)
	}

	// Arguments, and an event: deleting an export announces it.
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	steps := []struct {
		cmd  string
		args any
	}{
		{"blockdev-add", map[string]any{"driver": "null-co", "node-name": "n0", "size": 1 << 20}},
		{"nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}}},
		{"block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "n0"}},
		{"block-export-del", map[string]any{"id": "e0"}},
	}
	for _, s := range steps {
		if err := c.Execute(ctx, s.cmd, s.args, nil); err != nil {
			t.Fatalf("%s: %v", s.cmd, err)
		}
	}
	select {
	case ev := <-c.Events():
		var data struct{ ID string }
		if ev.Event != "BLOCK_EXPORT_DELETED" || json.Unmarshal(ev.Data, &data) != nil || data.ID != "e0" {
			t.Fatalf("event %+v", ev)
		}
		if d := time.Since(ev.Time()); d < -time.Minute || d > time.Minute {
			t.Fatalf("event time %v", ev.Time())
		}
	case <-ctx.Done():
		t.Fatal("no BLOCK_EXPORT_DELETED event")
	}
	err = c.Execute(ctx, "blockdev-add", map[string]any{"driver": "null-co", "node-name": 7}, nil)
	if !errors.As(err, &qe) || qe.Class != ClassGenericError || !strings.Contains(qe.Desc, "node-name") {
		t.Fatalf("bad argument: %v", err)
	}
}

// TestConformanceWithQSD sends the same input to qemu-storage-daemon and
// to this server and compares the replies: error class, id echo, and the
// description where this server copies QEMU's wording.
func TestConformanceWithQSD(t *testing.T) {
	qsdPath := startQSD(t)
	ts := startServer(t, Options{})
	// The same schema as QEMU's blockdev-del, failing as QEMU does when
	// the node does not exist.
	ts.Register("blockdev-del", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			NodeName string `json:"node-name"`
		}
		if err := DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return nil, Errorf("Failed to find node with node-name='%s'", a.NodeName)
	})

	type step struct {
		in    string
		exact bool // descriptions must match exactly, not only their start
	}
	negotiation := []step{
		{`{"execute":"query-version","id":"a"}`, true},
		{`{"execute":"nope","id":[1]}`, true},
		{`{"execute":"qmp_capabilities","arguments":{"bogus":1},"id":0}`, true},
		{`{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}`, true},
	}
	command := []step{
		{`{"execute":"qmp_capabilities","id":2}`, true},
		{`{"execute": }`, false},
		{`]`, false},
		{`nonsense `, false},
		{`42 `, true},
		{`"execute"`, true},
		{`[{"execute":"x"}]`, true},
		{`{}`, true},
		{`{"id":5}`, true},
		{`{"execute":7,"id":"x"}`, true},
		{`{"execute":null}`, true},
		{`{"execute":"query-version","arguments":[1]}`, true},
		{`{"execute":"query-version","arguments":null}`, true},
		{`{"execute":"query-version","extra":1,"id":1}`, true},
		{`{"exec-oob":"query-version","id":2}`, true},
		{`{"execute":"nope","id":3}`, true},
		{`{"execute":"blockdev-del","arguments":{"node-name":1},"id":4}`, true},
		{`{"execute":"blockdev-del","arguments":{"node-name":"x","c":2}}`, true},
		{`{"execute":"blockdev-del","arguments":{}}`, true},
		{`{"execute":"blockdev-del","arguments":{"node-name":"x"},"id":{"k":[null,true,1.5]}}`, true},
		{`{"execute":"blockdev-del","arguments":{"node-name":"x"},"id":null}`, true},
		{`{"execute":"blockdev-del","arguments":{"node-name":"ü"},"id":"\u00fc"}`, true},
		{"\x01", false},
		{"{\"execute\":\"x\",\xff", false},
	}
	ours, ref := dialRaw(t, ts.path), dialRaw(t, qsdPath)
	ours.readMsg()
	ref.readMsg()
	compare := func(s step) {
		ours.send(s.in)
		ref.send(s.in)
		a, b := ours.readReply(), ref.readReply()
		ea, _ := a["error"].(map[string]any)
		eb, _ := b["error"].(map[string]any)
		if (ea == nil) != (eb == nil) || !jsonSame(a["id"], b["id"]) || hasKey(a, "id") != hasKey(b, "id") {
			t.Errorf("%q:\n ours %v\n qemu %v", s.in, a, b)
			return
		}
		if ea == nil {
			return
		}
		da, db := ea["desc"].(string), eb["desc"].(string)
		same := da == db
		if !s.exact {
			pa, _, _ := strings.Cut(da, ",")
			pb, _, _ := strings.Cut(db, ",")
			same = pa == pb || strings.HasPrefix(da, db)
		}
		if ea["class"] != eb["class"] || !same {
			t.Errorf("%q:\n ours %v\n qemu %v", s.in, ea, eb)
		}
	}
	for _, s := range negotiation {
		compare(s)
	}
	for _, s := range command {
		compare(s)
	}
}

func hasKey(m map[string]any, k string) bool { _, ok := m[k]; return ok }

func jsonSame(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return string(ja) == string(jb)
}

// listening reports whether a unix socket bound at path is listening, from
// /proc/net/unix (flag __SO_ACCEPTCON), without connecting to it.
func listening(path string) bool {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 8 && f[len(f)-1] == path && f[3] == "00010000" {
			return true
		}
	}
	return false
}
