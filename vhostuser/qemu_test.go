package vhostuser

import (
	"bytes"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

// TestQEMUHandshake lets a real QEMU (7.2 on these machines) connect to the
// server as it does when it realizes a vhost-user-blk-pci device: feature
// and protocol negotiation, the back-end channel, GET_CONFIG. The guest is
// never started (-S), so no rings run; a config-change notification then
// travels to QEMU over the back-end channel and must be acknowledged.
// Set THINBLK_SKIP_QEMU=1 to skip on machines without QEMU.
func TestQEMUHandshake(t *testing.T) {
	if os.Getenv("THINBLK_SKIP_QEMU") == "1" {
		t.Skip("THINBLK_SKIP_QEMU=1")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("qemu-system-x86_64 not found (install qemu-system-x86, or set THINBLK_SKIP_QEMU=1): %v", err)
	}
	dev := newFakeDevice()
	ts := startServer(t, dev)
	var out bytes.Buffer
	cmd := exec.Command(qemu, "-S", "-accel", "tcg", "-m", "64", "-nodefaults", "-no-user-config",
		"-display", "none", "-serial", "none", "-monitor", "none",
		"-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem",
		"-chardev", "socket,id=c0,path="+ts.path,
		"-device", "vhost-user-blk-pci,chardev=c0,num-queues=2")
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("qemu output:\n%s", out.String())
		}
	}()

	deadline := time.After(30 * time.Second)
	for {
		dev.mu.Lock()
		ready := dev.notify != nil && dev.configReads > 0
		dev.mu.Unlock()
		if ready {
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("qemu exited during the handshake: %v", err)
		case <-deadline:
			t.Fatal("qemu did not complete the handshake (back-end channel and GET_CONFIG)")
		case <-time.After(20 * time.Millisecond):
		}
	}
	ts.log.WaitContains(t, "protocol features negotiated")
	ts.log.WaitContains(t, "features negotiated")

	// QEMU acknowledges the notification (REPLY_ACK was negotiated).
	done := make(chan error, 1)
	go func() { done <- dev.notifier()() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("config change notification: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("config change notification not acknowledged")
	}

	// QEMU going away is a disconnect: the notifier is withdrawn.
	cmd.Process.Kill()
	testenv.WaitFor(t, "disconnect after qemu exit", func() bool { return dev.notifier() == nil })
	ts.log.WaitContains(t, "front-end disconnected")
	if os.Getenv("THINBLK_TEST_LOG") == "1" {
		t.Logf("server log:\n%s", ts.log.String())
	}
}
