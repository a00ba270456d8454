package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

func TestServeRawRoundTripAndSIGTERM(t *testing.T) {
	bin := buildThinblk(t)
	for _, extra := range [][]string{nil, {"--no-uring"}, {"--direct"}} {
		t.Run(strings.Join(append([]string{"default"}, extra...), ""), func(t *testing.T) {
			testServeRaw(t, bin, extra)
		})
	}
}

func testServeRaw(t *testing.T, bin string, extra []string) {
	s := serveNewImage(t, bin, 8<<20, append([]string{"--queues", "2", "--serial", "tb-serial"}, extra...)...)
	sock, img := s.sock, s.img
	if fi, _ := os.Stat(sock); fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatalf("dial: %v\nlogs:\n%s", err, s.logs)
	}
	if disk.Capacity() != 8<<20 {
		t.Errorf("capacity %d, want %d", disk.Capacity(), 8<<20)
	}
	if id, err := disk.GetID(); err != nil || id != "tb-serial" {
		t.Errorf("GET_ID = %q, %v; want tb-serial", id, err)
	}
	data := bytes.Repeat([]byte("thinblk!"), 4096/8*3)
	if _, err := disk.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	// SIGTERM with the front-end still connected: the acknowledged write
	// must be in the file, the socket gone, and the exit status 0.
	s.stop(t)
	disk.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket still there after exit: %v", err)
	}
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw[1<<20:1<<20+len(data)], data) {
		t.Error("written data is not in the image after shutdown")
	}
}

func TestServeFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"serve"}, "give a pool directory, or --raw FILE"},
		{[]string{"serve", "--raw", "x.img"}, "--socket PATH is required"},
		{[]string{"serve", "pooldir", "--socket", "s"}, "--socket is for --raw"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--socket-dir", "d"}, "--socket-dir is for a pool"},
		{[]string{"serve", "pooldir", "--read-only"}, "are for --raw"},
		{[]string{"serve", "pooldir", "other"}, "unexpected argument"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--queues", "0"}, "must be 1 to 256"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--queues", "257"}, "must be 1 to 256"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--queue-size", "100"}, "power of two"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--socket-mode", "999"}, "octal"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--serial", strings.Repeat("s", 21)}, "longer than 20"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "extra"}, "unexpected argument"},
		{[]string{"serve", "--null", "1G", "--raw", "x", "--socket", "s"}, "--null serves no file"},
		{[]string{"serve", "--null", "1G", "pooldir"}, "unexpected argument"},
		{[]string{"serve", "--null", "1000", "--socket", "s"}, "multiple of 512"},
		{[]string{"serve", "--null", "1G"}, "--socket PATH is required"},
		{[]string{"serve", "--raw", "x", "--socket", "s", "--poll-us", "-1"}, "--poll-us -1: must be 0 to 1000000"},
		{[]string{"nonsense"}, "unknown command"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(tc.args, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: stderr %q does not mention %q", tc.args, stderr.String(), tc.want)
		}
	}
}

func TestServeMissingImage(t *testing.T) {
	dir := t.TempDir()
	var stdout, stderr bytes.Buffer
	code := run([]string{"serve", "--raw", filepath.Join(dir, "nope.img"), "--socket", filepath.Join(dir, "s.sock")}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "no such file") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "s.sock")); !os.IsNotExist(err) {
		t.Error("a socket was created for an image that cannot be opened")
	}
}

func TestServeRefusesLiveSocket(t *testing.T) {
	bin := buildThinblk(t)
	dir := t.TempDir()
	img := newImage(t, dir, 1<<20)
	sock := filepath.Join(dir, "disk.sock")
	first, _ := startServe(t, bin, "--raw", img, "--socket", sock)
	waitForSocket(t, sock)
	second := exec.Command(bin, "serve", "--raw", img, "--socket", sock)
	out, err := second.CombinedOutput()
	if err == nil {
		t.Fatalf("a second serve on a live socket succeeded:\n%s", out)
	}
	// The first server still owns its socket.
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("socket of the first server is gone: %v", err)
	}
	first.Process.Signal(syscall.SIGINT)
	if err := first.Wait(); err != nil {
		t.Fatalf("first serve exited with %v after SIGINT", err)
	}
}
