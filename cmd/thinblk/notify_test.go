package main

import (
	"bufio"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"

	"github.com/thinblk/thinblk/internal/testenv"
)

// notifySocket listens where a service manager would ($NOTIFY_SOCKET) and returns its path
// and a function that waits for the next datagram (or the process's exit).
func notifySocket(t *testing.T) (string, func(cmd *exec.Cmd, exited <-chan struct{}) string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	msgs := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return path, func(cmd *exec.Cmd, exited <-chan struct{}) string {
		t.Helper()
		select {
		case m := <-msgs:
			return m
		case <-exited:
			t.Fatalf("serve exited before notifying: %v", cmd.ProcessState)
		case <-time.After(20 * time.Second):
			t.Fatal("no notification from serve within 20s")
		}
		return ""
	}
}

// startNotifyingServe runs serve with NOTIFY_SOCKET set; exited closes when it ends.
func startNotifyingServe(t *testing.T, bin, notify string, args ...string) (*exec.Cmd, <-chan struct{}, *testenv.Buffer) {
	t.Helper()
	logs := new(testenv.Buffer)
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	return cmd, exited, logs
}

// expectStopping sends SIGTERM and wants STOPPING=1, then a clean exit.
func expectStopping(t *testing.T, cmd *exec.Cmd, exited <-chan struct{}, next func(*exec.Cmd, <-chan struct{}) string, logs *testenv.Buffer) {
	t.Helper()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if m := next(cmd, exited); m != "STOPPING=1\n" {
		t.Errorf("after SIGTERM got %q, want STOPPING=1", m)
	}
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("serve still running 20s after SIGTERM")
	}
	if !cmd.ProcessState.Success() {
		t.Errorf("serve exited %v after SIGTERM\n%s", cmd.ProcessState, logs)
	}
}

// TestServeNotifiesReadyWhenPoolSocketsListen: with NOTIFY_SOCKET set (systemd's Type=notify),
// serve DIR sends READY=1 only once every volume's socket and the control socket accept
// connections (each is dialled once, without retrying, the moment READY arrives), and
// STOPPING=1 when SIGTERM starts its shutdown.
func TestServeNotifiesReadyWhenPoolSocketsListen(t *testing.T) {
	bin := buildThinblk(t)
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "64M")
	vols := []string{"a", "b", "c", "d"}
	for _, v := range vols {
		mustThinblk(t, "volume", "create", dir, v, "--size", "16M")
	}
	sockDir := filepath.Join(t.TempDir(), "run")
	notify, next := notifySocket(t)
	cmd, exited, logs := startNotifyingServe(t, bin, notify, dir, "--socket-dir", sockDir)

	ready := next(cmd, exited)
	if !strings.HasPrefix(ready, "READY=1\n") || !strings.Contains(ready, "STATUS=serving 4 volumes of "+dir+"\n") {
		t.Fatalf("first notification %q: want READY=1 and a STATUS line\n%s", ready, logs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, v := range vols {
		disk, err := frontend.Dial(ctx, filepath.Join(sockDir, v+".sock"), frontend.Options{NumQueues: 1})
		if err != nil {
			t.Fatalf("volume %s right after READY=1: %v\n%s", v, err, logs)
		}
		if id, err := disk.GetID(); err != nil || id != v {
			t.Errorf("volume %s serial %q, %v", v, id, err)
		}
		disk.Close()
	}
	qc, err := net.Dial("unix", filepath.Join(dir, "qmp.sock"))
	if err != nil {
		t.Fatalf("control socket right after READY=1: %v", err)
	}
	qc.SetReadDeadline(time.Now().Add(10 * time.Second))
	greeting, err := bufio.NewReader(qc).ReadString('\n')
	qc.Close()
	if err != nil || !strings.Contains(greeting, `"QMP"`) {
		t.Errorf("control socket greeting %q, %v", greeting, err)
	}
	expectStopping(t, cmd, exited, next, logs)
}

// TestServeNotifiesReadyRaw: serve --raw notifies READY=1 once its socket listens, STOPPING=1
// on SIGTERM.
func TestServeNotifiesReadyRaw(t *testing.T) {
	bin := buildThinblk(t)
	img := newImage(t, t.TempDir(), 1<<20)
	sock := filepath.Join(t.TempDir(), "disk.sock")
	notify, next := notifySocket(t)
	cmd, exited, logs := startNotifyingServe(t, bin, notify, "--raw", img, "--socket", sock)
	if m := next(cmd, exited); !strings.HasPrefix(m, "READY=1\nSTATUS=serving "+img) {
		t.Fatalf("first notification %q, want READY=1 and a STATUS line\n%s", m, logs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 1})
	if err != nil {
		t.Fatalf("socket right after READY=1: %v\n%s", err, logs)
	}
	if disk.Capacity() != 1<<20 {
		t.Errorf("capacity %d, want 1 MiB", disk.Capacity())
	}
	disk.Close()
	expectStopping(t, cmd, exited, next, logs)
}
