package vmsnap

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
	"github.com/thinblk/thinblk/qmp"
)

// These tests run the real parts: a `thinblk serve` process built from
// this checkout and a QEMU (TCG) whose vhost-user-blk disks are the pool's
// volumes. The VM runs only its firmware: enough for stop and cont to stop
// and restart the vhost-user rings.

func TestMain(m *testing.M) { testenv.Main(m) }

type testPool struct {
	dir, socks, qmp string
	bin             string
	log             *bytes.Buffer
}

// startPool creates a pool with the volumes and runs `thinblk serve` on it.
func startPool(t *testing.T, dir string, volumes ...string) *testPool {
	t.Helper()
	bin := testenv.Thinblk(t)
	p := &testPool{dir: filepath.Join(dir, "pool"), socks: filepath.Join(dir, "s"), bin: bin, log: &bytes.Buffer{}}
	p.qmp = filepath.Join(p.dir, "qmp.sock")
	run := func(args ...string) {
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("thinblk %v: %v\n%s", args, err, out)
		}
	}
	run("pool", "create", p.dir, "--size", "256M")
	for _, v := range volumes {
		run("volume", "create", p.dir, v, "--size", "64M")
	}
	cmd := exec.Command(bin, "serve", p.dir, "--socket-dir", p.socks)
	cmd.Stdout, cmd.Stderr = p.log, p.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("thinblk serve: %v\n%s", err, p.log)
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("thinblk serve did not stop on SIGTERM\n%s", p.log)
		}
	})
	testenv.WaitDial(t, p.qmp)
	for _, v := range volumes {
		testenv.WaitDial(t, filepath.Join(p.socks, v+".sock"))
	}
	return p
}

// client connects to the pool's control socket.
func (p *testPool) client(t *testing.T) *qmp.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, p.qmp)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

type volumeInfo struct {
	Name   string `json:"name"`
	Kind   string `json:"kind"`
	Origin string `json:"origin"`
}

// volumes lists the pool's volumes, snapshots and clones by name.
func (p *testPool) volumes(t *testing.T) map[string]volumeInfo {
	t.Helper()
	c := p.client(t)
	var st struct {
		Volumes []volumeInfo `json:"volumes"`
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Execute(ctx, "query-pool", nil, &st); err != nil {
		t.Fatal(err)
	}
	m := map[string]volumeInfo{}
	for _, v := range st.Volumes {
		m[v.Name] = v
	}
	return m
}

type testVM struct {
	qmp     string // for the code under test
	watch   string // a second monitor for the test's own eyes
	qga     string // guest agent chardev (nobody answers: there is no guest OS)
	monitor *qmp.Client
	log     *bytes.Buffer
}

type vmOpts struct {
	prelaunch bool // -S: the VM never ran
	qga       bool
}

// startVM runs QEMU with the volumes as vhost-user-blk disks and two QMP
// monitors (QEMU serves one client per monitor socket).
func startVM(t *testing.T, dir string, p *testPool, o vmOpts, volumes ...string) *testVM {
	t.Helper()
	vm := &testVM{qmp: filepath.Join(dir, "q.sock"), watch: filepath.Join(dir, "w.sock"), qga: filepath.Join(dir, "ga.sock"), log: &bytes.Buffer{}}
	args := []string{
		"-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none", "-m", "128",
		"-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-numa", "node,memdev=mem",
		"-qmp", "unix:" + vm.qmp + ",server=on,wait=off",
		"-qmp", "unix:" + vm.watch + ",server=on,wait=off",
	}
	for i, v := range volumes {
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=d%d,path=%s", i, filepath.Join(p.socks, v+".sock")),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=d%d", i))
	}
	if o.qga {
		args = append(args, "-device", "virtio-serial-pci",
			"-chardev", "socket,id=qga,server=on,wait=off,path="+vm.qga,
			"-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0")
	}
	if o.prelaunch {
		args = append(args, "-S")
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	cmd.Stdout, cmd.Stderr = vm.log, vm.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	waitSocketFile(t, vm.watch)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := dialRetry(ctx, vm.watch)
	if err != nil {
		t.Fatalf("QEMU monitor: %v\n%s", err, vm.log)
	}
	t.Cleanup(func() { c.Close() })
	vm.monitor = c
	return vm
}

// waitSocketFile waits for a socket file without connecting: a QMP
// socket's single client slot must stay free.
func waitSocketFile(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket %s did not appear", path)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (vm *testVM) status(t *testing.T) Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st Status
	if err := vm.monitor.Execute(ctx, "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// events returns the names of the events received so far (waiting a
// moment for stragglers).
// expectNothingDone checks what a failed Take leaves: the VM running, QEMU's events within
// settle exactly want (none: never stopped; STOP, RESUME: stopped and resumed) and the pool
// holding its one volume only.
func expectNothingDone(t *testing.T, vm *testVM, p *testPool, settle time.Duration, want ...string) {
	t.Helper()
	if st := vm.status(t); !st.Running {
		t.Errorf("VM is %s", st.Status)
	}
	if ev := events(vm.monitor, settle); !slices.Equal(ev, want) {
		t.Errorf("QEMU events %v, want %v", ev, want)
	}
	if vols := p.volumes(t); len(vols) != 1 {
		t.Errorf("volumes: %v", vols)
	}
}

func events(c *qmp.Client, settle time.Duration) []string {
	var names []string
	t := time.NewTimer(settle)
	defer t.Stop()
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return names
			}
			names = append(names, ev.Event)
		case <-t.C:
			return names
		}
	}
}

// eventData returns the data of the named events received so far.
func eventData(c *qmp.Client, name string, settle time.Duration) []json.RawMessage {
	var out []json.RawMessage
	t := time.NewTimer(settle)
	defer t.Stop()
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return out
			}
			if ev.Event == name {
				out = append(out, ev.Data)
			}
		case <-t.C:
			return out
		}
	}
}

// dialRetry connects to a QMP socket, retrying while QEMU has bound it but
// not yet listens.
func dialRetry(ctx context.Context, path string) (*qmp.Client, error) {
	for {
		c, err := qmp.Dial(ctx, path)
		if err == nil || ctx.Err() != nil {
			return c, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}
