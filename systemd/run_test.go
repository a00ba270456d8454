package systemd

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

// The probe runs once the instance is up: Type=notify makes After= wait for READY=1. It records
// what systemd says about the instance and what the runtime directory holds.
const probeUnit = `[Unit]
Requires=thinblk-serve@srv-pool.service
After=thinblk-serve@srv-pool.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'systemctl show -p ActiveState -p SubState -p StatusText -p Result thinblk-serve@srv-pool.service > /share/state.tmp; ls /run/thinblk/srv-pool >> /share/state.tmp; mv /share/state.tmp /share/state'
`

// serve's log goes to a file the test reads (the container's journal is out of reach); the
// group is the README's recipe for QEMU run by libvirt as libvirt-qemu:kvm, with the flags in
// the instance's environment file.
const (
	logDropIn = `[Service]
StandardError=append:/share/serve.log
Group=kvm
`
	instanceEnv = "THINBLK_SERVE_ARGS=--socket-mode 0660 --queues 2\n"
)

// extraDropIn lets a run add to the unit (to see the test fail when the sandbox takes io_uring
// away: THINBLK_UNIT_EXTRA='SystemCallFilter=~@aio').
var extraDropIn = os.Getenv("THINBLK_UNIT_EXTRA") + "\n"

// TestUnitRunsUnderSystemd boots a real systemd (252, the host's own /usr) as PID 1 of a
// systemd-nspawn container, with the installed unit and a pool bound in, and starts
// thinblk-serve@srv-pool.service: it must become active only after READY=1 with its STATUS
// line and a listening socket per volume, serve a front-end from the host through the
// hardened sandbox (io_uring, guest memory mapping), and shut down cleanly (STOPPING=1, the
// pool consistent) when the container halts.
func TestUnitRunsUnderSystemd(t *testing.T) {
	needTool(t, "systemd-nspawn")
	root, err := os.MkdirTemp("", "thinblk-unit-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kept %s", root)
			return
		}
		os.RemoveAll(root)
	})
	dest := filepath.Join(root, "dest")
	installStart := time.Now()
	install(t, "DESTDIR="+dest, "PREFIX=/opt/thinblk")
	t.Logf("make install: %.1fs", time.Since(installStart).Seconds())
	thinblk := filepath.Join(dest, "opt/thinblk/bin/thinblk")
	share := filepath.Join(root, "share")
	pool := filepath.Join(share, "pool")
	units := filepath.Join(root, "units")
	runDir := filepath.Join(root, "run-thinblk")
	etcThinblk := filepath.Join(root, "etc-thinblk")
	for _, d := range []string{share, filepath.Join(units, "basic.target.wants"), filepath.Join(units, "thinblk-serve@.service.d"), runDir, etcThinblk} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "64M"},
		{"volume", "create", pool, "vm1", "--size", "32M"},
		{"volume", "create", pool, "vm2", "--size", "32M"},
	} {
		if out, err := exec.Command(thinblk, args...).CombinedOutput(); err != nil {
			t.Fatalf("thinblk %v: %v\n%s", args, err, out)
		}
	}
	unit, err := os.ReadFile(filepath.Join(dest, "opt/thinblk/lib/systemd/system/thinblk-serve@.service"))
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"thinblk-serve@.service":            string(unit),
		"thinblk-serve@.service.d/log.conf": logDropIn + extraDropIn,
		"thinblk-probe.service":             probeUnit,
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(units, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(etcThinblk, "serve-srv-pool.env"), []byte(instanceEnv), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../thinblk-probe.service", filepath.Join(units, "basic.target.wants/thinblk-probe.service")); err != nil {
		t.Fatal(err)
	}

	// --volatile=yes: the container's root is a tmpfs with the host's /usr read-only, so
	// nothing it does reaches the host beyond the bound directories.
	console := filepath.Join(root, "console.log")
	logf, err := os.Create(console)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	machine := "thinblk-unit-" + filepath.Base(root)[len("thinblk-unit-"):]
	cmd := exec.CommandContext(ctx, "systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
		"-M", machine, "--quiet",
		"--bind="+units+":/etc/systemd/system",
		"--bind="+share+":/share",
		"--bind="+pool+":/srv/pool",
		"--bind-ro="+filepath.Join(dest, "opt/thinblk")+":/opt/thinblk",
		"--bind="+runDir+":/run/thinblk",
		"--bind-ro="+etcThinblk+":/etc/thinblk",
		// The host's users and groups, for Group=kvm.
		"--bind-ro=/etc/passwd:/etc/passwd", "--bind-ro=/etc/group:/etc/group",
		"--boot", "--", "systemd.unit=basic.target", "systemd.firstboot=off")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Stdin = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// On a timeout the container is killed, not halted.
	cmd.Cancel = func() error { return cmd.Process.Kill() }
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	halt := func() {
		cmd.Process.Signal(syscall.SIGTERM) // nspawn halts the container's systemd
		select {
		case <-exited:
		case <-time.After(time.Minute):
			cmd.Process.Kill()
			<-exited
		}
	}
	defer func() {
		if cmd.ProcessState == nil {
			halt()
		}
	}()
	diag := func() string {
		c, _ := os.ReadFile(console)
		l, _ := os.ReadFile(filepath.Join(share, "serve.log"))
		return "--- container console ---\n" + tailLines(string(c), 30) + "\n--- serve log ---\n" + tailLines(string(l), 20)
	}

	statePath := filepath.Join(share, "state")
	var state []byte
	for {
		if state, err = os.ReadFile(statePath); err == nil {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("container ended before the probe ran: %v\n%s", err, diag())
		case <-time.After(200 * time.Millisecond):
		}
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("probe did not run within 2 minutes\n%s", diag())
		}
	}
	t.Logf("unit active %.1fs after the container started:\n%s", time.Since(start).Seconds(), state)
	for _, want := range []string{"ActiveState=active\n", "SubState=running\n",
		"StatusText=serving 2 volumes of /srv/pool\n", "vm1.sock\n", "vm2.sock\n"} {
		if !bytes.Contains(state, []byte(want)) {
			t.Errorf("instance state lacks %q:\n%s\n%s", strings.TrimSpace(want), state, diag())
		}
	}

	// The environment file's flags and Group=kvm: sockets rw for group kvm.
	kvm, err := user.LookupGroup("kvm")
	if err != nil {
		t.Fatal(err)
	}
	for name, mode := range map[string]os.FileMode{"": 0o755, "vm1.sock": 0o660, "vm2.sock": 0o660} {
		fi, err := os.Stat(filepath.Join(runDir, "srv-pool", name))
		if err != nil {
			t.Fatal(err)
		}
		gid := strconv.Itoa(int(fi.Sys().(*syscall.Stat_t).Gid))
		if fi.Mode().Perm() != mode || gid != kvm.Gid {
			t.Errorf("/run/thinblk/srv-pool/%s: mode %v gid %s, want %v and group kvm (%s)", name, fi.Mode().Perm(), gid, mode, kvm.Gid)
		}
	}

	// Through the sandbox: a front-end on the host writes and reads a volume on both the
	// queues --queues 2 offers.
	dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer dcancel()
	disk, err := frontend.Dial(dctx, filepath.Join(runDir, "srv-pool", "vm1.sock"), frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatalf("dial vm1 served by the unit: %v\n%s", err, diag())
	}
	data := bytes.Repeat([]byte("thinblk-unit"), 4096)[:32<<10]
	if _, err := disk.WriteAt(data, 1<<20); err != nil {
		t.Fatalf("write: %v\n%s", err, diag())
	}
	if err := disk.Flush(); err != nil {
		t.Fatalf("flush: %v\n%s", err, diag())
	}
	got := make([]byte, len(data))
	if _, err := disk.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Errorf("read back through the unit: %v, equal %v", err, bytes.Equal(got, data))
	}
	disk.Close()

	haltStart := time.Now()
	halt()
	t.Logf("container halted in %.1fs", time.Since(haltStart).Seconds())
	logText, _ := os.ReadFile(filepath.Join(share, "serve.log"))
	for _, want := range []string{`"serving pool"`, `"ring started"`, `"shutting down"`} {
		if !bytes.Contains(logText, []byte(want)) {
			t.Errorf("serve's log under the unit lacks %s:\n%s", want, tailLines(string(logText), 30))
		}
	}
	// A queue whose io_uring cannot be set up (the system call filter) falls back to
	// synchronous I/O and says so.
	if bytes.Contains(logText, []byte("serves this queue synchronously")) {
		t.Errorf("io_uring unavailable under the unit's sandbox:\n%s", tailLines(string(logText), 30))
	}
	if bytes.Contains(logText, []byte("level=ERROR")) || bytes.Contains(logText, []byte("level=WARN")) {
		t.Errorf("serve logged errors or warnings under the unit's sandbox:\n%s", tailLines(string(logText), 30))
	}
	if out, err := exec.Command(thinblk, "check", pool).CombinedOutput(); err != nil {
		t.Errorf("thinblk check after the unit stopped: %v\n%s", err, out)
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
