package guesttests

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const mib = 1 << 20

// TestGuestThinPool: filesystems on 64 GiB thin volumes in a 2 GiB pool. Writing 600 MiB maps
// about that much; deleting it and trimming (fstrim on XFS, the discard mount option on ext4)
// gives it back down to about the filesystem's metadata; the pool's accounting stays exact.
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
	t.Cleanup(func() {
		if err := b.Stop(15 * time.Second); err != nil {
			t.Errorf("stop pool back-end: %v\n%s", err, b.LogTail(20))
		}
	})
	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images,
		Disks: []DiskSpec{{Socket: filepath.Join(socks, "xfsvol.sock")}, {Socket: filepath.Join(socks, "ext4vol.sock")}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := guest{VM: vm, t: t}

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
		t.Logf("%s: %d MiB mapped after mkfs", name, empty/mib)
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
		g.sh(t, time.Minute, "umount /mnt/"+name)
	}
	t.Run("xfs-fstrim", func(t *testing.T) {
		check(t, 0, "xfsvol", "mkfs.xfs -f -q", "", "fstrim -v /mnt/xfsvol")
	})
	t.Run("ext4-discard", func(t *testing.T) {
		check(t, 1, "ext4vol", "mkfs.ext4 -F -q", "-o discard", "sleep 6")
	})
	if err := vm.Shutdown(ctx, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(15 * time.Second); err != nil {
		t.Fatalf("stop pool back-end: %v\n%s", err, b.LogTail(20))
	}
	if out, err := ThinblkCmd(ctx, e.thinblk, "check", pool); err != nil {
		t.Errorf("thinblk check after the guest run: %v\n%s", err, out)
	}
}
