package guesttests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/vhostuser/frontend"
)

// TestGuestVMSnapshot: `thinblk vm-snapshot --freeze` against a running guest with two thinblk
// disks that it keeps writing: a raw disk written block by block in order (O_DIRECT), and an
// ext4 filesystem that gets a new file every few milliseconds. The VM is paused and resumed
// (QEMU's STOP and RESUME events), the guest writes on, unaware; qemu-ga froze and thawed the
// filesystem. The snapshots, read back through serve's read-only exports, hold a clean prefix
// of the raw disk's blocks (nothing torn, no gap) at least as long as the guest had written
// before the command started, and a filesystem that e2fsck finds clean with every file written
// before then. A vm-snapshot naming a missing volume fails, leaves the VM running and creates
// nothing.
func TestGuestVMSnapshot(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: vm-snapshot snapshots thinblk volumes")
	}
	for _, tool := range []string{"cpio", "e2fsck", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found on the host (make deps): %v", tool, err)
		}
	}
	ctx := context.Background()
	dir := workDir(t)
	pool := filepath.Join(dir, "pool")
	socks := filepath.Join(dir, "socks")
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "1G"},
		{"volume", "create", pool, "raw", "--size", "64M"},
		{"volume", "create", pool, "fs", "--size", "128M"},
	} {
		if _, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatal(err)
		}
	}
	b, err := StartBackend(ctx, BackendOptions{
		Kind: ThinPool, Image: pool, Socket: filepath.Join(socks, "fs.sock"),
		LogPath: filepath.Join(dir, "pool-backend.log"), ThinblkBin: e.thinblk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(15 * time.Second) })
	qgaCpio := filepath.Join(dir, "qga.cpio")
	if err := QEMUGuestAgentCpio(ctx, qgaCpio); err != nil {
		t.Fatal(err)
	}
	vm, qs, err := StartVMWithQMP(ctx, QMPVMOptions{
		VMOptions: VMOptions{
			Dir: filepath.Join(dir, "vm"), Images: e.images, Logf: t.Logf,
			Disks: []DiskSpec{{Socket: filepath.Join(socks, "raw.sock")}, {Socket: filepath.Join(socks, "fs.sock")}},
		},
		GuestAgent: true, ExtraInitrd: qgaCpio,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	watch, err := vmsDialQMP(ctx, qs.Watch)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close()
	if err := StartGuestAgent(ctx, vm); err != nil {
		t.Fatalf("%v\n%s", err, vm.Diagnostics())
	}
	rawDev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	fsDev, err := vm.DiskDevice(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	g.sh(t, 2*time.Minute, fmt.Sprintf("mkfs.ext4 -q %s && mkdir -p /mnt && mount %s /mnt", fsDev, fsDev))

	// Writers: the raw one puts "blk%08d" at the head of block i, one O_DIRECT write at a time;
	// the fs one writes file fN holding N (no sync: only the freeze gets it to the disk). Each
	// records its count after the write returned.
	g.sh(t, 30*time.Second, fmt.Sprintf(`
rm -f /tmp/stop /tmp/err; echo 0 > /tmp/rawn; echo 0 > /tmp/fsn
(i=0; while [ ! -e /tmp/stop ]; do
	printf 'blk%%08d\n' $i | dd of=%s bs=4096 seek=$i count=1 conv=sync oflag=direct 2>/dev/null || { echo "raw write $i failed" >> /tmp/err; break; }
	i=$((i+1)); echo $i > /tmp/rawn
done) </dev/null >/dev/null 2>&1 &
(i=0; while [ ! -e /tmp/stop ]; do
	i=$((i+1)); echo $i > /mnt/f$i || { echo "fs write $i failed" >> /tmp/err; break; }
	echo $i > /tmp/fsn
done) </dev/null >/dev/null 2>&1 &
`, rawDev))
	counts := func() (raw, fs int) {
		t.Helper()
		// A count file is empty for a moment while its writer rewrites it.
		for try := 0; ; try++ {
			out := strings.Fields(g.sh(t, 30*time.Second, "cat /tmp/rawn /tmp/fsn"))
			if len(out) == 2 {
				raw, _ = strconv.Atoi(out[0])
				fs, _ = strconv.Atoi(out[1])
				return raw, fs
			}
			if try == 20 {
				t.Fatalf("counts: %q", out)
			}
		}
	}
	waitCounts := func(minRaw, minFS int) (int, int) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for {
			r, f := counts()
			if r >= minRaw && f >= minFS {
				return r, f
			}
			if time.Now().After(deadline) {
				t.Fatalf("guest writers stalled at %d raw blocks, %d files (want %d, %d)\n%s", r, f, minRaw, minFS, g.sh(t, 10*time.Second, "cat /tmp/err 2>/dev/null; true"))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	raw0, fs0 := waitCounts(20, 20)

	out, err := ThinblkCmd(ctx, e.thinblk, "vm-snapshot", "--qemu", "unix:"+qs.QMP, "--thinblk", pool,
		"--volume", "raw", "--volume", "fs", "--name", "s1", "--freeze", "--qga", "unix:"+qs.QGA, "--timeout", "2m")
	if err != nil {
		t.Fatalf("%v\n%s", err, b.LogTail(20))
	}
	t.Logf("vm-snapshot: %s (guest had written %d blocks, %d files before)", strings.TrimSpace(string(out)), raw0, fs0)
	if !strings.Contains(string(out), "1 guest filesystems frozen") {
		t.Errorf("vm-snapshot output %q: want one frozen filesystem (the ext4 on the thinblk disk)", out)
	}
	if ev := vmsEvents(watch, 2*time.Second); !slices.Equal(ev, []string{"STOP", "RESUME"}) {
		t.Errorf("QEMU events %v, want [STOP RESUME]", ev)
	}
	// The guest goes on writing, on both disks (the filesystem was thawed).
	raw1, fs1 := counts()
	waitCounts(raw1+10, fs1+10)

	// A volume that does not exist: the group fails as a whole, the VM is resumed.
	out, err = ThinblkCmd(ctx, e.thinblk, "vm-snapshot", "--qemu", "unix:"+qs.QMP, "--thinblk", pool,
		"--volume", "raw", "--volume", "nosuch", "--name", "bad", "--timeout", "2m")
	if err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Errorf("vm-snapshot with a missing volume: %v (%s)", err, out)
	}
	var st struct{ Running bool }
	if err := watch.Execute(ctx, "query-status", nil, &st); err != nil || !st.Running {
		t.Errorf("VM after the failed vm-snapshot: running %v, %v", st.Running, err)
	}
	if ev := vmsEvents(watch, 2*time.Second); !slices.Equal(ev, []string{"STOP", "RESUME"}) {
		t.Errorf("QEMU events of the failed vm-snapshot %v, want [STOP RESUME]", ev)
	}
	raw2, fs2 := counts()
	waitCounts(raw2+5, fs2+5)

	g.sh(t, time.Minute, "touch /tmp/stop; sleep 1; sync; if [ -s /tmp/err ]; then cat /tmp/err; exit 1; fi")
	rawN, fsN := counts()
	t.Logf("guest wrote %d blocks and %d files in all", rawN, fsN)

	listed, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "list", pool)
	if err != nil {
		t.Fatal(err)
	}
	if string(listed) != "fs@s1\tsnapshot\tfs\nraw@s1\tsnapshot\traw\n" {
		t.Errorf("snapshot list after the failed vm-snapshot:\n%s", listed)
	}

	// The raw snapshot: blocks 0..k-1 carry their pattern, everything after is zeros.
	snapRaw := vmsReadVolume(t, filepath.Join(socks, "raw@s1.sock"), 64<<20)
	k := 0
	for ; k*4096 < len(snapRaw); k++ {
		if !bytes.HasPrefix(snapRaw[k*4096:], []byte(fmt.Sprintf("blk%08d\n", k))) {
			break
		}
	}
	if rest := snapRaw[k*4096:]; !vmsAllZero(rest) {
		i := bytes.IndexFunc(rest, func(r rune) bool { return r != 0 })
		t.Errorf("raw snapshot: %d whole blocks, then non-zero data at block %d: %q", k, k+i/4096, rest[i:min(i+16, len(rest))])
	}
	t.Logf("raw snapshot holds blocks 0..%d", k-1)
	if k < raw0 || k > raw1 {
		t.Errorf("raw snapshot holds %d blocks; the guest had written %d before vm-snapshot and %d just after", k, raw0, raw1)
	}

	// The filesystem snapshot: clean, and every file written before vm-snapshot is there.
	img := filepath.Join(dir, "fs-s1.img")
	if err := os.WriteFile(img, vmsReadVolume(t, filepath.Join(socks, "fs@s1.sock"), 128<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Errorf("e2fsck -fn of the snapshot: %v\n%s", err, out)
	}
	ls, err := exec.Command("debugfs", "-R", "ls -p /", img).Output()
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]bool{}
	for _, line := range strings.Split(string(ls), "\n") {
		if f := strings.Split(line, "/"); len(f) > 5 && strings.HasPrefix(f[5], "f") {
			files[f[5]] = true
		}
	}
	for i := 1; i <= fs0; i++ {
		if !files[fmt.Sprintf("f%d", i)] {
			t.Errorf("file f%d, written before vm-snapshot, is not in the snapshot (%d files there)", i, len(files))
			break
		}
	}
	if len(files) > fs1 {
		t.Errorf("snapshot has %d files; the guest had written %d just after vm-snapshot", len(files), fs1)
	}
	for _, i := range []int{1, fs0} {
		got, err := exec.Command("debugfs", "-R", fmt.Sprintf("cat /f%d", i), img).Output()
		if err != nil || strings.TrimSpace(string(got)) != strconv.Itoa(i) {
			t.Errorf("f%d in the snapshot holds %q (%v)", i, got, err)
		}
	}
	t.Logf("fs snapshot holds %d files (guest: %d before, %d after)", len(files), fs0, fs1)
}

func vmsDialQMP(ctx context.Context, path string) (*qmp.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for { // QEMU binds its monitor socket a moment before it listens
		c, err := qmp.Dial(ctx, path)
		if err == nil || ctx.Err() != nil {
			return c, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// qemuEvents returns the names of the events received until none came for settle.
func vmsEvents(c *qmp.Client, settle time.Duration) []string {
	var names []string
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return names
			}
			names = append(names, ev.Event)
		case <-time.After(settle):
			return names
		}
	}
}

// readVolume reads size bytes of an export through the Go vhost-user front-end.
func vmsReadVolume(t *testing.T, sock string, size int) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d, err := frontend.Dial(ctx, sock, frontend.Options{})
	if err != nil {
		t.Fatalf("dial %s: %v", sock, err)
	}
	defer d.Close()
	buf := make([]byte, size)
	for off := 0; off < size; off += 1 << 20 {
		if _, err := d.ReadAt(buf[off:min(off+1<<20, size)], int64(off)); err != nil {
			t.Fatalf("read %s at %d: %v", sock, off, err)
		}
	}
	return buf
}

func vmsAllZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// TestGuestPausePolicy: a guest fills a pool whose no-space policy is pause, with O_DIRECT
// writes. On BLOCK_POOL_OUT_OF_SPACE `serve --qemu-qmp` sends QEMU stop; `pool grow` brings
// space; QEMU reports STOP, serve BLOCK_POOL_VM_STOPPED then BLOCK_POOL_VM_RESUMED, QEMU
// RESUME, and the guest's writes all complete without an I/O error and read back intact.
//
// QEMU's stop pauses the vCPUs at once but then stops the vhost-user rings, and thinblk answers
// GET_VRING_BASE only when the ring's requests are done: a request waiting for space holds the
// stop (and QEMU's main loop, so its monitor) until space appears. The test records whether
// STOP came before the pool was grown, and checks with a ticker on the serial console that the
// guest does not run while the pool is out of space, and runs again after.
func TestGuestPausePolicy(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the pause policy is thinblk's")
	}
	ctx := context.Background()
	dir := workDir(t)
	pool := filepath.Join(dir, "pool")
	socks := filepath.Join(dir, "socks")
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "32M", "--no-space", "pause"},
		{"volume", "create", pool, "vm", "--size", "128M"},
	} {
		if _, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatal(err)
		}
	}
	vmDir := filepath.Join(dir, "vm")
	qemuQMP := filepath.Join(vmDir, "qmp.sock") // where StartVMWithQMP puts it
	b, err := StartThinPoolServe(ctx, e.thinblk, pool, socks, filepath.Join(dir, "serve.log"), []string{"--qemu-qmp", "unix:" + qemuQMP}, "vm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(15 * time.Second) })
	ctl, err := vmsDialQMP(ctx, filepath.Join(pool, "qmp.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	vm, qs, err := StartVMWithQMP(ctx, QMPVMOptions{VMOptions: VMOptions{
		Dir: vmDir, Images: e.images, Logf: t.Logf, Disks: []DiskSpec{{Socket: filepath.Join(socks, "vm.sock")}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	if qs.QMP != qemuQMP {
		t.Fatalf("QEMU monitor at %s, serve was told %s", qs.QMP, qemuQMP)
	}
	watch, err := vmsDialQMP(ctx, qs.Watch)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close()
	g := newGuest(t, vm)
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A ticker on the serial console shows when the guest runs.
	g.sh(t, 30*time.Second, "(while :; do echo vmsnap-tick > /dev/ttyS0; sleep 0.2; done) </dev/null >/dev/null 2>&1 &")
	consoleSize := func() int64 {
		fi, err := os.Stat(vm.ConsolePath)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	ticking := func(d time.Duration) bool {
		before := consoleSize()
		time.Sleep(d)
		return consoleSize() > before
	}
	if !ticking(5 * time.Second) {
		t.Fatal("the guest's ticker does not reach the console")
	}
	// 48 MiB into a 32 MiB pool: the writes stall part way.
	want := strings.Fields(g.sh(t, 2*time.Minute, "dd if=/dev/urandom of=/tmp/pat bs=1M count=48 2>/dev/null && sha256sum /tmp/pat"))[0]
	g.sh(t, 30*time.Second, fmt.Sprintf("rm -f /tmp/ddrc; (dd if=/tmp/pat of=%s bs=1M oflag=direct 2>/tmp/dderr; echo $? > /tmp/ddrc) </dev/null >/dev/null 2>&1 &", dev))

	start := time.Now()
	if _, err := vmsWaitEvent(ctl, "BLOCK_POOL_OUT_OF_SPACE", 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Logf("pool out of space %.1fs after the writes began", time.Since(start).Seconds())
	_, early := vmsWaitEvent(watch, "STOP", 5*time.Second)
	t.Logf("QEMU STOP before space came back: %v", early == nil)
	if ticking(5 * time.Second) {
		t.Error("the guest runs on while the pool is out of space")
	}
	grown := time.Now()
	if _, err := ThinblkCmd(ctx, e.thinblk, "pool", "grow", pool, "--size", "128M"); err != nil {
		t.Fatal(err)
	}
	if early != nil {
		if _, err := vmsWaitEvent(watch, "STOP", 2*time.Minute); err != nil {
			t.Fatalf("QEMU never stopped: %v\n%s", err, b.LogTail(20))
		}
	}
	data, err := vmsWaitEvent(ctl, "BLOCK_POOL_VM_STOPPED", time.Minute)
	if err != nil || strings.Contains(string(data), "error") {
		t.Fatalf("BLOCK_POOL_VM_STOPPED %s: %v\n%s", data, err, b.LogTail(20))
	}
	if _, err := vmsWaitEvent(ctl, "BLOCK_POOL_VM_RESUMED", 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := vmsWaitEvent(watch, "RESUME", time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Logf("VM resumed %.1fs after pool grow", time.Since(grown).Seconds())
	if !ticking(5 * time.Second) {
		t.Error("the guest's ticker did not come back after the VM was resumed")
	}
	var st struct{ Status string }
	if err := watch.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "running" {
		t.Errorf("VM status %q after space came back (%v)", st.Status, err)
	}
	out := g.sh(t, 5*time.Minute, `while [ ! -s /tmp/ddrc ]; do sleep 0.2; done; cat /tmp/ddrc /tmp/dderr`)
	if !strings.HasPrefix(out, "0\n") {
		t.Fatalf("guest dd after the pause: %s", out)
	}
	got := strings.Fields(g.sh(t, 2*time.Minute, fmt.Sprintf("dd if=%s bs=1M count=48 iflag=direct 2>/dev/null | sha256sum", dev)))[0]
	if got != want {
		t.Errorf("data read back %s, written %s", got, want)
	}
}

// vmsWaitEvent waits for the next event called name and returns its data.
func vmsWaitEvent(c *qmp.Client, name string, timeout time.Duration) ([]byte, error) {
	deadline := time.After(timeout)
	var seen []string
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				return nil, fmt.Errorf("connection closed while waiting for %s (seen %v)", name, seen)
			}
			if ev.Event == name {
				return ev.Data, nil
			}
			seen = append(seen, ev.Event)
		case <-deadline:
			return nil, fmt.Errorf("no %s event within %v (seen %v)", name, timeout, seen)
		}
	}
}
