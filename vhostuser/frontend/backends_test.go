package frontend

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// backend starts a vhost-user-blk back-end serving the raw file img with
// the given number of queues and returns its socket path. It cleans up
// after itself through t.Cleanup.
type backend struct {
	name  string
	start func(t testing.TB, img string, o serveOpts) string
}

type serveOpts struct {
	queues   int
	readOnly bool
	// queueSize is the largest ring thinblk accepts (0: its default);
	// qemu-storage-daemon accepts up to 1024 anyway.
	queueSize int
	// resize, if not nil, is set by the back-end's start function to a
	// function that grows the disk to newSize bytes while serving.
	resize *func(newSize int64) error
}

// backends are the back-ends every end-to-end test runs against.
func backends() []backend {
	bs := []backend{{name: "qsd", start: startQSD}}
	bs = append(bs, thinblkBackends...)
	return bs
}

// thinblkBackends is filled in by thinblk_test.go when thinblk's own
// back-end is available.
var thinblkBackends []backend

// qsdPath finds qemu-storage-daemon; without it the test fails unless
// THINBLK_SKIP_QSD=1.
func qsdPath(t testing.TB) string {
	p, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		if os.Getenv("THINBLK_SKIP_QSD") == "1" {
			t.Skip("qemu-storage-daemon not installed and THINBLK_SKIP_QSD=1")
		}
		t.Fatalf("qemu-storage-daemon not found (install qemu-utils, or set THINBLK_SKIP_QSD=1): %v", err)
	}
	return p
}

func startQSD(t testing.TB, img string, o serveOpts) string {
	bin := qsdPath(t)
	sock := filepath.Join(t.TempDir(), "qsd.sock")
	// discard=unmap on both nodes so that DISCARD and WRITE_ZEROES+unmap
	// reach the file as punched holes, as thinblk's raw storage does.
	writable, ro := "on", "off"
	if o.readOnly {
		writable, ro = "off", "on"
	}
	var monitor []string
	qmpSock := filepath.Join(filepath.Dir(sock), "qmp.sock")
	if o.resize != nil {
		monitor = []string{"--chardev", "socket,id=m0,path=" + qmpSock + ",server=on,wait=off", "--monitor", "chardev=m0"}
		*o.resize = func(newSize int64) error { return qmpBlockResize(qmpSock, "d0", newSize) }
	}
	cmd := exec.Command(bin, append(monitor,
		"--blockdev", "driver=file,node-name=f0,discard=unmap,read-only="+ro+",filename="+img,
		"--blockdev", "driver=raw,node-name=d0,discard=unmap,read-only="+ro+",file=f0",
		"--export", fmt.Sprintf("type=vhost-user-blk,id=e0,addr.type=unix,addr.path=%s,node-name=d0,writable=%s,num-queues=%d", sock, writable, o.queues))...)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu-storage-daemon: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() && stderr.Len() > 0 {
			t.Logf("qemu-storage-daemon output:\n%s", stderr.String())
		}
	})
	waitSocket(t, sock, exited, &stderr)
	return sock
}

// waitSocket waits until something accepts connections on sock. It does
// not connect (a vhost-user back-end serves one front-end at a time and
// may treat a probe as its client): it waits for the socket file.
func waitSocket(t testing.TB, sock string, exited <-chan error, out *bytes.Buffer) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("back-end exited before listening: %v\n%s", err, out.String())
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("back-end did not create %s within 10 s\n%s", sock, out.String())
}

// newImage creates a sparse raw file of size bytes.
func newImage(t testing.TB, size int64) string {
	img := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return img
}

// dial connects with a bounded context and closes the disk at cleanup.
// It retries for a while: the socket file can exist a moment before
// listen(2), and a back-end may still be tearing down the previous
// front-end (thinblk refuses a second concurrent connection).
func dial(t testing.TB, sock string, opts Options) *Disk {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d, err := Dial(ctx, sock, opts)
		cancel()
		if err == nil {
			t.Cleanup(func() {
				if err := d.Close(); err != nil {
					t.Errorf("close: %v", err)
				}
			})
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("dial %s: %v", sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// qmpBlockResize resizes a node of qemu-storage-daemon through its QMP
// monitor.
func qmpBlockResize(sock, node string, size int64) error {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	dec := json.NewDecoder(c)
	var greeting map[string]any
	if err := dec.Decode(&greeting); err != nil {
		return fmt.Errorf("QMP greeting: %w", err)
	}
	exec := func(cmd string, args map[string]any) error {
		b, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": args})
		if _, err := c.Write(b); err != nil {
			return err
		}
		for {
			var resp map[string]any
			if err := dec.Decode(&resp); err != nil {
				return fmt.Errorf("QMP %s: %w", cmd, err)
			}
			if _, ok := resp["event"]; ok {
				continue
			}
			if e, ok := resp["error"]; ok {
				return fmt.Errorf("QMP %s: %v", cmd, e)
			}
			return nil
		}
	}
	if err := exec("qmp_capabilities", map[string]any{}); err != nil {
		return err
	}
	return exec("block_resize", map[string]any{"node-name": node, "size": size})
}
