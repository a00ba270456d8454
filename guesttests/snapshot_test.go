package guesttests

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

// waitExport waits until serve has put a socket for a newly created snapshot or clone in
// its socket directory (it follows the pool without a restart).
func waitExport(t *testing.T, socks, name string) string {
	t.Helper()
	sock := filepath.Join(socks, name+".sock")
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not export %s at %s within 30s", name, sock)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// devSum is the sha256 of a whole guest block device, read with O_DIRECT so the guest's
// page cache cannot answer for the back-end.
func (g guest) devSum(t *testing.T, dev string) string {
	t.Helper()
	out := strings.Fields(g.sh(t, 5*time.Minute, "dd if="+dev+" bs=1M iflag=direct 2>/dev/null | sha256sum"))
	if len(out) == 0 {
		t.Fatalf("no checksum of %s", dev)
	}
	return out[0]
}

// hostSum is the sha256 of the first size bytes of an export, read on the host through the
// Go vhost-user front-end: much faster than a TCG guest reading and hashing. The export must
// have no other front-end connected.
func hostSum(t *testing.T, sock string, size int64) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d, err := frontend.Dial(ctx, sock, frontend.Options{})
	if err != nil {
		t.Fatalf("dial %s: %v", sock, err)
	}
	defer d.Close()
	h := sha256.New()
	buf := make([]byte, mib)
	for off := int64(0); off < size; off += mib {
		n := min(mib, size-off)
		if _, err := d.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("read %s at %d: %v", sock, off, err)
		}
		h.Write(buf[:n])
	}
	return hex.EncodeToString(h.Sum(nil))
}

// repairClean runs xfs_repair -n and fails unless it exits 0 without the warning that a
// dirty log was ignored (with -n a dirty log is skipped, which could hide damage).
func (g guest) repairClean(t *testing.T, dev string) {
	t.Helper()
	out := g.sh(t, 5*time.Minute, "xfs_repair -n "+dev+" 2>&1")
	if strings.Contains(out, "ALERT") {
		t.Errorf("xfs_repair -n %s ignored a dirty log:\n%s", dev, tail(out, 10))
	}
}

// repairUnreplayed runs xfs_repair -n on a filesystem whose log holds records not yet
// replayed and that cannot be replayed here (a read-only device). It fails on any finding
// but those an unreplayed log explains: the warning itself, and the lazy superblock
// counters (free blocks, inodes), which XFS brings up to date only at log recovery or
// unmount. Every other line must be xfs_repair's progress output.
func (g guest) repairUnreplayed(t *testing.T, dev string) {
	t.Helper()
	res, err := g.Run(context.Background(), 5*time.Minute, "xfs_repair -n "+dev+" 2>&1")
	if err != nil {
		t.Fatal(err)
	}
	var bad []string
	for _, line := range strings.Split(strings.TrimRight(string(res.Stdout), "\n"), "\n") {
		if !repairBenign.MatchString(line) {
			bad = append(bad, line)
		}
	}
	if len(bad) > 0 || res.TimedOut || (res.ExitCode != 0 && res.ExitCode != 1) {
		t.Errorf("xfs_repair -n %s (exit %d) found more than an unreplayed log explains:\n%s", dev, res.ExitCode, strings.Join(bad, "\n"))
	}
}

var repairBenign = regexp.MustCompile(`^(Phase \d - .*|\s+- .*|No modify flag set, .*|` +
	`ALERT: The filesystem has valuable metadata changes in a log which is being|` +
	`ignored because the -n option was used\.  Expect spurious inconsistencies|` +
	`which may be resolved by first mounting the filesystem to replay the log\.|` +
	`sb_(fdblocks|icount|ifree) \d+, counted \d+)$`)

// mkfsSmallXFS makes XFS on a device under 300 MB, which mkfs.xfs refuses outside fstests
// (it checks for fstests' TEST_DIR, TEST_DEV and QA_CHECK_FS). Small volumes keep a TCG
// guest's full-device reads and writes short.
const mkfsSmallXFS = "TEST_DIR=/tmp TEST_DEV=none QA_CHECK_FS=1 mkfs.xfs -f -q"

// copyFile copies a file from one guest to another through the agents.
func copyFile(t *testing.T, from, to guest, path string) {
	t.Helper()
	data, err := from.Agent.ReadFile(context.Background(), path)
	if err != nil {
		t.Fatalf("read %s from the guest: %v", path, err)
	}
	if err := to.Agent.WriteFile(context.Background(), path, data, 0o644); err != nil {
		t.Fatalf("write %s to the guest: %v", path, err)
	}
}

// Background writers in the guest, stopped by creating /tmp/stop. Each records its end in
// /tmp/finished and any failure in /tmp/fail.
const (
	// fio rewrites a 24 MiB file in rounds of random, mixed-size direct writes, each
	// verified by reading back (crc32c headers); verify_fatal stops at the first mismatch.
	// The round count is renamed into place: a reader must never see it empty.
	fioWriter = `(i=0; while [ ! -e /tmp/stop ]; do
		fio --name=v --filename=/mnt/d/fio.dat --size=24M --rw=randwrite --bssplit=4k/50:64k/50 \
			--direct=1 --ioengine=libaio --iodepth=4 --verify=crc32c --verify_fatal=1 --do_verify=1 \
			--output=/tmp/fio.out || { echo "fio round $i failed: $(tail -n 5 /tmp/fio.out)" >> /tmp/fail; break; }
		i=$((i+1)); echo $i > /tmp/fio.rounds.new; mv /tmp/fio.rounds.new /tmp/fio.rounds
	done; echo fio >> /tmp/finished) >/dev/null 2>&1 &`
	// The file writer creates 512 KiB files of random data one after another, each
	// fsynced; only then is its checksum appended to /tmp/done, so every line there names
	// a file that was durable when the line appeared.
	fileWriter = `(mkdir -p /mnt/d/w; i=0; while [ ! -e /tmp/stop ]; do
		dd if=/dev/urandom of=/mnt/d/w/f$i bs=64k count=8 conv=fsync 2>/dev/null || { echo "dd f$i failed" >> /tmp/fail; break; }
		(cd /mnt/d/w && sha256sum f$i) >> /tmp/done
		i=$((i+1))
	done; echo files >> /tmp/finished) >/dev/null 2>&1 &`
)

// TestGuestSnapshotUnderWrites: snapshots and clones of an XFS volume taken while a guest
// writes to it (fio with verification and an fsyncing file writer), checked from a second
// guest.
//
// Two kinds of snapshot are taken. A crash-consistent clone is taken with the writers
// running and the filesystem live: its log is dirty, so it is mounted writable (log
// recovery runs) and must then hold every file that was fsynced before the snapshot, with
// xfs_repair clean. A read-only snapshot and a writable clone are taken while the guest has
// the filesystem frozen (fsfreeze --freeze, what a guest agent's freeze does). Both must
// equal, block for block, the device as the guest read it during the freeze, and hold every
// file the writer had made durable by then, with the checksum it recorded. Files are not
// read during the freeze: that hung until the test's timeout (in CI, and in one of three runs
// here) with the device idle (avail index = used index, nothing in thinblk's in-flight
// region), so the guest was stuck, not the disk; XFS before upstream's inodegc recycling
// fix can spin in lookups of inodes queued for inactivation while frozen, as inactivation
// waits for the thaw. A frozen XFS has written all metadata in place but still leaves a log
// record to replay (the log is covered, not unmounted) and its lazy superblock counters
// stale; a read-only device cannot replay it. So the clone, block
// for block the same filesystem, is mounted (replaying the log) and must then pass
// xfs_repair -n with nothing ignored; the read-only snapshot is mounted with norecovery to
// compare files, and its xfs_repair -n may report nothing but what the unreplayed log
// explains. Writes to the clone succeed and do not reach the origin or the snapshot; the
// origin's later writes do not reach the snapshot.
func TestGuestSnapshotUnderWrites(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: snapshots are thinblk's own")
	}
	ctx := context.Background()
	dir := workDir(t)
	const dataSize = 128 * mib
	pool, socks, b := startPool(t, e, dir, []string{"--size", "512M", "--no-space", "error"}, [2]string{"data", "128M"})
	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm1"), Images: e.images,
		Disks: []DiskSpec{{Socket: filepath.Join(socks, "data.sock")}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	snapCmd := func(t *testing.T, args ...string) {
		t.Helper()
		start := time.Now()
		if _, err := ThinblkCmd(ctx, e.thinblk, append([]string{"snapshot", "create", pool}, args...)...); err != nil {
			t.Fatal(err)
		}
		t.Logf("snapshot create %v: %v (through serve's control socket)", args, time.Since(start).Round(time.Millisecond))
	}

	g.sh(t, 3*time.Minute, mkfsSmallXFS+" "+dev+" && mkdir -p /mnt/d && mount "+dev+" /mnt/d && rm -f /tmp/stop /tmp/fail /tmp/finished /tmp/done")
	g.sh(t, 20*time.Second, fioWriter)
	g.sh(t, 20*time.Second, fileWriter)
	progress := func(t *testing.T) string {
		return strings.TrimSpace(g.sh(t, 20*time.Second, `echo "fio rounds $(cat /tmp/fio.rounds 2>/dev/null || echo 0), files $(wc -l < /tmp/done 2>/dev/null || echo 0)"; cat /tmp/fail 2>/dev/null; true`))
	}
	time.Sleep(8 * time.Second)
	t.Logf("writers before the live snapshot: %s", progress(t))

	// Crash-consistent clone: the list of durable files is copied first, so each file on it
	// was fsynced before the snapshot began.
	g.sh(t, 20*time.Second, "cp /tmp/done /tmp/done.before")
	snapCmd(t, "data", "live", "--writable")
	time.Sleep(5 * time.Second)

	// Frozen: writers block in the kernel; the device does not change until the thaw.
	g.sh(t, 2*time.Minute, "fsfreeze --freeze /mnt/d")
	frozenDev := g.devSum(t, dev)
	g.sh(t, 20*time.Second, "cp /tmp/done /tmp/frozen.sums")
	snapCmd(t, "data", "snap")
	snapCmd(t, "data", "clone", "--writable")
	g.sh(t, 2*time.Minute, "fsfreeze --unfreeze /mnt/d")
	t.Logf("writers at the freeze: %s; %s files durable", progress(t), strings.TrimSpace(g.sh(t, 20*time.Second, "wc -l < /tmp/frozen.sums")))
	if n := strings.TrimSpace(g.sh(t, 20*time.Second, "wc -l < /tmp/done.before")); n == "0" {
		t.Fatal("no file was durable before the live snapshot: the writer did not run")
	}

	// Block for block what the origin held during the freeze, read on the host before
	// the second guest connects.
	for _, name := range []string{"snap", "clone"} {
		if got := hostSum(t, waitExport(t, socks, name), dataSize); got != frozenDev {
			t.Errorf("%s: sha256 %s, the origin read %s during the freeze", name, got, frozenDev)
		}
	}

	// The origin keeps being written while the second guest checks the snapshots.
	vm2, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm2"), Images: e.images,
		Disks: []DiskSpec{{Socket: waitExport(t, socks, "snap")}, {Socket: waitExport(t, socks, "clone")}, {Socket: waitExport(t, socks, "live")}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm2.Kill)
	g2 := newGuest(t, vm2)
	var devs [3]string
	for i := range devs {
		if devs[i], err = vm2.DiskDevice(ctx, i); err != nil {
			t.Fatal(err)
		}
	}
	snapDev, cloneDev, liveDev := devs[0], devs[1], devs[2]
	copyFile(t, g, g2, "/tmp/frozen.sums")
	copyFile(t, g, g2, "/tmp/done.before")

	t.Run("frozen-snapshot", func(t *testing.T) {
		if ro := strings.TrimSpace(g2.sh(t, 20*time.Second, "cat /sys/block/"+strings.TrimPrefix(snapDev, "/dev/")+"/ro")); ro != "1" {
			t.Errorf("the snapshot is not read-only in the guest (ro=%s)", ro)
		}
		g2.repairUnreplayed(t, snapDev)
		// norecovery: the log cannot be replayed on a read-only device, and need not be for
		// reading: the freeze wrote all metadata in place.
		g2.sh(t, 2*time.Minute, "mkdir -p /mnt/s && mount -o ro,norecovery,nouuid "+snapDev+" /mnt/s && cd /mnt/s/w && sha256sum -c /tmp/frozen.sums >/dev/null")
		g2.shFails(t, time.Minute, "dd if=/dev/zero of="+snapDev+" bs=4k count=1 oflag=direct conv=notrunc")
	})

	t.Run("frozen-clone", func(t *testing.T) {
		// The first mount replays the log; then the filesystem the snapshot also holds
		// (block for block, checked on the host) passes xfs_repair -n with nothing ignored.
		g2.sh(t, 3*time.Minute, "mkdir -p /mnt/c && mount -o nouuid "+cloneDev+" /mnt/c && cd /mnt/c/w && sha256sum -c /tmp/frozen.sums >/dev/null && cd / && umount /mnt/c")
		g2.repairClean(t, cloneDev)
		g2.sh(t, 5*time.Minute, `set -e
			mount -o nouuid `+cloneDev+` /mnt/c && cd /mnt/c
			dd if=/dev/urandom of=clone-only bs=1M count=8 conv=fsync 2>/dev/null
			dd if=/dev/urandom of=w/f0 bs=64k count=8 conv=notrunc,fsync 2>/dev/null
			fio --name=c --filename=/mnt/c/fio.dat --size=24M --rw=randwrite --bs=64k --direct=1 --ioengine=libaio \
				--iodepth=4 --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/clone-fio.out
			sha256sum clone-only w/f0 > /tmp/clone.sums
			cd / && umount /mnt/c`)
		g2.repairClean(t, cloneDev)
		g2.sh(t, 2*time.Minute, "echo 3 > /proc/sys/vm/drop_caches && mount -o nouuid "+cloneDev+" /mnt/c && cd /mnt/c && sha256sum -c /tmp/clone.sums >/dev/null && cd / && umount /mnt/c")
	})

	t.Run("live-clone", func(t *testing.T) {
		// Its log is dirty (xfs_repair -n would say so); mounting replays it.
		g2.sh(t, 5*time.Minute, "mkdir -p /mnt/l && mount -o nouuid "+liveDev+" /mnt/l && cd /mnt/l/w && sha256sum -c /tmp/done.before >/dev/null && cd / && umount /mnt/l")
		g2.repairClean(t, liveDev)
	})

	t.Run("origin", func(t *testing.T) {
		g.sh(t, 20*time.Second, "touch /tmp/stop")
		for i := 0; ; i++ {
			if n := strings.TrimSpace(g.sh(t, 20*time.Second, "wc -l < /tmp/finished 2>/dev/null || echo 0")); n == "2" {
				break
			}
			if i == 300 {
				t.Fatalf("writers still running 5 minutes after being told to stop: %s", progress(t))
			}
			time.Sleep(time.Second)
		}
		t.Logf("writers at the end: %s", progress(t))
		if fail := g.sh(t, 20*time.Second, "cat /tmp/fail 2>/dev/null; true"); fail != "" {
			t.Errorf("a writer failed on the origin:\n%s", fail)
		}
		// The clone's writes are not in the origin: no clone-only file, w/f0 as frozen.
		g.sh(t, 3*time.Minute, `set -e
			echo 3 > /proc/sys/vm/drop_caches
			test ! -e /mnt/d/clone-only
			cd /mnt/d/w && grep ' f0$' /tmp/frozen.sums | sha256sum -c >/dev/null
			cd / && umount /mnt/d`)
		g.repairClean(t, dev)
	})

	for _, v := range []guest{g, g2} {
		if err := v.shutdown(t, ctx); err != nil {
			t.Error(err)
		}
	}
	t.Run("snapshot-unchanged", func(t *testing.T) {
		// After the origin's and the clone's writes the snapshot still reads as frozen.
		if got := hostSum(t, filepath.Join(socks, "snap.sock"), dataSize); got != frozenDev {
			t.Errorf("snapshot sha256 %s after the origin and the clone wrote, want %s", got, frozenDev)
		}
	})
	out, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "list", pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot list:\n%s", out)
	stopAndCheck(t, e, b, pool)
}

// TestGuestSnapshotPromise: the provisioning promise kept across a snapshot. The guest
// provisions its whole volume (blkdiscard -z: WRITE_ZEROES without unmap) and makes XFS on
// it without discarding (mkfs.xfs -K), so every block XFS may write is provisioned. A
// read-only snapshot then shares all those blocks; the pool must reserve one block for each
// copy-on-write the volume may still need. Another volume then fills the pool. The guest
// overwrites all its data in place, fills the filesystem's free space and runs fio with
// verification: no I/O error, no XFS shutdown, data as written. The snapshot still holds the
// data as it was. A second snapshot, which would need new reservations the full pool cannot
// give, is refused with a "no space" error and changes nothing; deleting the first snapshot
// gives back what keeper reserved for copies. Alongside, a volume in reserve mode (nothing
// provisioned by the guest) is written whole and snapshotted, which reserves a copy of each
// block; on the full pool the guest overwrites it with fio verify and the snapshot keeps the
// old data; reserve mode for another volume is refused with "no space".
func TestGuestSnapshotPromise(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: snapshots are thinblk's own")
	}
	ctx := context.Background()
	dir := workDir(t)
	// keeper fully provisioned (128 MiB) and as much reserved by its snapshot, rmode in
	// reserve mode (64 MiB) and as much again for its snapshot leave about 64 MiB for the
	// filler. late stays empty: only its reserve mode is tried.
	const keeperSize, rmodeSize = 128 * mib, 64 * mib
	pool, socks, b := startPool(t, e, dir, []string{"--size", "448M", "--no-space", "error"},
		[2]string{"keeper", "128M"}, [2]string{"rmode", "64M"}, [2]string{"late", "64M"}, [2]string{"filler", "1G"})
	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm1"), Images: e.images,
		Disks: []DiskSpec{{Socket: filepath.Join(socks, "keeper.sock")}, {Socket: filepath.Join(socks, "filler.sock")}, {Socket: filepath.Join(socks, "rmode.sock")}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	keeper, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	filler, err := vm.DiskDevice(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	rmode, err := vm.DiskDevice(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	status := func(t *testing.T) *PoolStatus {
		t.Helper()
		st, err := ThinblkStatus(ctx, e.thinblk, pool)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	volume := func(t *testing.T, st *PoolStatus, name string) VolumeStatus {
		t.Helper()
		v, ok := st.Volume(name)
		if !ok {
			t.Fatalf("status has no volume %s", name)
		}
		return v
	}
	logPool := func(what string, st *PoolStatus) {
		k, _ := st.Volume("keeper")
		t.Logf("%s: pool allocated %d MiB, reserved %d MiB, free %d MiB; keeper mapped %d MiB, provisioned %d MiB, reserved %d MiB (%d MiB for copies)",
			what, st.Pool.AllocatedBytes/mib, st.Pool.ReservedBytes/mib, st.Pool.FreeBytes/mib, k.MappedBytes/mib, k.ProvisionedBytes/mib, k.ReservedBytes/mib, k.ReservedSharedBytes/mib)
	}

	// Provision everything, then XFS without discard (a discard would give it back) and data:
	// 4 files of 8 MiB and a 32 MiB fio file with verification headers.
	g.sh(t, 2*time.Minute, "blkdiscard -z "+keeper)
	if k := volume(t, status(t), "keeper"); k.ProvisionedBytes != keeperSize {
		t.Fatalf("keeper has %d MiB provisioned after blkdiscard -z, want all %d MiB", k.ProvisionedBytes/mib, keeperSize/mib)
	}
	g.sh(t, 5*time.Minute, `set -e
		`+mkfsSmallXFS+` -K `+keeper+` && mkdir -p /mnt/k && mount `+keeper+` /mnt/k && cd /mnt/k
		for i in 1 2 3 4; do dd if=/dev/urandom of=f$i bs=1M count=8 2>/dev/null; done
		fio --name=v --filename=/mnt/k/fio.dat --size=32M --rw=write --bs=64k --direct=1 --ioengine=libaio --iodepth=4 \
			--verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio.out
		sync && sha256sum f* fio.dat > /tmp/before.sums`)
	beforeSums, err := vm.Agent.ReadFile(ctx, "/tmp/before.sums")
	if err != nil {
		t.Fatal(err)
	}
	before := status(t)
	logPool("before the snapshot", before)
	k := volume(t, before, "keeper")
	if k.ProvisionedBytes != keeperSize {
		t.Errorf("keeper has %d MiB provisioned after mkfs -K and writes, want still all %d MiB", k.ProvisionedBytes/mib, keeperSize/mib)
	}

	// Frozen, so the snapshot is a clean filesystem the second guest can mount read-only.
	g.sh(t, 2*time.Minute, "fsfreeze --freeze /mnt/k")
	_, err = ThinblkCmd(ctx, e.thinblk, "snapshot", "create", pool, "keeper", "ksnap")
	g.sh(t, 2*time.Minute, "fsfreeze --unfreeze /mnt/k")
	if err != nil {
		t.Fatal(err)
	}
	after := status(t)
	logPool("after the snapshot", after)
	// Every mapped block of keeper is now provisioned and shared with a read-only snapshot:
	// one copy-on-write each still to come, so at least that much is reserved.
	if drop := before.Pool.FreeBytes - after.Pool.FreeBytes; drop < k.MappedBytes {
		t.Errorf("the snapshot took %d MiB of free space, want at least keeper's %d MiB of mapped provisioned blocks reserved for their copy-on-write",
			drop/mib, k.MappedBytes/mib)
	}
	if ks := volume(t, after, "keeper"); ks.ReservedSharedBytes < k.MappedBytes {
		t.Errorf("status says keeper reserves %d MiB for copies of shared blocks, want at least its %d MiB mapped", ks.ReservedSharedBytes/mib, k.MappedBytes/mib)
	}

	// Reserve mode guarantees rmode's whole size without the guest provisioning anything;
	// once written and snapshotted, every block is shared and the snapshot must reserve a
	// copy for each.
	if _, err := ThinblkCmd(ctx, e.thinblk, "volume", "reserve", pool, "rmode", "on"); err != nil {
		t.Fatal(err)
	}
	if r := volume(t, status(t), "rmode"); r.ReservedBytes != rmodeSize {
		t.Errorf("rmode in reserve mode reserves %d MiB, want its whole %d MiB", r.ReservedBytes/mib, rmodeSize/mib)
	}
	rmodeSum := strings.Fields(g.sh(t, 3*time.Minute, "dd if=/dev/urandom of="+rmode+" bs=1M oflag=direct 2>/dev/null; dd if="+rmode+" bs=1M iflag=direct 2>/dev/null | sha256sum"))[0]
	freeBefore := status(t).Pool.FreeBytes
	if _, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "create", pool, "rmode", "rsnap"); err != nil {
		t.Fatal(err)
	}
	if drop := freeBefore - status(t).Pool.FreeBytes; drop != rmodeSize {
		t.Errorf("snapshot of a written reserve-mode volume took %d MiB of free space, want its %d MiB (one copy per shared block)", drop/mib, rmodeSize/mib)
	}

	// Fill the pool from the other volume until its writes fail.
	res, err := vm.Run(ctx, 5*time.Minute, "dd if=/dev/zero of="+filler+" bs=1M oflag=direct 2>&1")
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 {
		t.Fatalf("filling a 1 GiB volume in a 320 MiB pool succeeded: %s", res.Stdout)
	}
	full := status(t)
	logPool("after filling", full)
	if full.Pool.FreeBytes >= 1*mib {
		t.Errorf("pool not full after the filler's write failed: %d MiB free", full.Pool.FreeBytes/mib)
	}

	t.Run("overwrite", func(t *testing.T) {
		// The filler's errors are in dmesg already; clear it so only keeper's count.
		g.sh(t, 20*time.Second, "dmesg -c >/dev/null")
		start := time.Now()
		g.sh(t, 15*time.Minute, `set -e
			cd /mnt/k
			for i in 1 2 3 4; do dd if=/dev/urandom of=f$i bs=1M count=8 conv=notrunc,fsync 2>/dev/null; done
			fio --name=v --filename=/mnt/k/fio.dat --size=32M --rw=randwrite --bssplit=4k/30:64k/70 --direct=1 \
				--ioengine=libaio --iodepth=4 --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio2.out
			free=$(df -m /mnt/k | awk 'NR==2 {print $4}')
			dd if=/dev/urandom of=rest bs=1M count=$((free - 8)) conv=fsync 2>/dev/null
			sha256sum f* fio.dat rest > /tmp/after.sums
			echo 3 > /proc/sys/vm/drop_caches
			sha256sum -c /tmp/after.sums >/dev/null`)
		t.Logf("overwrite, free-space fill and fio verify on a full pool: %v", time.Since(start).Round(time.Second))
		logPool("after the overwrite", status(t))
		if msgs := g.sh(t, 20*time.Second, `dmesg | grep -iE 'xfs|i/o error|blk_update|critical|shutdown' | grep -iE 'error|shut|corrupt|fail' ; true`); msgs != "" {
			t.Errorf("guest kernel reported errors while overwriting:\n%s", tail(msgs, 20))
		}
		if err := g.sh(t, 20*time.Second, "cat /tmp/fio2.out | grep -E 'err= *[1-9]' ; true"); err != "" {
			t.Errorf("fio reported errors: %s", err)
		}
	})

	t.Run("reserve-mode-overwrite", func(t *testing.T) {
		// Every block of rmode is shared with rsnap and the pool is full: each write copies.
		g.sh(t, 10*time.Minute, "fio --name=r --filename="+rmode+" --rw=randwrite --bssplit=4k/30:64k/70 --direct=1 --ioengine=libaio "+
			"--iodepth=4 --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio-rmode.out")
	})

	t.Run("reserve-mode-refused", func(t *testing.T) {
		st := status(t)
		_, err := ThinblkCmd(ctx, e.thinblk, "volume", "reserve", pool, "late", "on")
		if err == nil {
			t.Fatal("reserve mode for a 64 MiB volume on a full pool succeeded")
		}
		if !regexp.MustCompile(`(?i)no space`).MatchString(err.Error()) {
			t.Errorf("refused reserve mode: %v; want a \"no space\" error", err)
		}
		st2 := status(t)
		// The host file system's free space is the host's, which other
		// processes move (it changed by 4 KiB during one full run): only
		// the pool's own counters must stay.
		before, after := st.Pool, st2.Pool
		before.HostFreeBytes, after.HostFreeBytes = 0, 0
		if after != before {
			t.Errorf("pool counters changed by the refused reserve mode: %+v, were %+v", st2.Pool, st.Pool)
		}
		if l := volume(t, st2, "late"); l.ReservedBytes != 0 {
			t.Errorf("late reserves %d MiB after its reserve mode was refused", l.ReservedBytes/mib)
		}
	})

	t.Run("refused", func(t *testing.T) {
		// keeper's blocks are its own copies now, all provisioned: a new snapshot needs a
		// reservation for each, and the pool is full.
		st := status(t)
		list, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "list", pool)
		if err != nil {
			t.Fatal(err)
		}
		out, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "create", pool, "keeper", "ksnap2")
		if err == nil {
			t.Fatalf("snapshot of a fully provisioned volume on a full pool succeeded: %s", out)
		}
		if !regexp.MustCompile(`(?i)no space`).MatchString(err.Error()) {
			t.Errorf("refused snapshot: %v; want a \"no space\" error", err)
		}
		if list2, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "list", pool); err != nil || string(list2) != string(list) {
			t.Errorf("snapshot list changed by the refused snapshot: %q, was %q (%v)", list2, list, err)
		}
		if st2 := status(t); st2.Pool != st.Pool {
			t.Errorf("pool counters changed by the refused snapshot: %+v, were %+v", st2.Pool, st.Pool)
		}
	})

	g.sh(t, time.Minute, "umount /mnt/k")
	g.repairClean(t, keeper)
	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}

	t.Run("reserve-mode-snapshot-kept", func(t *testing.T) {
		if got := hostSum(t, waitExport(t, socks, "rsnap"), rmodeSize); got != rmodeSum {
			t.Errorf("rsnap sha256 %s after rmode was overwritten, want %s as written before the snapshot", got, rmodeSum)
		}
	})

	t.Run("snapshot-kept", func(t *testing.T) {
		// The snapshot still reads as before the overwrite.
		vm2, err := StartVM(ctx, VMOptions{
			Dir: filepath.Join(dir, "vm2"), Images: e.images,
			Disks: []DiskSpec{{Socket: waitExport(t, socks, "ksnap")}},
			Logf:  t.Logf,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer vm2.Kill()
		g2 := newGuest(t, vm2)
		if err := vm2.Agent.WriteFile(ctx, "/tmp/before.sums", beforeSums, 0o644); err != nil {
			t.Fatal(err)
		}
		dev, err := vm2.DiskDevice(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		// Taken frozen: all metadata in place, a log record left to replay (see
		// TestGuestSnapshotUnderWrites), which a read-only device cannot.
		g2.repairUnreplayed(t, dev)
		g2.sh(t, 3*time.Minute, "mkdir -p /mnt/s && mount -o ro,norecovery "+dev+" /mnt/s && cd /mnt/s && sha256sum -c /tmp/before.sums >/dev/null && cd / && umount /mnt/s")
		if err := g2.shutdown(t, ctx); err != nil {
			t.Error(err)
		}
	})

	t.Run("delete-releases", func(t *testing.T) {
		// keeper no longer shares anything: what it reserved for copies goes back, and all
		// the pool still reserves is its own unwritten provisioned blocks.
		if _, err := ThinblkCmd(ctx, e.thinblk, "snapshot", "delete", pool, "ksnap"); err != nil {
			t.Fatal(err)
		}
		st := status(t)
		logPool("after deleting the snapshot", st)
		k := volume(t, st, "keeper")
		if k.ReservedSharedBytes != 0 {
			t.Errorf("keeper still reserves %d MiB for copies after its only snapshot was deleted", k.ReservedSharedBytes/mib)
		}
		var sum int64
		for _, v := range st.Volumes {
			sum += v.ReservedBytes
		}
		if st.Pool.ReservedBytes != sum {
			t.Errorf("pool reserves %d MiB, its volumes %d MiB", st.Pool.ReservedBytes/mib, sum/mib)
		}
		if k.MappedBytes+k.ReservedBytes != keeperSize {
			t.Errorf("keeper: mapped %d MiB + reserved %d MiB, want its whole %d MiB provisioned", k.MappedBytes/mib, k.ReservedBytes/mib, keeperSize/mib)
		}
	})
	stopAndCheck(t, e, b, pool)
}
