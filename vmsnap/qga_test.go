package vmsnap

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

// hostAgent runs the host's own qemu-ga on a unix socket: the real agent
// and protocol, with the freeze commands blocked so that nothing on the
// host is ever frozen.
func hostAgent(t *testing.T, dir string) string {
	t.Helper()
	if _, err := exec.LookPath("qemu-ga"); err != nil {
		out, err := exec.Command("apt-get", "install", "-y", "--no-install-recommends", "qemu-guest-agent").CombinedOutput()
		if err != nil {
			t.Fatalf("qemu-ga missing and apt-get install qemu-guest-agent failed: %v\n%s", err, out)
		}
	}
	sock := filepath.Join(dir, "hostga.sock")
	cmd := exec.Command("qemu-ga", "-m", "unix-listen", "-p", sock,
		"-b", "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw",
		"-t", dir, "-f", filepath.Join(dir, "qga.pid"), "-l", filepath.Join(dir, "qga.log"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	testenv.WaitDial(t, sock)
	return sock
}

func TestGuestAgentProtocol(t *testing.T) {
	dir := testenv.ShortDir(t, "vmsnap-")
	sock := hostAgent(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// A client that went away mid-request leaves half a JSON object in
	// the agent's parser; the next session's sync (0xFF first) recovers.
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte(`{"execute": "guest-ping", "argu`))
	c.Close()

	a, err := dialAgent(ctx, sock)
	if err != nil {
		t.Fatalf("sync after a torn request: %v", err)
	}
	defer a.close()
	if err := a.run(ctx, "guest-ping", nil, nil); err != nil {
		t.Fatalf("guest-ping: %v", err)
	}
	var info struct {
		Version string `json:"version"`
	}
	if err := a.run(ctx, "guest-info", nil, &info); err != nil || info.Version == "" {
		t.Fatalf("guest-info: %+v, %v", info, err)
	}
	// An error reply is an error carrying the agent's description.
	if _, err := a.freeze(ctx); err == nil || !strings.Contains(err.Error(), "disabled") {
		t.Errorf("blocked freeze: %v", err)
	}
	// A call cut short by its deadline leaves the session usable: the
	// next call syncs again and skips whatever answer comes late.
	short, cancelShort := context.WithTimeout(ctx, time.Nanosecond)
	time.Sleep(time.Millisecond)
	if err := a.run(short, "guest-ping", nil, nil); err == nil {
		t.Error("a call past its deadline succeeded")
	}
	cancelShort()
	a.dec = nil // as after a failed read
	if err := a.run(ctx, "guest-info", nil, &info); err != nil {
		t.Errorf("call after a failed one: %v", err)
	}
}

// --freeze against a real agent that refuses to freeze: Take fails with
// the agent's reason, the VM never stopped, nothing created.
func TestTakeFreezeRefused(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	sock := hostAgent(t, dir)
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{}, "vm1")
	_, err := Take(context.Background(), Options{
		QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "x",
		Freeze: true, QGA: sock, Timeout: time.Minute,
	})
	if err == nil || !strings.Contains(err.Error(), "disabled") || !strings.Contains(err.Error(), "the VM runs on") {
		t.Fatalf("Take: %v", err)
	}
	expectNothingDone(t, vm, p, time.Second)
	if _, err := os.Stat(filepath.Join(dir, "qga.log")); err != nil {
		t.Logf("no agent log: %v", err)
	}
}
