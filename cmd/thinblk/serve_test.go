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

// buildThinblk builds this command once per test binary.
func buildThinblk(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "thinblk")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startServe runs `thinblk serve` and waits for its socket.
func startServe(t *testing.T, bin string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	var logs bytes.Buffer
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd, &logs
}

func waitForSocket(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("socket %s did not appear", path)
}

func TestServeRawRoundTripAndSIGTERM(t *testing.T) {
	bin := buildThinblk(t)
	for _, extra := range [][]string{nil, {"--no-uring"}, {"--direct"}} {
		t.Run(strings.Join(append([]string{"default"}, extra...), ""), func(t *testing.T) {
			testServeRaw(t, bin, extra)
		})
	}
}

func testServeRaw(t *testing.T, bin string, extra []string) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 8<<20); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "disk.sock")
	cmd, logs := startServe(t, bin, append([]string{"--raw", img, "--socket", sock, "--queues", "2", "--serial", "tb-serial"}, extra...)...)
	waitForSocket(t, sock)
	if fi, _ := os.Stat(sock); fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatalf("dial: %v\nlogs:\n%s", err, logs)
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
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve exited with %v after SIGTERM\nlogs:\n%s", err, logs)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("serve did not exit after SIGTERM\nlogs:\n%s", logs)
	}
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
	img := filepath.Join(dir, "disk.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
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
