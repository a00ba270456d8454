package guesttests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
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

// StartVMWithQMP boots a guest with StartVM, adding QMP monitors (and the
// guest agent's port). It always reaches the agent over virtio-serial.
func StartVMWithQMP(ctx context.Context, o QMPVMOptions) (*VM, QMPSockets, error) {
	vo := o.VMOptions
	vo.AgentTransport = "serial"
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
	for _, p := range []string{socks.QMP, socks.Watch, socks.QGA} {
		if p != "" {
			_ = os.Remove(p)
		}
	}
	vo.ExtraArgs = append(slices.Clone(vo.ExtraArgs),
		"-qmp", "unix:"+socks.QMP+",server=on,wait=off",
		"-qmp", "unix:"+socks.Watch+",server=on,wait=off")
	if o.GuestAgent {
		vo.ExtraArgs = append(vo.ExtraArgs,
			"-chardev", "socket,id=qga,server=on,wait=off,path="+socks.QGA,
			"-device", "virtserialport,bus=vser.0,chardev=qga,name=org.qemu.guest_agent.0")
	}
	vm, err := StartVM(ctx, vo)
	return vm, socks, err
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
	return StartBackend(ctx, BackendOptions{Kind: ThinPool, Image: pool, Socket: filepath.Join(sockDir, firstVolume+".sock"),
		LogPath: logPath, ThinblkBin: bin, ExtraArgs: extra})
}
