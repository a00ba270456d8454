package guesttests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Environment:
//
//	THINBLK_SKIP_VM=1          skip the VM tests (explicit opt-out; otherwise missing QEMU fails)
//	THINBLK_BACKEND=qsd        serve the disks with qemu-storage-daemon instead of thinblk;
//	                           "thinblk,qsd" runs the disk checks against both
//	THINBLK_ACCEL=tcg|kvm      skip the KVM probe
//	THINBLK_GUEST_KEEP=1       keep the test's work directory (logs, images) for inspection

const (
	diskSize   = 1 << 30  // main read-write disk
	roDiskSize = 64 << 20 // read-only disk
)

type env struct {
	root    string
	images  Images
	kinds   []BackendKind
	thinblk string
}

func setup(t *testing.T) *env {
	t.Helper()
	if os.Getenv("THINBLK_SKIP_VM") == "1" {
		t.Skip("THINBLK_SKIP_VM=1: VM tests opted out")
	}
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (install qemu-system-x86 qemu-utils, or set THINBLK_SKIP_VM=1 to opt out): %v", tool, err)
		}
	}
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	im, err := EnsureImages(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{root: root, images: im}
	spec := os.Getenv("THINBLK_BACKEND")
	if spec == "" {
		spec = string(DefaultBackend)
	}
	for _, k := range strings.Split(spec, ",") {
		kind := BackendKind(strings.TrimSpace(k))
		switch kind {
		case Thinblk:
			bin, err := BuildThinblk(ctx, root)
			if err != nil {
				t.Fatal(err)
			}
			e.thinblk = bin
		case QSD:
			if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
				t.Fatalf("qemu-storage-daemon not found: %v", err)
			}
		default:
			t.Fatalf("THINBLK_BACKEND=%q: want %q, %q or both, comma-separated", spec, Thinblk, QSD)
		}
		e.kinds = append(e.kinds, kind)
	}
	return e
}

// workDir is a short directory for sockets (unix socket paths are limited to 108 bytes, and
// t.TempDir can be long).
func workDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "thinblk-guest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if os.Getenv("THINBLK_GUEST_KEEP") == "1" || t.Failed() {
			t.Logf("work directory kept: %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return dir
}

// needRootPool skips t unless the back-end is thinblk's (the test's pool
// is thinblk's own) and the test runs as root (which rootFor needs).
func needRootPool(t *testing.T, e *env, rootFor string) {
	t.Helper()
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the pool is thinblk's own")
	}
	if os.Geteuid() != 0 {
		t.Skip(rootFor + " needs root")
	}
}

// sparseFile creates a file of size bytes, all a hole, at path.
func sparseFile(t *testing.T, path string, size int64) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

func (e *env) startBackend(t *testing.T, kind BackendKind, dir, name string, size int64, readOnly bool, queues int) (*Backend, string) {
	t.Helper()
	img := filepath.Join(dir, name+".img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b, err := StartBackend(context.Background(), BackendOptions{
		Kind: kind, Image: img, Socket: filepath.Join(dir, name+".sock"), ReadOnly: readOnly, Serial: "thinblk-" + name,
		Queues: queues, LogPath: filepath.Join(dir, name+"-backend.log"), ThinblkBin: e.thinblk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := b.Stop(10 * time.Second); err != nil && b.Opts.Kind == Thinblk {
			t.Errorf("stop %s back-end: %v\n%s", name, err, b.LogTail(20))
		}
	})
	return b, img
}

// guest wraps a VM with test helpers.
type guest struct {
	*VM
	t             *testing.T
	kernelChecked *bool // by shutdown, or at t's end
}

// newGuest wraps vm for t. Before the guest goes (its shutdown, or t's end), its kernel must
// not have warned or oopsed: a device that makes the driver or the filesystem above it trip
// is broken even when the test's own checks passed. (Call it after t.Cleanup(vm.Kill):
// cleanups run last first.)
func newGuest(t *testing.T, vm *VM) guest {
	g := guest{VM: vm, t: t, kernelChecked: new(bool)}
	t.Cleanup(func() {
		if !*g.kernelChecked {
			g.checkKernelClean(t)
		}
	})
	return g
}

// shutdown checks the guest kernel, then powers the guest off.
func (g guest) shutdown(t *testing.T, ctx context.Context) error {
	g.checkKernelClean(t)
	return g.Shutdown(ctx, time.Minute)
}

// Taint bits of the guest kernel that mean it tripped: W (a WARN), D (an oops). Not L (a soft
// lockup): under TCG on a loaded host a vCPU thread can be off the CPU for longer than the
// detector's threshold without the guest doing anything wrong.
const (
	taintWarn = 1 << 9
	taintDie  = 1 << 7
)

func (g guest) checkKernelClean(t *testing.T) {
	*g.kernelChecked = true
	res, err := g.Run(context.Background(), 20*time.Second, "cat /proc/sys/kernel/tainted")
	if err != nil || res.ExitCode != 0 {
		// The guest is gone or wedged: its console still shows an oops (not a WARN, which
		// is below the console's loglevel).
		if data, rerr := os.ReadFile(g.ConsolePath); rerr == nil {
			if report := kernelReport(string(data)); report != "" {
				t.Errorf("guest kernel tripped:\n%s", report)
				return
			}
		}
		t.Logf("guest kernel taint not read (%v); the console shows no oops", err)
		return
	}
	taint, err := strconv.ParseUint(strings.TrimSpace(string(res.Stdout)), 10, 64)
	if err != nil {
		t.Errorf("guest kernel taint %q: %v", res.Stdout, err)
		return
	}
	if taint&(taintWarn|taintDie) != 0 {
		t.Errorf("guest kernel tripped (taint %#x):\n%s", taint, g.kernelReport())
	}
}

// sh runs a script that must succeed; it returns stdout.
func (g guest) sh(t *testing.T, timeout time.Duration, script string) string {
	t.Helper()
	res, err := g.Run(context.Background(), timeout, script)
	if err != nil {
		t.Fatalf("guest: %v\nscript: %s\n%s", err, script, g.Diagnostics())
	}
	if res.TimedOut || res.ExitCode != 0 {
		t.Fatalf("guest script failed (exit %d, timed out %v):\n%s\nstdout:\n%s\nstderr:\n%s\n%s%s",
			res.ExitCode, res.TimedOut, script, tail(string(res.Stdout), 40), tail(string(res.Stderr), 40), g.kernelReport(), tail(g.Diagnostics(), 10))
	}
	return string(res.Stdout)
}

// kernelReport returns the guest kernel's report of its own trouble, whole, when the console has
// one (the diagnostics' tail would cut its start).
// The guest's dmesg comes first: the console prints only what is above its loglevel, and a
// WARN's report is below it.
func (g guest) kernelReport() string {
	if res, err := g.Run(context.Background(), 10*time.Second, "dmesg"); err == nil && res.ExitCode == 0 {
		if report := kernelReport(string(res.Stdout)); report != "" {
			return "--- kernel report (dmesg) ---\n" + report + "\n"
		}
	}
	data, err := os.ReadFile(g.ConsolePath)
	if err != nil {
		return ""
	}
	if report := kernelReport(string(data)); report != "" {
		return "--- kernel report (console) ---\n" + report + "\n"
	}
	return ""
}

// shFails runs a script that must exit non-zero; it returns stderr.
func (g guest) shFails(t *testing.T, timeout time.Duration, script string) string {
	t.Helper()
	res, err := g.Run(context.Background(), timeout, script)
	if err != nil {
		t.Fatalf("guest: %v\nscript: %s\n%s", err, script, g.Diagnostics())
	}
	if res.TimedOut || res.ExitCode == 0 {
		t.Fatalf("guest script should have failed (exit %d, timed out %v):\n%s\nstdout:\n%s", res.ExitCode, res.TimedOut, script, res.Stdout)
	}
	return string(res.Stderr)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256Hex(data)
}

// TestGuestDisks boots one 2-vCPU guest with a 2-queue read-write disk and a read-only disk
// and runs the checks in order on it (sharing the VM keeps TCG time down). Later
// subtests rely on earlier ones only for the partition table.
func TestGuestDisks(t *testing.T) {
	e := setup(t)
	for _, kind := range e.kinds {
		t.Run(string(kind), func(t *testing.T) { testGuestDisks(t, e, kind) })
	}
}

func testGuestDisks(t *testing.T, e *env, kind BackendKind) {
	dir := workDir(t)
	rw, rwImg := e.startBackend(t, kind, dir, "rw", diskSize, false, 2)
	ro, roImg := e.startBackend(t, kind, dir, "ro", roDiskSize, true, 1)

	// Known content on the read-only disk, so the guest can check what it reads.
	roData := bytes.Repeat([]byte("thinblk read-only disk\n"), roDiskSize/23+1)[:roDiskSize]
	if err := os.WriteFile(roImg, roData, 0o644); err != nil {
		t.Fatal(err)
	}
	roSum := sha256Hex(roData)

	vm, err := StartVM(context.Background(), VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images, CPUs: 2,
		Disks: []DiskSpec{{Socket: rw.Opts.Socket, Queues: 2, Reconnect: true}, {Socket: ro.Opts.Socket, Queues: 1}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	outer := t
	ctx := context.Background()
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	roDev, err := vm.DiskDevice(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("back-end %s; guest disks: rw %s, ro %s", kind, dev, roDev)

	t.Run("capacity", func(t *testing.T) {
		for _, d := range []struct {
			dev  string
			size int64
		}{{dev, diskSize}, {roDev, roDiskSize}} {
			got := strings.TrimSpace(g.sh(t, 20*time.Second, "blockdev --getsize64 "+d.dev))
			if got != strconv.FormatInt(d.size, 10) {
				t.Errorf("%s: guest sees %s bytes, want %d", d.dev, got, d.size)
			}
		}
		name := strings.TrimPrefix(dev, "/dev/")
		if q := strings.TrimSpace(g.sh(t, 20*time.Second, "ls /sys/block/"+name+"/mq | wc -l")); q != "2" {
			t.Errorf("%s has %s hardware queues in the guest, want 2", dev, q)
		}
		if kind == Thinblk {
			// The serial set with --serial reaches the guest (GET_ID) and names the same disk
			// as the PCI slot does.
			for serial, want := range map[string]string{"thinblk-rw": dev, "thinblk-ro": roDev} {
				got, err := vm.DiskBySerial(ctx, serial)
				if err != nil || got != want {
					t.Errorf("disk with serial %s: %s, %v; want %s", serial, got, err, want)
				}
			}
		}
	})

	t.Run("read-only", func(t *testing.T) {
		if ro := strings.TrimSpace(g.sh(t, 20*time.Second, "cat /sys/block/"+strings.TrimPrefix(roDev, "/dev/")+"/ro")); ro != "1" {
			t.Errorf("guest does not see %s as read-only (ro=%s)", roDev, ro)
		}
		got := strings.Fields(g.sh(t, time.Minute, "dd if="+roDev+" bs=1M iflag=direct 2>/dev/null | sha256sum"))
		if len(got) == 0 || got[0] != roSum {
			t.Errorf("read-only disk content: guest sha256 %v, want %s", got, roSum)
		}
		for _, cmd := range []string{
			"dd if=/dev/zero of=" + roDev + " bs=4k count=1 oflag=direct conv=notrunc",
			"blkdiscard " + roDev,
			"blkdiscard -z -l 1M " + roDev,
		} {
			stderr := g.shFails(t, time.Minute, cmd)
			// A read-only export may also simply not offer DISCARD/WRITE_ZEROES.
			if !strings.Contains(stderr, "Read-only") && !strings.Contains(stderr, "Permission denied") &&
				!strings.Contains(stderr, "Operation not permitted") && !strings.Contains(stderr, "Operation not supported") {
				t.Errorf("%s: failed, but not for being read-only: %s", cmd, stderr)
			}
		}
		if sum := fileSHA256(t, roImg); sum != roSum {
			t.Errorf("read-only image changed on the host: sha256 %s, want %s", sum, roSum)
		}
	})

	t.Run("fio-verify", func(t *testing.T) {
		// Two jobs pinned to the two vCPUs, so blk-mq sends them down different queues;
		// disjoint regions, random offsets, mixed block sizes, direct I/O, verified reads.
		// Each virtqueue has its own MSI-X vector: both queues' interrupt counts must grow.
		name := strings.TrimPrefix(dev, "/dev/")
		queued := func() []int {
			out := g.sh(t, 20*time.Second, `v=$(basename $(readlink /sys/block/`+name+`/device))
				for q in 0 1; do grep " $v-req.$q\$" /proc/interrupts | awk '{s=0; for (i=2; i<=NF; i++) if ($i ~ /^[0-9]+$/) s+=$i; print s}'; done`)
			var n []int
			for _, f := range strings.Fields(out) {
				v, err := strconv.Atoi(f)
				if err != nil {
					t.Fatalf("per-queue interrupt counts: %q", out)
				}
				n = append(n, v)
			}
			if len(n) != 2 {
				t.Fatalf("per-queue interrupt counts: %q", out)
			}
			return n
		}
		before := queued()
		out := g.sh(t, 6*time.Minute, `fio --name=verify --filename=`+dev+` --direct=1 --ioengine=libaio \
			--rw=randwrite --bssplit=4k/40:16k/30:64k/20:256k/10 --iodepth=16 --numjobs=2 \
			--size=48M --offset_increment=256M --verify=crc32c --verify_fatal=1 --do_verify=1 \
			--cpus_allowed=0-1 --cpus_allowed_policy=split --randrepeat=0 --group_reporting \
			--output-format=terse --terse-version=3`)
		// Terse v3: field 5 is the error code, 6 the KiB read (the verify pass), 47 the KiB
		// written.
		f := strings.Split(strings.TrimSpace(out), ";")
		if len(f) < 47 || f[2] != "verify" {
			t.Fatalf("unexpected fio output: %s", out)
		}
		readKiB, _ := strconv.Atoi(f[5])
		writeKiB, _ := strconv.Atoi(f[46])
		if f[4] != "0" || writeKiB < 2*48*1024 || readKiB < writeKiB {
			t.Errorf("fio: error %s, wrote %d KiB, verified %d KiB; want no error and all 96 MiB written and read back", f[4], writeKiB, readKiB)
		}
		after := queued()
		t.Logf("fio: wrote %d KiB, verified %d KiB; interrupts per queue: %d, %d", writeKiB, readKiB, after[0]-before[0], after[1]-before[1])
		for q := range after {
			if after[q]-before[q] < 10 {
				t.Errorf("virtqueue %d raised only %d interrupts during fio: not both queues in use", q, after[q]-before[q])
			}
		}
	})

	t.Run("discard-and-zeroout", func(t *testing.T) {
		// 8 MiB of random data at 16 MiB, discard 4 MiB of it, zero-out the other 4 MiB
		// (blkdiscard -z = BLKZEROOUT: WRITE_ZEROES), then read back zeros.
		zeros4 := sha256Hex(make([]byte, 4*mib))
		g.sh(t, time.Minute, "dd if=/dev/urandom of="+dev+" bs=1M seek=16 count=8 oflag=direct 2>/dev/null")
		if s := strings.Fields(g.sh(t, time.Minute, "dd if="+dev+" bs=1M skip=16 count=4 iflag=direct 2>/dev/null | sha256sum"))[0]; s == zeros4 {
			t.Fatal("random data reads back as zeros before discard")
		}
		g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -o %d -l %d %s", 16*mib, 4*mib, dev))
		g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -z -o %d -l %d %s", 20*mib, 4*mib, dev))
		for _, skip := range []int{16, 20} {
			s := strings.Fields(g.sh(t, time.Minute, fmt.Sprintf("dd if=%s bs=1M skip=%d count=4 iflag=direct 2>/dev/null | sha256sum", dev, skip)))[0]
			if s != zeros4 {
				t.Errorf("MiB %d..%d after discard/zero-out: sha256 %s, want zeros", skip, skip+4, s)
			}
		}
		// The host file must agree with the guest.
		data, err := os.ReadFile(rwImg)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data[16*mib:24*mib], make([]byte, 8*mib)) {
			t.Error("host image not zero in the discarded/zeroed range")
		}
		// Discard must give the space back: the range is a hole in the host file.
		f, err := os.Open(rwImg)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		next, err := unix.Seek(int(f.Fd()), 16*mib, unix.SEEK_DATA)
		if err != nil && err != unix.ENXIO {
			t.Fatal(err)
		}
		if err == nil && next < 20*mib {
			t.Errorf("discarded range still allocated in the host file: data at %d, want a hole up to %d", next, 20*mib)
		}
	})

	t.Run("backend-restart", func(t *testing.T) {
		// The back-end is stopped (SIGTERM) and started again under the running guest; QEMU
		// reconnects, the guest reads what it wrote before and goes on writing.
		sum := func(skipMiB int) string {
			return strings.Fields(g.sh(t, 2*time.Minute, fmt.Sprintf("dd if=%s bs=1M skip=%d count=8 iflag=direct 2>/dev/null | sha256sum", dev, skipMiB)))[0]
		}
		g.sh(t, time.Minute, "dd if=/dev/urandom of="+dev+" bs=1M seek=64 count=8 oflag=direct conv=fsync 2>/dev/null")
		before := sum(64)
		if err := rw.Stop(15 * time.Second); err != nil {
			t.Fatalf("stop back-end: %v\n%s", err, rw.LogTail(20))
		}
		rw2, err := StartBackend(ctx, BackendOptions{
			Kind: kind, Image: rwImg, Socket: rw.Opts.Socket, Queues: 2, Serial: rw.Opts.Serial,
			LogPath: filepath.Join(dir, "rw-backend-2.log"), ThinblkBin: e.thinblk,
		})
		if err != nil {
			t.Fatal(err)
		}
		// Stopped when the whole test ends: later subtests use it.
		outer.Cleanup(func() { rw2.Stop(10 * time.Second) })
		if after := sum(64); after != before {
			t.Errorf("data read after the restart differs: sha256 %s, want %s", after, before)
		}
		g.sh(t, time.Minute, "dd if=/dev/urandom of="+dev+" bs=1M seek=72 count=8 oflag=direct conv=fsync 2>/dev/null")
		written := sum(72)
		f, err := os.Open(rwImg)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		buf := make([]byte, 8*mib)
		if _, err := f.ReadAt(buf, 72*mib); err != nil {
			t.Fatal(err)
		}
		if got := sha256Hex(buf); got != written {
			t.Errorf("host image after the restart: sha256 %s, guest wrote %s", got, written)
		}
	})

	t.Run("partition", func(t *testing.T) {
		g.sh(t, time.Minute, `printf 'label: gpt\n,512M\n,\n' | sfdisk --wipe always `+dev+` && blockdev --rereadpt `+dev+` 2>/dev/null; sleep 1; ls `+dev+`1 `+dev+`2`)
	})

	fsCheck := func(t *testing.T, part, mkfs, fsck string) {
		g.sh(t, 3*time.Minute, mkfs+" "+part)
		g.sh(t, 3*time.Minute, `set -e
			mkdir -p /mnt/t && mount `+part+` /mnt/t
			dd if=/dev/urandom of=/mnt/t/big bs=1M count=24 2>/dev/null
			mkdir /mnt/t/d && for i in $(seq 1 50); do echo "file $i" > /mnt/t/d/f$i; done
			cd /mnt/t && sha256sum big d/* > /tmp/sums && cd /
			umount /mnt/t`)
		g.sh(t, 3*time.Minute, fsck+" "+part)
		g.sh(t, 3*time.Minute, `set -e
			mount `+part+` /mnt/t
			cd /mnt/t && sha256sum -c /tmp/sums >/dev/null && cd /
			umount /mnt/t`)
	}
	t.Run("xfs", func(t *testing.T) {
		fsCheck(t, dev+"1", "mkfs.xfs -f -q", "xfs_repair -n")
	})
	t.Run("ext4", func(t *testing.T) {
		fsCheck(t, dev+"2", "mkfs.ext4 -F -q", "e2fsck -fn")
	})

	t.Run("command-timeout", func(t *testing.T) {
		start := time.Now()
		res, err := vm.Run(ctx, 2*time.Second, "sleep 120")
		if err != nil {
			t.Fatal(err)
		}
		if !res.TimedOut {
			t.Errorf("sleep 120 with a 2s limit: %+v, want timed out", res)
		}
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("timed-out command came back after %v", d)
		}
	})

	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}
}

// TestGuestAgent checks the agent's requests in a real guest over the real transport, then
// that a hung guest (its agent frozen) makes Run fail after its time limit plus the grace
// period instead of blocking, and that the VM can then be killed.
func TestGuestAgent(t *testing.T) {
	e := setup(t)
	dir := workDir(t)
	vm, err := StartVM(context.Background(), VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images, RunGrace: 3 * time.Second, Logf: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	ctx := context.Background()

	t.Run("files", func(t *testing.T) {
		// Larger than one virtio-serial write (32 KiB) and than the client's read buffer.
		data := make([]byte, 3<<20+123)
		for i := range data {
			data[i] = byte(i*7 + i>>11)
		}
		if err := vm.Agent.WriteFile(ctx, "/tmp/blob", data, 0o600); err != nil {
			t.Fatal(err)
		}
		res, err := vm.Run(ctx, time.Minute, "sha256sum /tmp/blob; stat -c %a /tmp/blob")
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(string(res.Stdout)); len(f) != 3 || f[0] != sha256Hex(data) || f[2] != "600" {
			t.Errorf("guest sees %q, want sha256 %s and mode 600", res.Stdout, sha256Hex(data))
		}
		back, err := vm.Agent.ReadFile(ctx, "/tmp/blob")
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back, data) {
			t.Errorf("read back %d bytes, not what was written (%d bytes)", len(back), len(data))
		}
		if _, err := vm.Agent.ReadFile(ctx, "/nonexistent"); err == nil {
			t.Error("reading a missing file succeeded")
		}
	})

	t.Run("exec", func(t *testing.T) {
		res, err := vm.Agent.Exec(ctx, []string{"/bin/sh", "-c", `cat; echo "$GREETING" >&2; exit 7`},
			[]string{"GREETING=hello"}, []byte("from stdin"), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode != 7 || string(res.Stdout) != "from stdin" || string(res.Stderr) != "hello\n" {
			t.Errorf("exec: exit %d stdout %q stderr %q", res.ExitCode, res.Stdout, res.Stderr)
		}
		if _, err := vm.Agent.Exec(ctx, []string{"/no/such/program"}, nil, nil, time.Minute); err == nil {
			t.Error("running a missing program succeeded")
		}
	})

	start := time.Now()
	_, err = vm.Run(ctx, 2*time.Second, "kill -STOP $(pidof thinblk-agent)")
	if err == nil {
		t.Fatal("Run returned a result from a frozen agent")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("hung guest detected after %v, want about 5s", d)
	}
	if diag := vm.Diagnostics(); !strings.Contains(diag, "console tail") || !strings.Contains(diag, "thinblk-init") {
		t.Errorf("diagnostics lack the console tail:\n%s", diag)
	}
	vm.Kill()
	select {
	case <-vm.Exited():
	default:
		t.Error("QEMU still running after Kill")
	}
}
