package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

func runExec(t *testing.T, req *agentproto.Request) *agentproto.Response {
	t.Helper()
	req.Op = agentproto.OpExec
	if err := req.Validate(); err != nil {
		t.Fatal(err)
	}
	return handler{}.Handle(context.Background(), req)
}

func TestExec(t *testing.T) {
	resp := runExec(t, &agentproto.Request{
		Argv:  []string{"/bin/sh", "-c", `read x; echo "out:$x:$FOO"; echo err >&2; exit 3`},
		Env:   []string{"FOO=bar"},
		Stdin: []byte("hello\n"),
	})
	if resp.Error != "" || resp.ExitCode != 3 || string(resp.Stdout) != "out:hello:bar\n" || string(resp.Stderr) != "err\n" {
		t.Errorf("got %+v", resp)
	}
}

func TestExecMissingCommand(t *testing.T) {
	resp := runExec(t, &agentproto.Request{Argv: []string{"/nonexistent/cmd"}})
	if resp.Error == "" {
		t.Errorf("missing command gave no error: %+v", resp)
	}
}

func TestExecTimeoutKillsChildren(t *testing.T) {
	start := time.Now()
	// The background sleep keeps stdout open: the process group kill must end it too.
	resp := runExec(t, &agentproto.Request{Argv: []string{"/bin/sh", "-c", "sleep 30 & sleep 30"}, TimeoutMs: 300})
	if !resp.TimedOut || resp.ExitCode != -1 {
		t.Errorf("got %+v, want timed out", resp)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("timed-out command took %v", d)
	}
}

func TestExecOutputCapped(t *testing.T) {
	b := &cappedBuffer{max: 10}
	n, err := b.Write([]byte("0123456789abc"))
	if n != 13 || err != nil || b.buf.String() != "0123456789" || !b.truncated {
		t.Errorf("Write = %d, %v; kept %q truncated %v", n, err, b.buf.String(), b.truncated)
	}
}

func TestFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	h := handler{}
	resp := h.Handle(context.Background(), &agentproto.Request{Op: agentproto.OpWriteFile, Path: path, Data: []byte("abc"), Mode: 0o600})
	if resp.Error != "" {
		t.Fatal(resp.Error)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("stat after write: %v, %v", st, err)
	}
	resp = h.Handle(context.Background(), &agentproto.Request{Op: agentproto.OpReadFile, Path: path})
	if resp.Error != "" || string(resp.Data) != "abc" {
		t.Errorf("read back %+v", resp)
	}
	resp = h.Handle(context.Background(), &agentproto.Request{Op: agentproto.OpReadFile, Path: path + ".missing"})
	if resp.Error == "" {
		t.Error("reading a missing file gave no error")
	}
	if _, err := readFileCapped(path, 2); err == nil {
		t.Error("file larger than the cap was read")
	}
}

func TestFindSerialPort(t *testing.T) {
	sys := t.TempDir()
	for name, port := range map[string]string{"vport0p1": "other", "vport1p1": agentproto.SerialPortName} {
		if err := os.MkdirAll(filepath.Join(sys, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, name, "name"), []byte(port+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := findSerialPort(sys, "/dev", agentproto.SerialPortName)
	if err != nil || got != "/dev/vport1p1" {
		t.Errorf("findSerialPort = %q, %v", got, err)
	}
	if _, err := findSerialPort(sys, "/dev", "absent"); err == nil {
		t.Error("found a port that is not there")
	}
	if _, err := findSerialPort(filepath.Join(sys, "nope"), "/dev", "x"); err == nil {
		t.Error("no error for a missing sysfs directory")
	}
}

func TestVsockUsable(t *testing.T) {
	cases := []struct {
		cid uint32
		err error
		ok  bool
	}{
		{3, nil, true},
		{1234, nil, true},
		{2, nil, false}, // the host's own CID: not a guest
		{1, nil, false},
		{cidAny, nil, false},
		{0, errors.New("no vsock"), false},
	}
	for _, c := range cases {
		_, ok := vsockUsable(func() (uint32, error) { return c.cid, c.err })
		if ok != c.ok {
			t.Errorf("cid %d err %v: usable %v, want %v", c.cid, c.err, ok, c.ok)
		}
	}
}

// TestServeListener drives the listener path the vsock transport uses, over a unix socket
// (this host has no vhost-vsock, so no real guest CID to listen on).
func TestServeListener(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	results := make(chan error, 4)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	go serveListener(ctx, l, handler{}, log, func(err error) { results <- err })

	// Two connections in turn: the listener keeps serving after the first ends.
	for i := 0; i < 2; i++ {
		conn, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c := agentproto.NewClient(conn)
		res, err := c.Exec(ctx, []string{"/bin/echo", "hi"}, nil, nil, 5*time.Second)
		if err != nil || strings.TrimSpace(string(res.Stdout)) != "hi" {
			t.Fatalf("exec over listener: %+v, %v", res, err)
		}
		if i == 1 {
			if err := c.PowerOff(ctx); err != nil {
				t.Fatal(err)
			}
		}
		c.Close()
		if err := <-results; (i == 1) != errors.Is(err, agentproto.ErrPowerOff) {
			t.Errorf("connection %d ended with %v", i, err)
		}
	}
}

// TestListenVsock: where this machine has a guest context ID the listen must work (the agent
// would use it); elsewhere it fails with a clear error and the agent falls back.
func TestListenVsock(t *testing.T) {
	cid, usable := vsockUsable(localContextID)
	l, err := listenVsock(agentproto.VsockPort + 1)
	if usable && err != nil {
		t.Fatalf("context ID %d is usable but listen failed: %v", cid, err)
	}
	if err != nil {
		if !strings.Contains(err.Error(), "vsock listen port") {
			t.Errorf("unhelpful error: %v", err)
		}
		return
	}
	l.Close()
}
