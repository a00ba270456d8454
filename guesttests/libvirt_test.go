package guesttests

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

// readmeSocket is the socket path the README's libvirt XML names; the test puts its own there.
const readmeSocket = "/run/thinblk/vm1.sock"

// readmeLibvirtXML returns the two parts of the README's libvirt block ("Attaching it to
// libvirt"): what goes in <domain> (the memory backing) and what goes in <devices> (the disk).
func readmeLibvirtXML(root string) (domainPart, devicePart string, err error) {
	data, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		return "", "", err
	}
	s := string(data)
	i := strings.Index(s, "### Attaching it to libvirt\n")
	if i < 0 {
		return "", "", errors.New("README.md has no \"### Attaching it to libvirt\" section")
	}
	s = s[i:]
	start := strings.Index(s, "```xml\n")
	if start < 0 {
		return "", "", errors.New("README.md's libvirt section has no ```xml block")
	}
	s = s[start+len("```xml\n"):]
	end := strings.Index(s, "```")
	if end < 0 {
		return "", "", errors.New("README.md's libvirt xml block does not end")
	}
	domainPart, devicePart, ok := strings.Cut(s[:end], "\n...\n")
	if !ok {
		return "", "", errors.New("README.md's libvirt xml block has no \"...\" line between the domain and device parts")
	}
	if strings.Count(devicePart, readmeSocket) != 1 {
		return "", "", fmt.Errorf("README.md's libvirt disk does not name the socket %s once", readmeSocket)
	}
	return domainPart, devicePart, nil
}

// libvirtd is a libvirt daemon private to one test: its own configuration, state, runtime and
// log directories (bind-mounted over the system ones in a mount namespace of its own, so the
// host's libvirt, if any, is untouched) and its own socket directory.
type libvirtd struct {
	dir  string // its root: etc, run, lib, cache, log, sock
	uri  string
	cmd  *exec.Cmd
	done chan struct{}
}

// libvirtdConf and qemuConf configure the private daemon. QEMU runs as Debian's default user,
// libvirt-qemu:kvm, and reaches thinblk's socket the way the README tells operators to arrange
// it (group kvm, mode 0660); libvirt changes no file's owner (dynamic_ownership = 0: the test
// makes its files readable) and there is no AppArmor or SELinux here (security_driver =
// "none"); no cgroups or namespaces (nothing here is managed by systemd); QEMU's output goes
// to a file, not through virtlogd.
const (
	libvirtdConf = `unix_sock_dir = "%s"
auth_unix_rw = "none"
auth_unix_ro = "none"
`
	libvirtQEMUConf = `dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
`
)

// libvirtSystemDirs are the privileged daemon's fixed directories, each replaced by one of the
// test's.
var libvirtSystemDirs = map[string]string{
	"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
	"cache": "/var/cache/libvirt", "log": "/var/log/libvirt",
}

func startLibvirtd(t *testing.T, dir string) *libvirtd {
	t.Helper()
	d := &libvirtd{dir: dir, done: make(chan struct{})}
	sock := filepath.Join(dir, "sock")
	d.uri = "qemu:///system?socket=" + filepath.Join(sock, "libvirt-sock")
	for _, sub := range []string{"etc", "run", "lib", "cache", "log", "sock"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc", "libvirtd.conf"), []byte(fmt.Sprintf(libvirtdConf, sock)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "etc", "qemu.conf"), []byte(libvirtQEMUConf), 0o644); err != nil {
		t.Fatal(err)
	}
	// A shell in the new mount namespace mounts the private directories, then becomes the
	// daemon (the namespace goes with it). The mount points are the package's own
	// directories; those missing are created empty.
	var script strings.Builder
	script.WriteString("set -e\n")
	for sub, sys := range libvirtSystemDirs {
		fmt.Fprintf(&script, "mkdir -p %s\nmount --bind %s %s\n", sys, filepath.Join(dir, sub), sys)
	}
	fmt.Fprintf(&script, "exec libvirtd --config /etc/libvirt/libvirtd.conf --pid-file %s\n", filepath.Join(dir, "run", "libvirtd.pid"))
	logf, err := os.Create(filepath.Join(dir, "libvirtd.log"))
	if err != nil {
		t.Fatal(err)
	}
	d.cmd = exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script.String())
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start libvirtd: %v", err)
	}
	go func() {
		d.cmd.Wait()
		logf.Close()
		close(d.done)
	}()
	t.Cleanup(d.stop)
	for {
		if _, err := d.virsh("version"); err == nil {
			break
		}
		select {
		case <-d.done:
			t.Fatalf("libvirtd exited: %v\n%s", d.cmd.ProcessState, d.log())
		case <-time.After(200 * time.Millisecond):
		}
		if time.Since(start) > time.Minute {
			t.Fatalf("libvirtd does not answer after a minute\n%s", d.log())
		}
	}
	t.Logf("libvirtd answers %.1fs after start", time.Since(start).Seconds())
	return d
}

// stop destroys the daemon's running domains (QEMU outlives libvirtd otherwise), then ends it.
func (d *libvirtd) stop() {
	if out, err := d.virsh("list", "--name"); err == nil {
		for _, name := range strings.Fields(out) {
			d.virsh("destroy", name)
		}
	}
	// A QEMU left by a destroy that failed still has its pid file; it is killed only if that
	// process really is one of this daemon's: it lives in the daemon's mount namespace.
	ownNS, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", d.cmd.Process.Pid))
	pids, _ := filepath.Glob(filepath.Join(d.dir, "run", "qemu", "*.pid"))
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && ownNS != "" && ns == ownNS {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
}

func (d *libvirtd) log() string {
	b, _ := os.ReadFile(filepath.Join(d.dir, "libvirtd.log"))
	return tail(string(b), 30)
}

// virsh runs virsh against the private daemon and returns its stdout.
func (d *libvirtd) virsh(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-c", d.uri}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (d *libvirtd) mustVirsh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := d.virsh(args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, d.log())
	}
	return out
}

// libvirtDomainXML is the test's domain: the harness's kernel and initramfs booted directly
// under TCG, its agent on a virtio-serial port and its console in a file, as StartVM does;
// %[4]s and %[5]s are the README's two parts.
const libvirtDomainXML = `<domain type='qemu'>
  <name>%[1]s</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
%[4]s
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%[2]s</kernel>
    <initrd>%[3]s</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 no_timer_check</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
%[5]s
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind' path='%[6]s'/>
      <target type='virtio' name='%[7]s'/>
    </channel>
    <serial type='file'>
      <source path='%[8]s'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
`

// attachLibvirtGuest connects to the agent of a domain libvirt started (its channel socket)
// and wraps it as a VM: the harness's checks then run unchanged. Its exited channel is closed
// by the caller when it stops the domain.
func attachLibvirtGuest(t *testing.T, dir, agentSock, console, qemuLog string) (*VM, error) {
	vm := &VM{
		Opts:        VMOptions{Dir: dir},
		Accel:       "tcg",
		ConsolePath: console,
		QEMULogPath: qemuLog,
		Transport:   "serial",
		exited:      make(chan struct{}),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	conn, err := dialUnix(ctx, agentSock)
	if err == nil {
		vm.Agent = agentproto.NewClient(conn)
		err = vm.Agent.Ping(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("libvirt guest: agent did not answer: %w\n%s", err, vm.Diagnostics())
	}
	t.Logf("libvirt guest: agent answered %.1fs after connecting", time.Since(start).Seconds())
	return vm, nil
}

// TestGuestLibvirt gives the README's libvirt XML to a real libvirt daemon (Debian's
// libvirt-daemon-system, run directly in a private mount namespace) for a TCG domain on a
// thin volume: the guest finds the disk, writes and reads it; virsh domblklist lists it;
// suspend stops the guest's CPUs in QEMU and resume lets I/O go on; a serve restart is
// survived through <reconnect>; destroy and start boot the domain again on the same data.
func TestGuestLibvirt(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the volume is a thinblk pool's")
	}
	for _, tool := range []string{"libvirtd", "virsh", "unshare"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (make deps installs libvirt-daemon-system and libvirt-clients): %v", tool, err)
		}
	}
	domainPart, devicePart, err := readmeLibvirtXML(e.root)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dir := workDir(t)
	pool := filepath.Join(dir, "pool")
	socks := filepath.Join(dir, "socks")
	const volSize = 256 << 20
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "1G"},
		{"volume", "create", pool, "vm1", "--size", strconv.Itoa(volSize)},
	} {
		if _, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatal(err)
		}
	}
	// QEMU runs as libvirt-qemu:kvm. As the README says: the socket directory belongs to group
	// kvm with the setgid bit (sockets inherit the group), serve makes its sockets 0660. The
	// kernel and initramfs are copied where that user can read them.
	qemuUser, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatalf("libvirt's QEMU user: %v", err)
	}
	kvm, err := user.LookupGroup("kvm")
	if err != nil {
		t.Fatalf("libvirt's QEMU group: %v", err)
	}
	kvmGID, _ := strconv.Atoi(kvm.Gid)
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(socks, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(socks, -1, kvmGID); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(socks, 0o750|os.ModeSetgid); err != nil {
		t.Fatal(err)
	}
	images := Images{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initramfs.cpio.gz")}
	for src, dst := range map[string]string{e.images.Kernel: images.Kernel, e.images.Initrd: images.Initrd} {
		data, err := os.ReadFile(src)
		if err == nil {
			err = os.WriteFile(dst, data, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	volSock := filepath.Join(socks, "vm1.sock")
	serve := func() *Backend {
		// Two queues: the README's disk asks for two.
		b, err := StartBackend(ctx, BackendOptions{
			Kind: ThinPool, Image: pool, Socket: volSock, Queues: 2,
			LogPath: filepath.Join(dir, "serve.log"), ThinblkBin: e.thinblk,
			ExtraArgs: []string{"--socket-mode", "0660"},
		})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b := serve()
	// b is replaced by the restart step; stop whichever runs last.
	t.Cleanup(func() { b.Stop(15 * time.Second) })

	lv := startLibvirtd(t, filepath.Join(dir, "libvirt"))
	const name = "thinblk-libvirt"
	agentSock := filepath.Join(dir, "agent.sock")
	console := filepath.Join(dir, "console.log")
	qemuLog := filepath.Join(lv.dir, "log", "qemu", name+".log")
	xml := fmt.Sprintf(libvirtDomainXML, name, images.Kernel, images.Initrd,
		domainPart, strings.ReplaceAll(devicePart, readmeSocket, volSock),
		agentSock, agentproto.SerialPortName, console)
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}
	lv.mustVirsh(t, "define", xmlPath)

	// boot starts the domain and returns its guest and the guest's /dev path of the volume
	// (found by its serial, the volume name).
	var vm *VM
	boot := func() (guest, string) {
		t.Helper()
		start := time.Now()
		lv.mustVirsh(t, "start", name)
		var err error
		vm, err = attachLibvirtGuest(t, dir, agentSock, console, qemuLog)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("domain booted to its agent in %.1fs", time.Since(start).Seconds())
		g := newGuest(t, vm)
		dev, err := vm.DiskBySerial(ctx, "vm1")
		if err != nil {
			t.Fatalf("%v\n%s", err, vm.Diagnostics())
		}
		return g, dev
	}
	domState := func() string {
		t.Helper()
		return strings.TrimSpace(lv.mustVirsh(t, "domstate", name))
	}
	// qemuStatus asks QEMU itself, through libvirt's monitor, whether the vCPUs run.
	qemuStatus := func() string {
		t.Helper()
		out := lv.mustVirsh(t, "qemu-monitor-command", name, `{"execute":"query-status"}`)
		for _, s := range []string{"running", "paused"} {
			if strings.Contains(out, `"status":"`+s+`"`) {
				return s
			}
		}
		t.Fatalf("query-status answered %s", out)
		return ""
	}
	sum := func(g guest, dev string, skipMiB int) string {
		t.Helper()
		return strings.Fields(g.sh(t, time.Minute, fmt.Sprintf("dd if=%s bs=1M skip=%d count=4 iflag=direct 2>/dev/null | sha256sum", dev, skipMiB)))[0]
	}
	write := func(g guest, dev string, seekMiB int) string {
		t.Helper()
		g.sh(t, time.Minute, fmt.Sprintf("dd if=/dev/urandom of=%s bs=1M seek=%d count=4 oflag=direct conv=fsync 2>/dev/null", dev, seekMiB))
		return sum(g, dev, seekMiB)
	}
	mapped := func() int64 {
		t.Helper()
		st, err := ThinblkStatus(ctx, e.thinblk, pool)
		if err != nil {
			t.Fatal(err)
		}
		v, ok := st.Volume("vm1")
		if !ok {
			t.Fatalf("status has no volume vm1: %+v", st)
		}
		return v.MappedBytes
	}

	g, dev := boot()
	if got := strings.TrimSpace(g.sh(t, 20*time.Second, "blockdev --getsize64 "+dev)); got != strconv.Itoa(volSize) {
		t.Errorf("guest sees %s bytes on %s, want %d", got, dev, volSize)
	}
	// The README's queues='2' reaches QEMU (a 1-vCPU guest's driver uses only one of them).
	if log, err := os.ReadFile(qemuLog); err != nil || !bytes.Contains(log, []byte(`"driver":"vhost-user-blk-pci","num-queues":2,`)) {
		t.Errorf("QEMU's command line has no 2-queue vhost-user-blk-pci (%v):\n%s", err, log)
	}
	// The front-end serve saw is QEMU as libvirt-qemu.
	if log, _ := os.ReadFile(filepath.Join(dir, "serve.log")); !bytes.Contains(log, []byte("peer_uid="+qemuUser.Uid+" ")) {
		t.Errorf("serve's front-end was not QEMU as libvirt-qemu (uid %s):\n%s", qemuUser.Uid, tail(string(log), 10))
	}
	sumA := write(g, dev, 8)
	if m := mapped(); m < 4<<20 {
		t.Errorf("after the guest wrote 4 MiB through libvirt's disk, the volume maps %d bytes", m)
	}

	out := lv.mustVirsh(t, "domblklist", name)
	if !strings.Contains(out, "vda") || !strings.Contains(out, volSock) {
		t.Errorf("virsh domblklist does not list vda on %s:\n%s", volSock, out)
	}

	lv.mustVirsh(t, "suspend", name)
	if s, q := domState(), qemuStatus(); s != "paused" || q != "paused" {
		t.Errorf("after virsh suspend: domstate %q, QEMU %q; want paused", s, q)
	}
	lv.mustVirsh(t, "resume", name)
	if s, q := domState(), qemuStatus(); s != "running" || q != "running" {
		t.Errorf("after virsh resume: domstate %q, QEMU %q; want running", s, q)
	}
	sumB := write(g, dev, 16)

	// Restart serve under the running domain: QEMU reconnects (libvirt's <reconnect>), the
	// data written before reads back and new writes land.
	if err := b.Stop(15 * time.Second); err != nil {
		t.Fatalf("stop serve: %v\n%s", err, b.LogTail(20))
	}
	b = serve()
	if got := sum(g, dev, 8); got != sumA {
		t.Errorf("after serve restarted: data written before reads %s, want %s", got, sumA)
	}
	sumC := write(g, dev, 24)
	if qemuStatus() != "running" {
		t.Errorf("domain not running after the serve restart")
	}

	// destroy and start: a new QEMU on the same volume sees everything written.
	g.checkKernelClean(t)
	lv.mustVirsh(t, "destroy", name)
	close(vm.exited)
	vm.Agent.Close()
	if s := domState(); s != "shut off" {
		t.Errorf("after virsh destroy: domstate %q, want shut off", s)
	}
	g, dev = boot()
	for _, c := range []struct {
		skip int
		want string
	}{{8, sumA}, {16, sumB}, {24, sumC}} {
		if got := sum(g, dev, c.skip); got != c.want {
			t.Errorf("after destroy and start: MiB %d.. reads %s, want %s", c.skip, got, c.want)
		}
	}
	g.checkKernelClean(t)
	lv.mustVirsh(t, "destroy", name)
	close(vm.exited)
	vm.Agent.Close()
}

// TestReadmeLibvirtXML needs no VM: the README's block, put in the test's domain, is
// well-formed XML with a vhost-user disk on the test's socket, reconnecting, and shared memfd
// memory (what the guest test relies on; a broken README fails here even with
// THINBLK_SKIP_VM=1).
func TestReadmeLibvirtXML(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	domainPart, devicePart, err := readmeLibvirtXML(root)
	if err != nil {
		t.Fatal(err)
	}
	const sock = "/tmp/x/vm1.sock"
	doc := fmt.Sprintf(libvirtDomainXML, "n", "/k", "/i", domainPart,
		strings.ReplaceAll(devicePart, readmeSocket, sock), "/a.sock", agentproto.SerialPortName, "/c.log")
	var dom struct {
		Memory struct {
			Source struct {
				Type string `xml:"type,attr"`
			} `xml:"source"`
			Access struct {
				Mode string `xml:"mode,attr"`
			} `xml:"access"`
		} `xml:"memoryBacking"`
		Disks []struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Type      string `xml:"type,attr"`
				Path      string `xml:"path,attr"`
				Reconnect struct {
					Enabled string `xml:"enabled,attr"`
				} `xml:"reconnect"`
			} `xml:"source"`
			Target struct {
				Bus string `xml:"bus,attr"`
			} `xml:"target"`
		} `xml:"devices>disk"`
	}
	if err := xml.Unmarshal([]byte(doc), &dom); err != nil {
		t.Fatalf("the domain with the README's block is not XML: %v\n%s", err, doc)
	}
	if dom.Memory.Source.Type != "memfd" || dom.Memory.Access.Mode != "shared" {
		t.Errorf("memory backing %+v: want shared memfd", dom.Memory)
	}
	if len(dom.Disks) != 1 {
		t.Fatalf("%d disks, want the README's one", len(dom.Disks))
	}
	d := dom.Disks[0]
	if d.Type != "vhostuser" || d.Source.Type != "unix" || d.Source.Path != sock || d.Source.Reconnect.Enabled != "yes" || d.Target.Bus != "virtio" {
		t.Errorf("disk %+v: want a reconnecting vhostuser virtio disk on %s", d, sock)
	}
}
