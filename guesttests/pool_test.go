package guesttests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const mib = 1 << 20

// hostBytes is the space a file takes on the host file system.
func hostBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// canPunch reports whether the file system holding dir can punch holes
// (thin pools give freed blocks back to it only then).
func canPunch(t *testing.T, dir string) bool {
	t.Helper()
	f, err := os.CreateTemp(dir, "punch")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := f.Write(make([]byte, 1<<16)); err != nil {
		t.Fatal(err)
	}
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 1<<16) == nil
}

// TestGuestThinPool: filesystems on 64 GiB thin volumes in a 2 GiB pool. Writing 600 MiB maps
// about that much; deleting it and trimming (fstrim on XFS, the discard mount option on ext4)
// gives it back down to about the filesystem's metadata, and the pool's data file gives the
// space back to the host; the pool's accounting stays exact. Then serve is restarted under a mounted filesystem and the data reads back.
func TestGuestThinPool(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the pool is thinblk's own")
	}
	ctx := context.Background()
	dir := workDir(t)
	pool := filepath.Join(dir, "pool")
	socks := filepath.Join(dir, "socks")
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "2G"},
		{"volume", "create", pool, "xfsvol", "--size", "64G"},
		{"volume", "create", pool, "ext4vol", "--size", "64G"},
	} {
		if _, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatal(err)
		}
	}
	b, err := StartBackend(ctx, BackendOptions{
		Kind: ThinPool, Image: pool, Socket: filepath.Join(socks, "ext4vol.sock"), Queues: 1,
		LogPath: filepath.Join(dir, "pool-backend.log"), ThinblkBin: e.thinblk,
	})
	if err != nil {
		t.Fatal(err)
	}
	// b is replaced by the restart subtest; stop whichever runs last.
	t.Cleanup(func() { b.Stop(15 * time.Second) })
	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images,
		Disks: []DiskSpec{{Socket: filepath.Join(socks, "xfsvol.sock"), Reconnect: true}, {Socket: filepath.Join(socks, "ext4vol.sock"), Reconnect: true}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	dataFile := filepath.Join(pool, "thinblk.data")
	punch := canPunch(t, pool)

	status := func(t *testing.T, name string) VolumeStatus {
		t.Helper()
		st, err := ThinblkStatus(ctx, e.thinblk, pool)
		if err != nil {
			t.Fatal(err)
		}
		p := st.Pool
		if p.AllocatedBytes+p.ReservedBytes+p.FreeBytes != p.SizeBytes {
			t.Errorf("pool accounting: allocated %d + reserved %d + free %d != size %d",
				p.AllocatedBytes, p.ReservedBytes, p.FreeBytes, p.SizeBytes)
		}
		v, ok := st.Volume(name)
		if !ok {
			t.Fatalf("status has no volume %s: %+v", name, st)
		}
		return v
	}

	check := func(t *testing.T, disk int, name, mkfs, mountOpts, trim string) {
		dev, err := vm.DiskDevice(ctx, disk)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(g.sh(t, 20*time.Second, "blockdev --getsize64 "+dev)); got != fmt.Sprint(int64(64<<30)) {
			t.Errorf("guest sees %s bytes, want 64 GiB", got)
		}
		g.sh(t, 3*time.Minute, mkfs+" "+dev+" && mkdir -p /mnt/"+name+" && mount "+mountOpts+" "+dev+" /mnt/"+name)
		empty := status(t, name).MappedBytes
		hostEmpty := hostBytes(t, dataFile)
		t.Logf("%s: %d MiB mapped after mkfs, data file %d MiB on the host", name, empty/mib, hostEmpty/mib)
		g.sh(t, 5*time.Minute, "fio --name=fill --filename=/mnt/"+name+"/big --rw=write --bs=1M --size=600M "+
			"--direct=1 --ioengine=libaio --iodepth=8 --output=/dev/null && sync")
		full := status(t, name).MappedBytes
		t.Logf("%s: %d MiB mapped after writing 600 MiB", name, full/mib)
		if full < empty+600*mib || full > empty+700*mib {
			t.Errorf("%s: mapped %d MiB after writing 600 MiB on %d MiB, want 600-700 MiB more", name, full/mib, empty/mib)
		}
		g.sh(t, 3*time.Minute, "rm /mnt/"+name+"/big && sync && "+trim)
		var after int64
		// Online discard is asynchronous in the guest (ext4 issues it at journal commit).
		for i := 0; i < 20; i++ {
			if after = status(t, name).MappedBytes; after <= empty+16*mib {
				break
			}
			time.Sleep(time.Second)
		}
		t.Logf("%s: %d MiB mapped after delete and trim", name, after/mib)
		if after > empty+16*mib {
			t.Errorf("%s: still %d MiB mapped after delete and trim, want near the %d MiB of metadata", name, after/mib, empty/mib)
		}
		// Freed blocks are punched out of the data file once their release is durable (the
		// next commit: at most FlushInterval, 2 s, away).
		var hostAfter int64
		for i := 0; i < 20; i++ {
			if hostAfter = hostBytes(t, dataFile); hostAfter <= hostEmpty+32*mib {
				break
			}
			time.Sleep(time.Second)
		}
		t.Logf("%s: data file %d MiB on the host after delete and trim (host file system punches holes: %v)", name, hostAfter/mib, punch)
		if punch && hostAfter > hostEmpty+32*mib {
			t.Errorf("%s: data file still takes %d MiB on the host after delete and trim (%d MiB before writing): freed blocks not given back", name, hostAfter/mib, hostEmpty/mib)
		}
		g.sh(t, time.Minute, "umount /mnt/"+name)
	}
	t.Run("xfs-fstrim", func(t *testing.T) {
		check(t, 0, "xfsvol", "mkfs.xfs -f -q", "", "fstrim -v /mnt/xfsvol")
	})
	t.Run("ext4-discard", func(t *testing.T) {
		check(t, 1, "ext4vol", "mkfs.ext4 -F -q", "-o discard", "sleep 6")
	})
	t.Run("restart", func(t *testing.T) {
		// Stop serve under a mounted filesystem, start it again; QEMU reconnects and the
		// data reads back from the pool (the guest's page cache dropped first).
		dev, err := vm.DiskDevice(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		g.sh(t, 3*time.Minute, "mount "+dev+" /mnt/xfsvol && dd if=/dev/urandom of=/mnt/xfsvol/keep bs=1M count=32 2>/dev/null && sync && sha256sum /mnt/xfsvol/keep > /tmp/keep.sum")
		if err := b.Stop(15 * time.Second); err != nil {
			t.Fatalf("stop pool back-end: %v\n%s", err, b.LogTail(20))
		}
		b, err = StartBackend(ctx, BackendOptions{
			Kind: ThinPool, Image: pool, Socket: filepath.Join(socks, "ext4vol.sock"), Queues: 1,
			LogPath: filepath.Join(dir, "pool-backend-2.log"), ThinblkBin: e.thinblk,
		})
		if err != nil {
			t.Fatal(err)
		}
		g.sh(t, 3*time.Minute, "echo 3 > /proc/sys/vm/drop_caches && sha256sum -c /tmp/keep.sum && umount /mnt/xfsvol && xfs_repair -n "+dev+" >/dev/null 2>&1")
		if v := status(t, "xfsvol"); v.MappedBytes < 32*mib {
			t.Errorf("xfsvol maps %d MiB after the restart, want at least the 32 MiB written", v.MappedBytes/mib)
		}
	})
	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(15 * time.Second); err != nil {
		t.Fatalf("stop pool back-end: %v\n%s", err, b.LogTail(20))
	}
	if out, err := ThinblkCmd(ctx, e.thinblk, "check", pool); err != nil {
		t.Errorf("thinblk check after the guest run: %v\n%s", err, out)
	}
}

// startPool creates a pool with the given volumes (name, size) and serves it; the pool server
// is stopped when the test ends.
func startPool(t *testing.T, e *env, dir string, createArgs []string, volumes ...[2]string) (pool, socks string, b *Backend) {
	t.Helper()
	ctx := context.Background()
	pool = filepath.Join(dir, "pool")
	socks = filepath.Join(dir, "socks")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := ThinblkCmd(ctx, e.thinblk, append([]string{"pool", "create", pool}, createArgs...)...); err != nil {
		t.Fatal(err)
	}
	for _, v := range volumes {
		if _, err := ThinblkCmd(ctx, e.thinblk, "volume", "create", pool, v[0], "--size", v[1]); err != nil {
			t.Fatal(err)
		}
	}
	b, err := StartBackend(ctx, BackendOptions{
		Kind: ThinPool, Image: pool, Socket: filepath.Join(socks, volumes[len(volumes)-1][0]+".sock"), Queues: 1,
		LogPath: filepath.Join(dir, "pool-backend.log"), ThinblkBin: e.thinblk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(15 * time.Second) })
	return pool, socks, b
}

// stopAndCheck stops a pool server and runs `thinblk check` on its pool.
func stopAndCheck(t *testing.T, e *env, b *Backend, pool string) {
	t.Helper()
	if err := b.Stop(15 * time.Second); err != nil {
		t.Fatalf("stop pool back-end: %v\n%s", err, b.LogTail(20))
	}
	if out, err := ThinblkCmd(context.Background(), e.thinblk, "check", pool); err != nil {
		t.Errorf("thinblk check %s: %v\n%s", pool, err, out)
	}
}

// TestGuestThinProvision: a range provisioned from the guest (BLKZEROOUT via blkdiscard -z,
// and fallocate --zero-range on the device: both WRITE_ZEROES without unmap) stays writable
// after another volume has filled the pool, while a write to unprovisioned space fails; after
// an online `pool grow` it succeeds. In a second pool created with --no-space queue, a write
// that needs space when there is none waits instead, and completes once that pool grows.
func TestGuestThinProvision(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the pool is thinblk's own")
	}
	ctx := context.Background()
	dir := workDir(t)
	pool, socks, b := startPool(t, e, filepath.Join(dir, "err"), []string{"--size", "1G", "--no-space", "error"},
		[2]string{"keeper", "4G"}, [2]string{"filler", "4G"})
	qpool, qsocks, qb := startPool(t, e, filepath.Join(dir, "queue"), []string{"--size", "256M", "--no-space", "queue", "--no-space-timeout", "120s"},
		[2]string{"waiter", "1G"})
	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images,
		Disks: []DiskSpec{
			{Socket: filepath.Join(socks, "keeper.sock")}, {Socket: filepath.Join(socks, "filler.sock")},
			{Socket: filepath.Join(qsocks, "waiter.sock")},
		},
		Logf: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	status := func(t *testing.T, pool string) *PoolStatus {
		t.Helper()
		st, err := ThinblkStatus(ctx, e.thinblk, pool)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}

	t.Run("error-mode", func(t *testing.T) {
		keeper, err := vm.DiskDevice(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		filler, err := vm.DiskDevice(ctx, 1)
		if err != nil {
			t.Fatal(err)
		}
		// Provision 64 MiB each way: [0, 64M) with BLKZEROOUT, [64M, 128M) with fallocate -z.
		g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -z -o 0 -l %d %s && fallocate -z -o %d -l %d %s", 64*mib, keeper, 64*mib, 64*mib, keeper))
		k, _ := status(t, pool).Volume("keeper")
		t.Logf("keeper after provisioning: mapped %d MiB, provisioned %d MiB, reserved %d MiB", k.MappedBytes/mib, k.ProvisionedBytes/mib, k.ReservedBytes/mib)
		if k.ProvisionedBytes != 128*mib {
			t.Fatalf("keeper has %d MiB provisioned, want 128 MiB (are blkdiscard -z and fallocate -z reaching the pool as WRITE_ZEROES without unmap?)", k.ProvisionedBytes/mib)
		}
		if got := strings.Fields(g.sh(t, time.Minute, fmt.Sprintf("dd if=%s bs=1M count=128 iflag=direct 2>/dev/null | sha256sum", keeper)))[0]; got != sha256Hex(make([]byte, 128*mib)) {
			t.Error("provisioned range does not read as zeros")
		}

		// Fill the pool from the other volume until writes fail.
		res, err := vm.Run(ctx, 5*time.Minute, "dd if=/dev/zero of="+filler+" bs=1M oflag=direct 2>&1")
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode == 0 {
			t.Fatalf("filling a 4 GiB volume in a 1 GiB pool succeeded: %s", res.Stdout)
		}
		st := status(t, pool)
		t.Logf("pool after filling: allocated %d MiB, reserved %d MiB, free %d MiB", st.Pool.AllocatedBytes/mib, st.Pool.ReservedBytes/mib, st.Pool.FreeBytes/mib)
		if st.Pool.FreeBytes >= 1*mib {
			t.Errorf("pool not full after the filler's write failed: %d MiB free", st.Pool.FreeBytes/mib)
		}

		// The provisioned range takes a full write with verification; beyond it writes fail.
		g.sh(t, 5*time.Minute, "fio --name=provisioned --filename="+keeper+" --direct=1 --ioengine=libaio --rw=randwrite "+
			"--bssplit=4k/50:64k/50 --iodepth=8 --size=128M --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/dev/null")
		unprovisioned := fmt.Sprintf("dd if=/dev/urandom of=%s bs=64k seek=%d count=1 oflag=direct conv=notrunc", keeper, 1024*mib/(64<<10))
		g.shFails(t, time.Minute, unprovisioned)
		if _, err := ThinblkCmd(ctx, e.thinblk, "pool", "grow", pool, "--size", "2G"); err != nil {
			t.Fatal(err)
		}
		g.sh(t, time.Minute, unprovisioned)

		// The calls that give space back: fallocate --punch-hole on the device is
		// WRITE_ZEROES with unmap, blkdiscard is DISCARD. Both clear provisioning.
		before, _ := status(t, pool).Volume("keeper")
		g.sh(t, time.Minute, fmt.Sprintf("fallocate -p -o 0 -l %d %s", 64*mib, keeper))
		k, _ = status(t, pool).Volume("keeper")
		if k.ProvisionedBytes != 64*mib || k.MappedBytes > before.MappedBytes-64*mib {
			t.Errorf("after fallocate -p of 64 MiB: provisioned %d MiB (want 64), mapped %d MiB (was %d)", k.ProvisionedBytes/mib, k.MappedBytes/mib, before.MappedBytes/mib)
		}
		g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -o %d -l %d %s", 64*mib, 64*mib, keeper))
		k, _ = status(t, pool).Volume("keeper")
		if k.ProvisionedBytes != 0 || k.MappedBytes > before.MappedBytes-128*mib {
			t.Errorf("after blkdiscard of the other 64 MiB: provisioned %d MiB (want 0), mapped %d MiB (was %d)", k.ProvisionedBytes/mib, k.MappedBytes/mib, before.MappedBytes/mib)
		}
		if got := strings.Fields(g.sh(t, time.Minute, fmt.Sprintf("dd if=%s bs=1M count=128 iflag=direct 2>/dev/null | sha256sum", keeper)))[0]; got != sha256Hex(make([]byte, 128*mib)) {
			t.Error("punched and discarded range does not read as zeros")
		}
	})

	t.Run("queue-mode", func(t *testing.T) {
		dev, err := vm.DiskDevice(ctx, 2)
		if err != nil {
			t.Fatal(err)
		}
		// Fill exactly what is free, then one more block's write must wait.
		g.sh(t, 3*time.Minute, fmt.Sprintf("dd if=/dev/zero of=%s bs=64k count=%d oflag=direct 2>/dev/null", dev, status(t, qpool).Pool.FreeBytes/(64<<10)))
		if free := status(t, qpool).Pool.FreeBytes; free != 0 {
			t.Fatalf("queue-mode pool not exactly full: %d bytes free", free)
		}
		g.sh(t, 20*time.Second, fmt.Sprintf(`rm -f /tmp/rc; (dd if=/dev/urandom of=%s bs=64k seek=%d count=1 oflag=direct conv=notrunc; echo $? > /tmp/rc) >/dev/null 2>&1 &`,
			dev, 512*mib/(64<<10)))
		time.Sleep(3 * time.Second)
		if out := g.sh(t, 20*time.Second, "cat /tmp/rc 2>/dev/null || echo waiting"); strings.TrimSpace(out) != "waiting" {
			t.Fatalf("write to a full queue-mode pool did not wait: exit status %s", out)
		}
		if _, err := ThinblkCmd(ctx, e.thinblk, "pool", "grow", qpool, "--size", "512M"); err != nil {
			t.Fatal(err)
		}
		var rc string
		for i := 0; i < 60; i++ {
			if rc = strings.TrimSpace(g.sh(t, 20*time.Second, "cat /tmp/rc 2>/dev/null || echo waiting")); rc != "waiting" {
				break
			}
			time.Sleep(time.Second)
		}
		if rc != "0" {
			t.Errorf("queued write after pool grow: %s, want exit status 0", rc)
		}
	})

	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}
	stopAndCheck(t, e, b, pool)
	stopAndCheck(t, e, qb, qpool)
}
