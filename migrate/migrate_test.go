package migrate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/thin"
)

// These tests run the real parts: two pools, each held by a `thinblk
// serve` built from this checkout, and real QEMUs (TCG) whose
// vhost-user-blk disks are the volumes. The VMs run only their firmware:
// enough for QEMU to migrate them, stop and restart the rings. The guest
// test (guesttests/migrate_pools_test.go) migrates a VM that writes.

func TestMain(m *testing.M) { testenv.Main(m) }

func startProc(t *testing.T, log *bytes.Buffer, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

type testPool struct {
	dir, socks, qmp string
	cmd             *exec.Cmd
	log             *bytes.Buffer
}

// newPool creates a pool of size; fill, when set, runs on it before serve
// takes it.
func newPool(t *testing.T, dir, size string, fill func(p *thin.Pool)) *testPool {
	t.Helper()
	bin := testenv.Thinblk(t)
	p := &testPool{dir: filepath.Join(dir, "pool"), socks: filepath.Join(dir, "s"), log: &bytes.Buffer{}}
	p.qmp = filepath.Join(p.dir, "qmp.sock")
	if out, err := exec.Command(bin, "pool", "create", p.dir, "--size", size).CombinedOutput(); err != nil {
		t.Fatalf("pool create: %v\n%s", err, out)
	}
	if fill != nil {
		pl, err := thin.Open(p.dir, thin.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		fill(pl)
		if err := pl.Close(); err != nil {
			t.Fatal(err)
		}
	}
	p.cmd = startProc(t, p.log, bin, "serve", p.dir, "--socket-dir", p.socks)
	t.Cleanup(func() { p.stop(t) })
	testenv.WaitDial(t, p.qmp)
	return p
}

func (p *testPool) stop(t *testing.T) {
	if p.cmd == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("thinblk serve: %v\n%s", err, p.log)
		}
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-done
		t.Errorf("thinblk serve did not stop on SIGTERM\n%s", p.log)
	}
	p.cmd = nil
}

// names lists the pool's volumes and snapshots.
func (p *testPool) names(t *testing.T) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, p.qmp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	m, err := volumeNames(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for n := range m {
		out = append(out, n)
	}
	return out
}

func waitSocketFile(path string, d time.Duration) error {
	for deadline := time.Now().Add(d); ; time.Sleep(20 * time.Millisecond) {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("socket %s did not appear", path)
		}
	}
}

type testVM struct {
	qmp   string // for the code under test
	watch *qmp.Client
	cmd   *exec.Cmd
	log   *bytes.Buffer
	exit  chan struct{}
}

// startVM runs QEMU on the pool's volumes, with a second monitor for the
// test's eyes (QEMU serves one client per monitor socket).
func startVM(t *testing.T, dir string, p *testPool, incoming string, volumes ...string) (*testVM, error) {
	var socks []string
	for _, v := range volumes {
		socks = append(socks, filepath.Join(p.socks, v+".sock"))
	}
	return startQEMU(t, dir, incoming, socks...)
}

// startQEMU runs QEMU with the vhost-user-blk sockets as disks.
func startQEMU(t *testing.T, dir string, incoming string, socks ...string) (*testVM, error) {
	vm := &testVM{qmp: filepath.Join(dir, "q.sock"), log: &bytes.Buffer{}, exit: make(chan struct{})}
	watch := filepath.Join(dir, "w.sock")
	args := []string{
		"-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none", "-m", "128",
		"-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-numa", "node,memdev=mem",
		"-qmp", "unix:" + vm.qmp + ",server=on,wait=off",
		"-qmp", "unix:" + watch + ",server=on,wait=off",
	}
	for i, sock := range socks {
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=d%d,path=%s", i, sock),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=d%d", i))
	}
	if incoming != "" {
		args = append(args, "-incoming", incoming)
	}
	vm.cmd = startProc(t, vm.log, "qemu-system-x86_64", args...)
	go func() { vm.cmd.Wait(); close(vm.exit) }()
	t.Cleanup(func() {
		vm.cmd.Process.Kill()
		<-vm.exit
	})
	if err := waitSocketFile(watch, 30*time.Second); err != nil {
		return nil, fmt.Errorf("%v\n%s", err, vm.log)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := dial(ctx, "QEMU", watch)
	if err != nil {
		return nil, fmt.Errorf("QEMU monitor: %v\n%s", err, vm.log)
	}
	t.Cleanup(func() { c.Close() })
	vm.watch = c
	if err := waitSocketFile(vm.qmp, 10*time.Second); err != nil {
		return nil, err
	}
	return vm, nil
}

func (vm *testVM) status(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := qemuStatus(ctx, vm.watch)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

const volSize = 64 << 20

// pattern writes known data into volume v: blocks here and there, a
// provisioned range, a write at the end.
func pattern(t *testing.T, p *thin.Pool, name string, seed int64) {
	mustOK(t, p.CreateVolume(name, volSize))
	v, err := p.Volume(name)
	mustOK(t, err)
	r := rand.New(rand.NewSource(seed))
	buf := make([]byte, 256<<10)
	for i := 0; i < 24; i++ {
		r.Read(buf)
		mustOK(t, v.WriteAt([][]byte{buf}, int64(r.Intn(volSize/len(buf)))*int64(len(buf))))
	}
	mustOK(t, v.WriteZeroes(volSize/2, 1<<20, false))
	mustOK(t, v.WriteAt([][]byte{buf[:4096]}, volSize-4096))
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// image reads a volume of a pool no serve holds.
func image(t *testing.T, dir, name string) []byte {
	t.Helper()
	p, err := thin.Open(dir, thin.OpenOptions{})
	mustOK(t, err)
	defer p.Close()
	v, err := p.Volume(name)
	mustOK(t, err)
	b := make([]byte, v.Size())
	mustOK(t, v.ReadAt([][]byte{b}, 0))
	return b
}

// env is a source pool, serve and running VM on volumes a and b, and a
// destination pool and serve.
type env struct {
	dir      string
	src, dst *testPool
	vm       *testVM
	dstN     int
	dstVMs   []*testVM
}

func newEnv(t *testing.T, dstSize string) *env {
	testenv.NeedQEMU(t)
	e := &env{dir: testenv.ShortDir(t, "mig-")}
	e.src = newPool(t, filepath.Join(e.dir, "a"), "256M", func(p *thin.Pool) {
		pattern(t, p, "a", 1)
		pattern(t, p, "b", 2)
	})
	e.dst = newPool(t, filepath.Join(e.dir, "b"), dstSize, nil)
	vmDir := filepath.Join(e.dir, "vm")
	mustOK(t, os.MkdirAll(vmDir, 0o755))
	vm, err := startVM(t, vmDir, e.src, "", "a", "b")
	if err != nil {
		t.Fatal(err)
	}
	e.vm = vm
	return e
}

// options migrate the VM to a new QEMU on the destination.
func (e *env) options(t *testing.T) Options {
	e.dstN++
	dir := filepath.Join(e.dir, fmt.Sprintf("d%d", e.dstN))
	mustOK(t, os.MkdirAll(dir, 0o755))
	uri := "unix:" + filepath.Join(dir, "mig.sock")
	return Options{
		Source:      Endpoint{Thinblk: e.src.qmp, QEMU: e.vm.qmp},
		Destination: Endpoint{Thinblk: e.dst.qmp, QEMU: filepath.Join(dir, "q.sock")},
		Volumes:     []string{"a", "b"},
		URI:         uri,
		StartDestination: func(ctx context.Context) error {
			vm, err := startVM(t, dir, e.dst, uri, "a", "b")
			if err != nil {
				return err
			}
			e.dstVMs = append(e.dstVMs, vm)
			return nil
		},
		Timeout: 2 * time.Minute,
		Logf:    t.Logf,
	}
}

// undone checks that a failed migration left the VM running on the
// source, the destination without volumes or QEMU, and no migration
// snapshots anywhere.
func (e *env) undone(t *testing.T) {
	t.Helper()
	if st := e.vm.status(t); st != "running" {
		t.Errorf("source VM is %s after the failed migration", st)
	}
	src := e.src.names(t)
	if strings.Join(sorted(src), " ") != "a b" {
		t.Errorf("source pool holds %v, want the volumes a and b only", src)
	}
	if dst := e.dst.names(t); len(dst) != 0 {
		t.Errorf("destination pool holds %v after the failed migration", dst)
	}
	for _, vm := range e.dstVMs {
		select {
		case <-vm.exit:
		case <-time.After(20 * time.Second):
			t.Errorf("the destination QEMU still runs after the failed migration")
		}
	}
}

func sorted(s []string) []string {
	out := append([]string(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// TestMigrateFailures fails a migration at each step, and for real
// (destination QEMU that cannot start, that dies during QEMU's migration,
// a destination pool too small), and checks each time that the VM runs on
// the source with its volumes and the destination holds nothing. A last
// migration then succeeds, and the destination's volumes are the
// source's, byte for byte.
func TestMigrateFailures(t *testing.T) {
	e := newEnv(t, "256M")
	injected := errors.New("injected failure")
	for _, step := range []string{StepFull, StepRound, StepDestination, StepMigrate, StepPreSwitchover} {
		t.Run(step, func(t *testing.T) {
			o := e.options(t)
			var seen []string
			o.fault = func(s string) error {
				seen = append(seen, s)
				if s == step {
					return injected
				}
				return nil
			}
			_, err := Run(context.Background(), o)
			if !errors.Is(err, injected) {
				t.Fatalf("migration failed with %v, want the injected failure (steps %v)", err, seen)
			}
			e.undone(t)
		})
	}
	t.Run("destination-start-fails", func(t *testing.T) {
		o := e.options(t)
		o.StartDestination = func(ctx context.Context) error { return errors.New("no QEMU today") }
		if _, err := Run(context.Background(), o); err == nil || !strings.Contains(err.Error(), "no QEMU today") {
			t.Fatalf("migration: %v", err)
		}
		e.undone(t)
	})
	t.Run("destination-dies", func(t *testing.T) {
		o := e.options(t)
		o.fault = func(s string) error {
			if s == StepMigrate {
				e.dstVMs[len(e.dstVMs)-1].cmd.Process.Kill()
			}
			return nil
		}
		if _, err := Run(context.Background(), o); err == nil {
			t.Fatal("the migration succeeded with its destination QEMU killed")
		} else {
			t.Logf("as expected: %v", err)
		}
		e.undone(t)
	})
	t.Run("success", func(t *testing.T) {
		o := e.options(t)
		res, err := Run(context.Background(), o)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("full %d bytes, %d rounds, last delta %d bytes in %v, downtime %v, total %v",
			res.FullBytes, res.Rounds, res.LastDeltaBytes, res.LastDelta, res.Downtime, res.Total)
		dvm := e.dstVMs[len(e.dstVMs)-1]
		if st := dvm.status(t); st != "running" {
			t.Fatalf("destination VM is %s", st)
		}
		if st := e.vm.status(t); st != "postmigrate" {
			t.Fatalf("source VM is %s", st)
		}
		if got := strings.Join(sorted(e.dst.names(t)), " "); got != "a b" {
			t.Fatalf("destination pool holds %s, want a b", got)
		}
		if got := strings.Join(sorted(e.src.names(t)), " "); got != "a b" {
			t.Fatalf("source pool holds %s, want a b (no migration snapshots left)", got)
		}
		if res.FullBytes < 8<<20 { // random blocks may overlap

			t.Fatalf("the full streams were %d bytes: less than the data", res.FullBytes)
		}
		// Compare the volumes with both serves and QEMUs gone.
		dvm.cmd.Process.Kill()
		e.vm.cmd.Process.Kill()
		<-dvm.exit
		<-e.vm.exit
		e.src.stop(t)
		e.dst.stop(t)
		for _, v := range []string{"a", "b"} {
			if !bytes.Equal(image(t, e.src.dir, v), image(t, e.dst.dir, v)) {
				t.Fatalf("volume %s differs between the pools", v)
			}
		}
	})
}

// TestMigrateNoSpace: a destination pool too small for the volumes fails
// the receive before QEMU's migration starts; the VM runs on.
func TestMigrateNoSpace(t *testing.T) {
	e := newEnv(t, "8M")
	_, err := Run(context.Background(), e.options(t))
	if err == nil || !strings.Contains(err.Error(), "space") {
		t.Fatalf("migration to a pool too small: %v", err)
	}
	e.undone(t)
}
