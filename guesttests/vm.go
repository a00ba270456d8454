package guesttests

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

// FirstDiskSlot is the PCI slot of VMOptions.Disks[0]; disk i sits at slot FirstDiskSlot+i,
// which is how the guest finds it again (vhost-user-blk-pci has no serial property: the
// serial comes from the back-end).
const FirstDiskSlot = 0x10

// VMOptions describe a guest.
type VMOptions struct {
	Dir      string // holds the agent socket, console and QEMU logs
	Images   Images
	MemoryMB int // 0: 1024; all of it shared memfd, as vhost-user needs
	CPUs     int // 0: 1
	Disks    []DiskSpec
	// Accel is "tcg", "kvm" or "" (try KVM, fall back to TCG: see DetectAccel).
	Accel string
	// BootTimeout bounds the time until the agent answers (0: 3 minutes).
	BootTimeout time.Duration
	// Logf, when set, gets progress lines.
	Logf func(format string, args ...any)
	// RunGrace is how long past a command's own time limit Run waits for the agent before it
	// declares the guest hung (0: 30s).
	RunGrace time.Duration
	// AgentTransport is "vsock", "serial" or "" (vsock when the host has vhost-vsock, else
	// serial; $THINBLK_AGENT_TRANSPORT overrides).
	AgentTransport string
	// ExtraArgs are appended to QEMU's command line (monitors, more ports: StartVMWithQMP).
	ExtraArgs []string
	// KernelArgs are appended to the guest kernel's command line.
	KernelArgs string
}

// DiskSpec is one vhost-user-blk disk.
type DiskSpec struct {
	Socket string
	Queues int // 0: 1
	// QEMUQueues leaves num-queues out: QEMU picks (one per vCPU), Queues is ignored.
	QEMUQueues bool
	// Reconnect makes QEMU reconnect to the back-end (once a second) after it goes away.
	Reconnect bool
}

// VM is a running guest with a connected agent.
type VM struct {
	Opts        VMOptions
	Accel       string
	ConsolePath string
	QEMULogPath string
	Agent       *agentproto.Client
	// Transport is how the agent is reached: "vsock" or "serial".
	Transport string

	cmd      *exec.Cmd
	exited   chan struct{}
	exitErr  error
	stopOnce sync.Once
}

// StartVM boots the guest and waits until its agent answers. On any failure the QEMU process
// is gone when it returns, and the error carries the console tail.
func StartVM(ctx context.Context, o VMOptions) (*VM, error) {
	if o.MemoryMB == 0 {
		o.MemoryMB = 1024
	}
	if o.CPUs == 0 {
		o.CPUs = 1
	}
	if o.BootTimeout == 0 {
		o.BootTimeout = 3 * time.Minute
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	if o.AgentTransport == "" {
		o.AgentTransport = os.Getenv("THINBLK_AGENT_TRANSPORT")
	}
	if o.AgentTransport == "" {
		o.AgentTransport = "serial"
		if HostHasVhostVsock() {
			o.AgentTransport = "vsock"
		}
	}
	if o.AgentTransport != "vsock" && o.AgentTransport != "serial" {
		return nil, fmt.Errorf("start vm: agent transport %q: want vsock or serial", o.AgentTransport)
	}
	accel := o.Accel
	if accel == "" {
		accel = DetectAccel(ctx, o)
	}
	return startVM(ctx, o, accel)
}

// HostHasVhostVsock reports whether QEMU can give guests a vsock device here: the
// vhost-vsock device must open, not merely exist.
func HostHasVhostVsock() bool {
	f, err := os.OpenFile("/dev/vhost-vsock", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// nextGuestCID hands out vsock context IDs, unique on the host while their VMs run: the
// process ID keeps parallel test processes apart, the counter VMs within one.
var nextGuestCID = struct {
	sync.Mutex
	n uint32
}{}

func guestCID() uint32 {
	nextGuestCID.Lock()
	defer nextGuestCID.Unlock()
	nextGuestCID.n++
	return 3 + uint32(os.Getpid()%(1<<20))<<8 + nextGuestCID.n%256
}

func startVM(ctx context.Context, o VMOptions, accel string) (*VM, error) {
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("start vm: %w", err)
	}
	vm := &VM{
		Opts:        o,
		Accel:       accel,
		ConsolePath: filepath.Join(o.Dir, "console.log"),
		QEMULogPath: filepath.Join(o.Dir, "qemu.log"),
		exited:      make(chan struct{}),
	}
	agentSock := filepath.Join(o.Dir, "agent.sock")
	_ = os.Remove(agentSock)
	_ = os.Remove(vm.ConsolePath)
	argv := []string{
		"-accel", accel,
		"-m", strconv.Itoa(o.MemoryMB), "-smp", strconv.Itoa(o.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", o.MemoryMB),
		"-numa", "node,memdev=mem",
		"-kernel", o.Images.Kernel, "-initrd", o.Images.Initrd,
		// no_timer_check: on a loaded host a TCG guest can fail the kernel's IO-APIC timer
		// check and panic at boot ("IO-APIC + timer doesn't work!"), seen here.
		"-append", strings.TrimSpace("console=ttyS0 panic=-1 loglevel=4 no_timer_check " + o.KernelArgs),
		"-serial", "file:" + vm.ConsolePath,
		"-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=agent,server=on,wait=off,path=" + agentSock,
		"-device", "virtserialport,bus=vser.0,chardev=agent,name=" + agentproto.SerialPortName,
	}
	var cid uint32
	if o.AgentTransport == "vsock" {
		cid = guestCID()
		argv = append(argv, "-device", fmt.Sprintf("vhost-vsock-pci,guest-cid=%d", cid))
	}
	if accel == "tcg" {
		// TCG's default CPU model lacks SSE4.2; with max the guest's crc32c-intel (used by
		// XFS and ext4 metadata checksums) loads.
		argv = append(argv, "-cpu", "max")
	} else {
		argv = append(argv, "-cpu", "host")
	}
	for i, d := range o.Disks {
		q := d.Queues
		if q == 0 {
			q = 1
		}
		reconnect := ""
		if d.Reconnect {
			reconnect = ",reconnect=1"
		}
		numQueues := fmt.Sprintf(",num-queues=%d", q)
		if d.QEMUQueues {
			numQueues = ""
		}
		argv = append(argv,
			"-chardev", fmt.Sprintf("socket,id=disk%d,path=%s%s", i, d.Socket, reconnect),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=disk%d%s,addr=0x%x", i, numQueues, FirstDiskSlot+i))
	}
	argv = append(argv, o.ExtraArgs...)
	logf, err := os.Create(vm.QEMULogPath)
	if err != nil {
		return nil, fmt.Errorf("start vm: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command("qemu-system-x86_64", argv...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	o.Logf("vm: qemu-system-x86_64 %s", strings.Join(argv, " "))
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	vm.cmd = cmd
	go func() {
		vm.exitErr = cmd.Wait()
		close(vm.exited)
	}()

	bootCtx, cancel := context.WithTimeout(ctx, o.BootTimeout)
	defer cancel()
	bootCtx, stop := vm.bindContext(bootCtx)
	defer stop()
	if accel == "kvm" {
		// Broken nested KVM stops the guest with an internal error but leaves QEMU running:
		// notice it in the log instead of waiting out the boot timeout.
		var kvmFailed context.CancelCauseFunc
		bootCtx, kvmFailed = context.WithCancelCause(bootCtx)
		go watchLog(bootCtx, vm.QEMULogPath, "KVM internal error", kvmFailed)
	}
	start := time.Now()
	vm.Transport = o.AgentTransport
	var conn net.Conn
	if o.AgentTransport == "vsock" {
		conn, err = dialVsock(bootCtx, cid, agentproto.VsockPort)
	} else {
		conn, err = dialUnix(bootCtx, agentSock)
	}
	if err == nil {
		vm.Agent = agentproto.NewClient(conn)
		err = vm.Agent.Ping(bootCtx)
	}
	if err != nil {
		vm.Kill()
		return nil, fmt.Errorf("boot vm (%s): agent did not answer: %w\n%s", accel, err, vm.Diagnostics())
	}
	o.Logf("vm: agent answered over %s %.1fs after start (%s)", vm.Transport, time.Since(start).Seconds(), accel)
	return vm, nil
}

// bindContext returns a context that also ends when QEMU exits, so no call waits on a dead VM.
func (vm *VM) bindContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	go func() {
		select {
		case <-vm.exited:
			cancel(fmt.Errorf("qemu exited: %v", vm.exitErr))
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// Exited is closed when the QEMU process has ended.
func (vm *VM) Exited() <-chan struct{} { return vm.exited }

// Run runs a shell script in the guest (sh -c) with a time limit; a hang past it kills the
// command in the guest, and if the agent itself stops answering, the call fails once timeout
// plus a grace period has passed.
func (vm *VM) Run(ctx context.Context, timeout time.Duration, script string) (*agentproto.ExecResult, error) {
	grace := vm.Opts.RunGrace
	if grace == 0 {
		grace = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout+grace)
	defer cancel()
	ctx, stop := vm.bindContext(ctx)
	defer stop()
	return vm.Agent.Exec(ctx, []string{"/bin/sh", "-c", script}, nil, nil, timeout)
}

// DiskDevice returns the guest's /dev path of disk i (by its PCI slot).
func (vm *VM) DiskDevice(ctx context.Context, i int) (string, error) {
	script := fmt.Sprintf(`for b in /sys/bus/pci/devices/0000:00:%02x.0/virtio*/block/*; do [ -e "$b" ] && echo "${b##*/}"; done`, FirstDiskSlot+i)
	res, err := vm.Run(ctx, 20*time.Second, script)
	if err != nil {
		return "", fmt.Errorf("find disk %d: %w", i, err)
	}
	name := strings.TrimSpace(string(res.Stdout))
	if res.ExitCode != 0 || name == "" || strings.Contains(name, "\n") {
		return "", fmt.Errorf("find disk %d at PCI slot 0x%x: got %q (exit %d, %s)", i, FirstDiskSlot+i, name, res.ExitCode, res.Stderr)
	}
	return "/dev/" + name, nil
}

// DiskBySerial returns the guest's /dev path of the virtio disk whose serial (the back-end's
// GET_ID answer) is serial.
func (vm *VM) DiskBySerial(ctx context.Context, serial string) (string, error) {
	res, err := vm.Run(ctx, 20*time.Second, `for b in /sys/block/vd*; do printf '%s\t%s\n' "${b##*/}" "$(cat $b/serial)"; done`)
	if err != nil {
		return "", fmt.Errorf("find disk with serial %q: %w", serial, err)
	}
	var found []string
	for _, line := range strings.Split(string(res.Stdout), "\n") {
		name, s, ok := strings.Cut(line, "\t")
		if ok && s == serial {
			found = append(found, "/dev/"+name)
		}
	}
	if len(found) != 1 {
		return "", fmt.Errorf("find disk with serial %q: found %v in %q", serial, found, res.Stdout)
	}
	return found[0], nil
}

// Shutdown powers the guest off through the agent and waits for QEMU to exit; past timeout it
// kills QEMU and returns an error.
func (vm *VM) Shutdown(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	bctx, stop := vm.bindContext(ctx)
	err := vm.Agent.PowerOff(bctx)
	stop()
	if err == nil {
		select {
		case <-vm.exited:
			vm.Agent.Close()
			return nil
		case <-ctx.Done():
			err = errors.New("qemu still running after power off")
		}
	}
	select {
	case <-vm.exited:
		vm.Agent.Close()
		return nil // it went down anyway (the acknowledgement raced the power off)
	default:
	}
	vm.Kill()
	return fmt.Errorf("shut down vm: %w\n%s", err, vm.Diagnostics())
}

// Kill ends QEMU at once and waits for it. Safe to call more than once.
func (vm *VM) Kill() {
	vm.stopOnce.Do(func() {
		if vm.cmd != nil {
			_ = vm.cmd.Process.Kill()
			<-vm.exited
		}
		if vm.Agent != nil {
			vm.Agent.Close()
		}
	})
}

// Diagnostics returns the tails of the console and QEMU logs, for failure messages.
func (vm *VM) Diagnostics() string {
	var b strings.Builder
	if data, err := os.ReadFile(vm.ConsolePath); err == nil {
		if report := kernelReport(string(data)); report != "" {
			fmt.Fprintf(&b, "--- kernel report (%s) ---\n%s\n", vm.ConsolePath, report)
		}
		fmt.Fprintf(&b, "--- console tail (%s) ---\n%s\n", vm.ConsolePath, tail(string(data), 30))
	}
	if data, err := os.ReadFile(vm.QEMULogPath); err == nil && len(data) > 0 {
		fmt.Fprintf(&b, "--- qemu log tail (%s) ---\n%s\n", vm.QEMULogPath, tail(string(data), 15))
	}
	return b.String()
}

var accelCache struct {
	sync.Mutex
	accel string
}

// DetectAccel decides between KVM and TCG by really trying KVM: /dev/kvm can exist while
// nested KVM fails on the first instructions. $THINBLK_ACCEL (tcg or kvm) skips the probe.
// The probe boots the guest without disks under KVM and needs its agent to answer; the answer
// is remembered for the process.
func DetectAccel(ctx context.Context, o VMOptions) string {
	if a := os.Getenv("THINBLK_ACCEL"); a != "" {
		return a
	}
	accelCache.Lock()
	defer accelCache.Unlock()
	if accelCache.accel != "" {
		return accelCache.accel
	}
	accelCache.accel = "tcg"
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		o.Logf("vm: no usable /dev/kvm (%v): using tcg", err)
		return accelCache.accel
	}
	f.Close()
	probe := o
	probe.Disks = nil
	probe.Dir = filepath.Join(o.Dir, "kvm-probe")
	probe.BootTimeout = 45 * time.Second
	vm, err := startVM(ctx, probe, "kvm")
	if err != nil {
		o.Logf("vm: kvm probe failed, using tcg: %v", firstLine(err.Error()))
		return accelCache.accel
	}
	vm.Kill()
	accelCache.accel = "kvm"
	o.Logf("vm: kvm works")
	return accelCache.accel
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// dialVsock connects to the agent in guest cid, retrying while the guest boots.
func dialVsock(ctx context.Context, cid, port uint32) (net.Conn, error) {
	for {
		c, err := vsock.DialContext(ctx, cid, port, nil)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("dial vsock %d:%d: %w (last error: %v)", cid, port, ctx.Err(), err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// watchLog cancels ctx with an error once the file contains needle.
func watchLog(ctx context.Context, path, needle string, cancel context.CancelCauseFunc) {
	t := time.NewTicker(300 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if data, err := os.ReadFile(path); err == nil && strings.Contains(string(data), needle) {
			cancel(errors.New("qemu log says " + needle))
			return
		}
	}
}
