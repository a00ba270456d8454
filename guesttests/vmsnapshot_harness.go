package guesttests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

// QMPSockets are the extra host sockets of a guest started by StartVMWithQMP.
type QMPSockets struct {
	// QMP and Watch are two QEMU monitors: QEMU serves one client per QMP
	// socket, so a test watches events on one while the code under test
	// drives the other.
	QMP, Watch string
	// QGA is the host side of the virtio-serial port named
	// org.qemu.guest_agent.0, where qemu-ga listens in the guest (empty
	// without GuestAgent).
	QGA string
}

// QMPVMOptions add to VMOptions what vm-snapshot tests need.
type QMPVMOptions struct {
	VMOptions
	// GuestAgent adds the qemu-ga port; the guest must start qemu-ga itself
	// (StartGuestAgent).
	GuestAgent bool
	// ExtraInitrd is appended to the initramfs (the kernel unpacks
	// concatenated cpio archives in order), e.g. from QEMUGuestAgentCpio.
	ExtraInitrd string
}

// StartVMWithQMP boots a guest like StartVM, with QMP monitors (and the
// guest agent's port) added. It always reaches the agent over
// virtio-serial. It is StartVM's boot sequence with more QEMU arguments:
// the shared harness has no hook for extra arguments.
func StartVMWithQMP(ctx context.Context, o QMPVMOptions) (*VM, QMPSockets, error) {
	vo := o.VMOptions
	if vo.MemoryMB == 0 {
		vo.MemoryMB = 1024
	}
	if vo.CPUs == 0 {
		vo.CPUs = 1
	}
	if vo.BootTimeout == 0 {
		vo.BootTimeout = 3 * time.Minute
	}
	if vo.Logf == nil {
		vo.Logf = func(string, ...any) {}
	}
	vo.AgentTransport = "serial"
	accel := vo.Accel
	if accel == "" {
		accel = DetectAccel(ctx, vo)
	}
	if err := os.MkdirAll(vo.Dir, 0o755); err != nil {
		return nil, QMPSockets{}, err
	}
	socks := QMPSockets{QMP: filepath.Join(vo.Dir, "qmp.sock"), Watch: filepath.Join(vo.Dir, "watch.sock")}
	if o.GuestAgent {
		socks.QGA = filepath.Join(vo.Dir, "qga.sock")
	}
	if o.ExtraInitrd != "" {
		joined := filepath.Join(vo.Dir, "initrd.img")
		if err := concatFiles(joined, vo.Images.Initrd, o.ExtraInitrd); err != nil {
			return nil, socks, err
		}
		vo.Images.Initrd = joined
	}
	vm := &VM{
		Opts: vo, Accel: accel, Transport: "serial",
		ConsolePath: filepath.Join(vo.Dir, "console.log"),
		QEMULogPath: filepath.Join(vo.Dir, "qemu.log"),
		exited:      make(chan struct{}),
	}
	agentSock := filepath.Join(vo.Dir, "agent.sock")
	for _, p := range []string{agentSock, vm.ConsolePath, socks.QMP, socks.Watch, socks.QGA} {
		if p != "" {
			_ = os.Remove(p)
		}
	}
	argv := []string{
		"-accel", accel,
		"-m", strconv.Itoa(vo.MemoryMB), "-smp", strconv.Itoa(vo.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", vo.MemoryMB),
		"-numa", "node,memdev=mem",
		"-kernel", vo.Images.Kernel, "-initrd", vo.Images.Initrd,
		// no_timer_check: on a loaded host TCG can fail the kernel's IO-APIC timer check
		// ("IO-APIC + timer doesn't work!") and panic the boot.
		"-append", "console=ttyS0 panic=-1 loglevel=4 no_timer_check",
		"-serial", "file:" + vm.ConsolePath,
		"-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=agent,server=on,wait=off,path=" + agentSock,
		"-device", "virtserialport,bus=vser.0,chardev=agent,name=" + agentproto.SerialPortName,
		"-qmp", "unix:" + socks.QMP + ",server=on,wait=off",
		"-qmp", "unix:" + socks.Watch + ",server=on,wait=off",
	}
	if o.GuestAgent {
		argv = append(argv,
			"-chardev", "socket,id=qga,server=on,wait=off,path="+socks.QGA,
			"-device", "virtserialport,bus=vser.0,chardev=qga,name=org.qemu.guest_agent.0")
	}
	if accel == "tcg" {
		argv = append(argv, "-cpu", "max")
	} else {
		argv = append(argv, "-cpu", "host")
	}
	for i, d := range vo.Disks {
		q := max(d.Queues, 1)
		reconnect := ""
		if d.Reconnect {
			reconnect = ",reconnect=1"
		}
		argv = append(argv,
			"-chardev", fmt.Sprintf("socket,id=disk%d,path=%s%s", i, d.Socket, reconnect),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=disk%d,num-queues=%d,addr=0x%x", i, q, FirstDiskSlot+i))
	}
	logf, err := os.Create(vm.QEMULogPath)
	if err != nil {
		return nil, socks, err
	}
	defer logf.Close()
	cmd := exec.Command("qemu-system-x86_64", argv...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	vo.Logf("vm: qemu-system-x86_64 %s", strings.Join(argv, " "))
	if err := cmd.Start(); err != nil {
		return nil, socks, fmt.Errorf("start qemu: %w", err)
	}
	vm.cmd = cmd
	go func() {
		vm.exitErr = cmd.Wait()
		close(vm.exited)
	}()
	bootCtx, cancel := context.WithTimeout(ctx, vo.BootTimeout)
	defer cancel()
	bootCtx, stop := vm.bindContext(bootCtx)
	defer stop()
	start := time.Now()
	conn, err := dialUnix(bootCtx, agentSock)
	if err == nil {
		vm.Agent = agentproto.NewClient(conn)
		err = vm.Agent.Ping(bootCtx)
	}
	if err != nil {
		vm.Kill()
		return nil, socks, fmt.Errorf("boot vm (%s): agent did not answer: %w\n%s", accel, err, vm.Diagnostics())
	}
	vo.Logf("vm: agent answered %.1fs after start (%s)", time.Since(start).Seconds(), accel)
	return vm, socks, nil
}

// concatFiles joins initramfs archives. Each is padded with zeros to a
// multiple of 4 bytes: the kernel takes an uncompressed cpio archive only
// at a 4-byte boundary (and skips zeros between archives).
func concatFiles(dst string, srcs ...string) error {
	var all []byte
	for _, s := range srcs {
		b, err := os.ReadFile(s)
		if err != nil {
			return err
		}
		all = append(all, b...)
		for len(all)%4 != 0 {
			all = append(all, 0)
		}
	}
	return os.WriteFile(dst, all, 0o644)
}

// QEMUGuestAgentCpio writes a cpio archive (newc) holding the host's
// qemu-ga and the libraries ldd lists for it, for StartVMWithQMP's
// ExtraInitrd. It installs the Debian package qemu-guest-agent when the
// binary is missing.
func QEMUGuestAgentCpio(ctx context.Context, out string) error {
	const bin = "/usr/sbin/qemu-ga"
	if _, err := os.Stat(bin); err != nil {
		cmd := exec.CommandContext(ctx, "apt-get", "install", "-y", "--no-install-recommends", "qemu-guest-agent")
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("install qemu-guest-agent: %w\n%s", err, tail(string(b), 20))
		}
	}
	files := []string{bin}
	ldd, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %w", bin, err)
	}
	for _, line := range strings.Split(string(ldd), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				files = append(files, f)
			}
		}
	}
	// Symlinks in the list (/lib64/ld-linux...) are copied as the files
	// they point to: cpio -L.
	cmd := exec.CommandContext(ctx, "cpio", "-o", "-H", "newc", "-L", "--quiet")
	cmd.Dir = "/"
	var in bytes.Buffer
	for _, f := range files {
		in.WriteString(strings.TrimPrefix(f, "/") + "\n")
	}
	cmd.Stdin = &in
	outF, err := os.Create(out)
	if err != nil {
		return err
	}
	defer outF.Close()
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = outF, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("cpio: %w\n%s", err, stderr.String())
	}
	return outF.Close()
}

// StartGuestAgent starts qemu-ga in the guest on its virtio-serial port
// (found by name in sysfs: the initramfs has no udev for
// /dev/virtio-ports) and waits until it runs.
func StartGuestAgent(ctx context.Context, vm *VM) error {
	script := `set -e
port=
for p in /sys/class/virtio-ports/*; do
	[ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
[ -n "$port" ] || { echo "no org.qemu.guest_agent.0 port" >&2; exit 1; }
mkdir -p /var/run /run
qemu-ga -m virtio-serial -p "$port" -d -f /run/qemu-ga.pid
for i in $(seq 50); do [ -s /run/qemu-ga.pid ] && exit 0; sleep 0.1; done
echo "qemu-ga did not start" >&2; exit 1`
	res, err := vm.Run(ctx, time.Minute, script)
	if err != nil {
		return fmt.Errorf("start qemu-ga: %w", err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("start qemu-ga: exit %d: %s%s", res.ExitCode, res.Stdout, res.Stderr)
	}
	return nil
}

// StartThinPoolServe runs `thinblk serve POOL --socket-dir DIR EXTRA...` for flags that
// BackendOptions has no field for (--qemu-qmp), and waits for the socket of the first volume.
func StartThinPoolServe(ctx context.Context, bin, pool, sockDir, logPath string, extra []string, firstVolume string) (*Backend, error) {
	if err := os.MkdirAll(sockDir, 0o755); err != nil {
		return nil, err
	}
	o := BackendOptions{Kind: ThinPool, Image: pool, Socket: filepath.Join(sockDir, firstVolume+".sock"), LogPath: logPath, ThinblkBin: bin}
	b := &Backend{Opts: o, exited: make(chan struct{})}
	argv := append([]string{"serve", pool, "--socket-dir", sockDir}, extra...)
	cmd := exec.Command(bin, argv...)
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	b.log = f
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.closeLog()
		return nil, fmt.Errorf("start thinblk serve: %w", err)
	}
	b.cmd = cmd
	go func() {
		b.err = cmd.Wait()
		close(b.exited)
	}()
	if err := b.waitSocket(ctx, 15*time.Second); err != nil {
		b.Kill()
		return nil, err
	}
	return b, nil
}
