package xfstests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/template"
	"time"
)

// GuestImage is the guest kernel and initramfs built by images/xfstests-image.sh.
type GuestImage struct {
	Kernel, Initrd string
	// Modules is the host path of the kernel's lib/modules tree, bind-mounted in the guest.
	Modules string
}

// EnsureGuestImage runs images/xfstests-image.sh (a no-op when up to date) with output in
// outDir and returns the image.
func EnsureGuestImage(ctx context.Context, repo, outDir string) (GuestImage, error) {
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(repo, "images", "xfstests-image.sh"), outDir)
	var logBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	if err := cmd.Run(); err != nil {
		return GuestImage{}, fmt.Errorf("build xfstests guest image: %w\n%s", err, logBuf.String())
	}
	mods, err := os.ReadFile(filepath.Join(outDir, "modules"))
	if err != nil {
		return GuestImage{}, fmt.Errorf("xfstests guest image: %w", err)
	}
	return GuestImage{
		Kernel:  filepath.Join(outDir, "vmlinuz"),
		Initrd:  filepath.Join(outDir, "initramfs.cpio.gz"),
		Modules: strings.TrimSpace(string(mods)),
	}, nil
}

// FirstDiskSlot is the PCI slot of the TEST disk; SCRATCH is the next one. The guest finds
// its disks by slot, never by probing order.
const FirstDiskSlot = 0x10

// Disk is one disk of the guest: a vhost-user-blk socket, or (File set) a raw file that
// QEMU serves itself with its own virtio-blk-pci device.
type Disk struct {
	Socket string
	File   string
	// Serial, when set, must be the serial the guest reads (thinblk reports the volume
	// name; qemu-storage-daemon reports "vhost_user_blk" for every disk, so it is left empty).
	Serial string
	Queues int
}

// VMLauncher runs check in a guest that boots with the host's root shared read-only (9p)
// under a tmpfs overlay, with TEST and SCRATCH on vhost-user-blk disks.
type VMLauncher struct {
	Image GuestImage
	// XfstestsDir is the xfstests tree (host path; the guest sees the same path).
	XfstestsDir string
	// RunDir is shared read-write with the guest at the same path: check's results, its
	// output, the guest script and the console log land here.
	RunDir     string
	ResultBase string // inside RunDir
	Config     Config
	Test       Disk
	Scratch    Disk
	// Args go to check before the tests (e.g. "-g", "quick" when no tests are given).
	Args     []string
	MemoryMB int // 0: 2048
	CPUs     int // 0: 2
	Logf     func(format string, args ...any)
}

// guestScript runs as PID 1 in the guest, on the host's userland.
var guestScript = template.Must(template.New("guest").Parse(`#!/bin/bash
# Written by thinblk-xfstests: prepares what xfstests needs at run time, finds the disks by
# PCI slot, runs check, and powers off. Output of check goes to {{.Out}}.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
status={{.Status}}
say() { echo "thinblk-xfstests-guest: [$(cut -d" " -f1 /proc/uptime)s] $*" | tee -a {{.Out}} >/dev/console; }
# PID 1 exiting panics the guest, and QEMU (-no-reboot) exits: the fallback if power-off fails.
finish() { sync; echo "$1" >"$status"; sync; echo o >/proc/sysrq-trigger; sleep 60; exit 1; }
[ -e /proc/self/fd ] || finish "setup failed: /proc is not procfs"
mountpoint -q /dev/pts || { mkdir -p /dev/pts && mount -t devpts -o gid=5,mode=620 devpts /dev/pts; }
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
# /tmp and /run are writable already (the root is a tmpfs overlay). No tmpfs on them: the
# run directory and the xfstests tree may live under them on the host (a checkout in /tmp),
# and a fresh mount would hide both.
chmod 1777 /tmp
mount -t debugfs debugfs /sys/kernel/debug || true
mount -t configfs configfs /sys/kernel/config 2>/dev/null || true
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin; ln -sfn /proc/self/fd/1 /dev/stdout; ln -sfn /proc/self/fd/2 /dev/stderr
ln -sfn /proc/mounts /etc/mtab
hostname thinblk-guest
echo "127.0.0.1 localhost thinblk-guest" >/etc/hosts
mkdir -p /var/lib /var/tmp /var/log && chmod 1777 /var/tmp
# The users and groups xfstests' permission tests switch to.
for u in fsgqa fsgqa2 123456-fsgqa; do id "$u" >/dev/null 2>&1 || useradd -m "$u"; done
getent group fsgqa >/dev/null || groupadd fsgqa
ip link set lo up 2>/dev/null || true
modprobe -a virtio_blk xfs ext4 loop dm_mod dm_flakey dm_snapshot dm_thin_pool dm_log_writes dm_delay dm_zero 2>&1 | tee -a {{.Out}} || true
# udev creates /dev/mapper nodes for the dm tests and /dev/disk/by-* links.
if [ -x /lib/systemd/systemd-udevd ]; then
	/lib/systemd/systemd-udevd --daemon
	udevadm trigger --action=add || true
	udevadm settle --timeout=60 || true
fi
dev_at() { local b; for b in /sys/bus/pci/devices/0000:00:$1.0/virtio*/block/*; do [ -e "$b" ] && echo "/dev/${b##*/}"; done; }
export THINBLK_TEST_DEV=$(dev_at {{.TestSlot}}) THINBLK_SCRATCH_DEV=$(dev_at {{.ScratchSlot}})
for d in "$THINBLK_TEST_DEV:{{.TestSerial}}" "$THINBLK_SCRATCH_DEV:{{.ScratchSerial}}"; do
	dev=${d%%:*} want=${d#*:}
	if [ ! -b "$dev" ]; then say "disk not found at its PCI slot (got '$dev')"; finish "setup failed: disks"; fi
	got=$(cat /sys/block/${dev#/dev/}/serial)
	say "disk $dev serial '$got' size $(blockdev --getsize64 $dev) queues $(ls /sys/block/${dev#/dev/}/mq | wc -l)"
	if [ -n "$want" ] && [ "$got" != "$want" ]; then say "disk $dev: serial '$got', want '$want'"; finish "setup failed: serial"; fi
done
mkdir -p {{.TestDir}} {{.ScratchMnt}}
{{if .Mkfs}}# TEST_DEV must hold a filesystem before check starts.
case {{.FSTYP}} in
xfs) mkfs.xfs -f -q "$THINBLK_TEST_DEV" ;;
ext4) mkfs.ext4 -F -q "$THINBLK_TEST_DEV" ;;
esac || { say "mkfs of TEST_DEV failed"; finish "setup failed: mkfs"; }
{{end}}say "starting check"
cd {{.XfstestsDir}}
HOST_OPTIONS={{.Config}} RESULT_BASE={{.ResultBase}} {{.Check}} 2>&1 | tee -a {{.Out}} >/dev/null
rc=${PIPESTATUS[0]}
say "check exited $rc"
finish "check exited $rc"
`))

// Start implements Launcher: one guest boot per session.
func (l *VMLauncher) Start(ctx context.Context, session int, tests []string, out io.Writer) (Session, error) {
	if l.MemoryMB == 0 {
		l.MemoryMB = 2048
	}
	if l.CPUs == 0 {
		l.CPUs = 2
	}
	if l.Logf == nil {
		l.Logf = func(string, ...any) {}
	}
	dir := filepath.Join(l.RunDir, fmt.Sprintf("session%d", session))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("session dir: %w", err)
	}
	text, err := l.Config.Render()
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(l.RunDir, "local.config")
	if err := writeFile(cfgPath, []byte(text)); err != nil {
		return nil, err
	}
	check := []string{"./check"}
	check = append(check, l.Args...)
	check = append(check, tests...)
	for i := range check {
		check[i] = shellQuote(check[i])
	}
	vars := map[string]any{
		"Out": shellQuote(filepath.Join(dir, "check.out")), "Status": shellQuote(filepath.Join(dir, "status")),
		"TestSlot": fmt.Sprintf("%02x", FirstDiskSlot), "ScratchSlot": fmt.Sprintf("%02x", FirstDiskSlot+1),
		"TestSerial": l.Test.Serial, "ScratchSerial": l.Scratch.Serial,
		"TestDir": shellQuote(l.Config.TestDir), "ScratchMnt": shellQuote(l.Config.ScratchMnt),
		"Mkfs": session == 1, "FSTYP": l.Config.FSTYP, "XfstestsDir": shellQuote(l.XfstestsDir),
		"Config": shellQuote(cfgPath), "ResultBase": shellQuote(l.ResultBase), "Check": strings.Join(check, " "),
	}
	for _, s := range []string{l.Test.Serial, l.Scratch.Serial} {
		if strings.ContainsAny(s, " :'\"$`\\") {
			return nil, fmt.Errorf("disk serial %q: unsupported characters", s)
		}
	}
	var script bytes.Buffer
	if err := guestScript.Execute(&script, vars); err != nil {
		return nil, fmt.Errorf("guest script: %w", err)
	}
	scriptPath := filepath.Join(dir, "guest.sh")
	if err := writeFile(scriptPath, script.Bytes()); err != nil {
		return nil, err
	}
	for _, f := range []string{"check.out", "status"} {
		_ = os.Remove(filepath.Join(dir, f))
	}
	if err := writeFile(filepath.Join(dir, "check.out"), nil); err != nil {
		return nil, err
	}
	argv := []string{
		"-accel", "tcg", "-cpu", "max",
		"-m", strconv.Itoa(l.MemoryMB), "-smp", strconv.Itoa(l.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", l.MemoryMB),
		"-numa", "node,memdev=mem",
		"-kernel", l.Image.Kernel, "-initrd", l.Image.Initrd,
		"-append", fmt.Sprintf("console=ttyS0 panic=-1 loglevel=4 thinblk.rundir=%s thinblk.script=%s thinblk.modules=%s",
			l.RunDir, scriptPath, l.Image.Modules),
		"-serial", "file:" + filepath.Join(dir, "console.log"),
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,id=hostroot",
		"-virtfs", "local,path=" + qemuEscape(l.RunDir) + ",mount_tag=rundir,security_model=none,id=rundir",
	}
	for i, d := range []Disk{l.Test, l.Scratch} {
		q := max(d.Queues, 1)
		if d.File != "" {
			// cache=none,aio=io_uring: O_DIRECT on the host file, as the other back-ends'
			// requests reach it without QEMU's page cache in between.
			argv = append(argv,
				"-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=disk%d,cache=none,aio=io_uring", qemuEscape(d.File), i),
				"-device", fmt.Sprintf("virtio-blk-pci,drive=disk%d,num-queues=%d,addr=0x%x", i, q, FirstDiskSlot+i))
			continue
		}
		argv = append(argv,
			"-chardev", fmt.Sprintf("socket,id=disk%d,path=%s", i, qemuEscape(d.Socket)),
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=disk%d,num-queues=%d,addr=0x%x", i, q, FirstDiskSlot+i))
	}
	for _, p := range []string{l.RunDir, scriptPath, l.Image.Modules} {
		if strings.ContainsAny(p, " \t\n") {
			return nil, fmt.Errorf("path %q: spaces do not survive the kernel command line", p)
		}
	}
	qlog, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		return nil, fmt.Errorf("qemu log: %w", err)
	}
	cmd := exec.Command("qemu-system-x86_64", argv...)
	cmd.Stdout, cmd.Stderr = qlog, qlog
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	l.Logf("session %d: qemu-system-x86_64 %s", session, strings.Join(argv, " "))
	if err := cmd.Start(); err != nil {
		qlog.Close()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	s := &vmSession{cmd: cmd, dir: dir, done: make(chan struct{})}
	exited := make(chan struct{})
	go func() {
		s.qemuErr = cmd.Wait()
		qlog.Close()
		close(exited)
	}()
	go func() {
		tailFile(filepath.Join(dir, "check.out"), out, exited)
		close(s.done)
	}()
	return s, nil
}

// qemuEscape doubles commas, QEMU's escape inside option values.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// tailFile copies what is appended to path to out until stop is closed, then the rest.
func tailFile(path string, out io.Writer, stop <-chan struct{}) {
	var off int64
	buf := make([]byte, 64<<10)
	read := func() {
		f, err := os.Open(path)
		if err != nil {
			return
		}
		defer f.Close()
		for {
			n, err := f.ReadAt(buf, off)
			if n > 0 {
				_, _ = out.Write(buf[:n])
				off += int64(n)
			}
			if err != nil || n == 0 {
				return
			}
		}
	}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			read()
			return
		case <-t.C:
			read()
		}
	}
}

type vmSession struct {
	cmd     *exec.Cmd
	dir     string
	done    chan struct{}
	qemuErr error
	once    sync.Once
}

// Wait returns when QEMU has exited and check's output is all read; the error says why the
// guest ended if check did not end on its own.
func (s *vmSession) Wait() error {
	<-s.done
	status, err := os.ReadFile(filepath.Join(s.dir, "status"))
	st := strings.TrimSpace(string(status))
	switch {
	case err != nil:
		return fmt.Errorf("guest ended without a status (qemu: %v); console: %s", s.qemuErr, filepath.Join(s.dir, "console.log"))
	case strings.HasPrefix(st, "check exited"):
		return nil
	default:
		return errors.New("guest: " + st)
	}
}

func (s *vmSession) Kill() {
	s.once.Do(func() { _ = s.cmd.Process.Kill() })
}
