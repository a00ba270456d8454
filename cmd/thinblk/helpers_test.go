package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

// The helpers the command's tests share: running the CLI in-process, building the binary,
// running `thinblk serve` on a new pool or a raw image, and stopping it.

// thinblk runs the CLI in-process and returns stdout, stderr and the code.
func thinblk(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return stdout.String(), stderr.String(), code
}

func mustThinblk(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := thinblk(t, args...)
	if code != 0 {
		t.Fatalf("thinblk %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// buildThinblk is this command built once per test binary (see testenv.Thinblk).
func buildThinblk(t *testing.T) string { return testenv.Thinblk(t) }

func TestMain(m *testing.M) { testenv.Main(m) }

// startServe runs `thinblk serve` (killed at the end of the test if still running).
func startServe(t *testing.T, bin string, args ...string) (*exec.Cmd, *testenv.Buffer) {
	t.Helper()
	logs := new(testenv.Buffer)
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd, logs
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

// stopServe sends SIGTERM and wants a clean exit within 15 s.
func stopServe(t *testing.T, cmd *exec.Cmd, logs fmt.Stringer) {
	t.Helper()
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
}

// served is a running `thinblk serve` of one volume or image.
type served struct {
	cmd  *exec.Cmd
	logs *testenv.Buffer
	sock string // the volume's or image's socket, listening
	dir  string // the pool (serveNewPool)
	img  string // the image (serveNewImage)
}

func (s *served) stop(t *testing.T) {
	t.Helper()
	stopServe(t, s.cmd, s.logs)
}

// serveNewPool creates a pool (`pool create` flags poolFlags) holding one volume, disk0, of
// volSize bytes and serves it with its sockets in a directory serve creates; extra are more
// serve flags.
func serveNewPool(t *testing.T, bin string, poolFlags []string, volSize int64, extra ...string) *served {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, append([]string{"pool", "create", dir}, poolFlags...)...)
	mustThinblk(t, "volume", "create", dir, "disk0", "--size", fmt.Sprint(volSize))
	sockDir := filepath.Join(t.TempDir(), "run", "thinblk")
	cmd, logs := startServe(t, bin, append([]string{dir, "--socket-dir", sockDir}, extra...)...)
	s := &served{cmd: cmd, logs: logs, sock: filepath.Join(sockDir, "disk0.sock"), dir: dir}
	waitForSocket(t, s.sock)
	return s
}

// newImage creates a sparse raw image of size bytes.
func newImage(t *testing.T, dir string, size int64) string {
	t.Helper()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	return img
}

// serveNewImage serves a new sparse raw image of size bytes with `serve --raw`; extra are more
// serve flags.
func serveNewImage(t *testing.T, bin string, size int64, extra ...string) *served {
	t.Helper()
	dir := t.TempDir()
	img := newImage(t, dir, size)
	sock := filepath.Join(dir, "disk.sock")
	cmd, logs := startServe(t, bin, append([]string{"--raw", img, "--socket", sock}, extra...)...)
	waitForSocket(t, sock)
	return &served{cmd: cmd, logs: logs, sock: sock, img: img}
}
