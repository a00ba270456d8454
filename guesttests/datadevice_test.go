package guesttests

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestGuestDataDeviceAndPreallocate: issue 12's two layouts where the host cannot run out under a
// pool, with one guest holding a disk from each.
//
// A pool whose data is a loop device over a sparse file (`--data-device`): the guest's writes read
// back intact and land on the device (the loop's file grows); a range provisioned with
// `blkdiscard -z` takes a verified write once the pool is full while an unprovisioned write fails;
// the guest's DISCARDs go down to the device, so the loop's file gives its space back to the host,
// and the discarded range reads as zeros and is written again.
//
// A pool created with `--preallocate`: its data file is wholly allocated on the host (st_blocks)
// at creation, the guest's writes read back intact, and after the guest discarded everything and
// the release is committed and done, the data file is still wholly allocated (no punching).
//
// status names the device and the preallocation and reports no host free space or over-commitment
// for either; `thinblk check` is clean for both.
func TestGuestDataDeviceAndPreallocate(t *testing.T) {
	e := setup(t)
	needRootPool(t, e, "a loop device")
	ctx := context.Background()
	dir := workDir(t)
	backing := sparseFile(t, filepath.Join(dir, "loop.img"), 128*mib)
	loop := attachLoop(t, backing) // detached after the pool servers stop (cleanups run last first)
	devPool, devSocks, devB := startPool(t, e, filepath.Join(dir, "dev"), []string{"--size", "64M", "--data-device", loop}, [2]string{"dv", "256M"})
	thickPool, thickSocks, thickB := startPool(t, e, filepath.Join(dir, "thick"), []string{"--size", "64M", "--preallocate"}, [2]string{"tv", "256M"})
	thickData := filepath.Join(thickPool, "thinblk.data")

	status := func(t *testing.T, pool string) *PoolStatus {
		t.Helper()
		st, err := ThinblkStatus(ctx, e.thinblk, pool)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	if st := status(t, devPool).Pool; st.DataDevice != loop || st.Preallocated || st.HostFreeBytes != 0 || st.HostUnbackedBytes != 0 {
		t.Errorf("status of a pool on %s: %+v", loop, st)
	}
	if st := status(t, thickPool).Pool; !st.Preallocated || st.DataDevice != "" || st.DataHostBytes < 64*mib || st.HostFreeBytes != 0 || st.HostUnbackedBytes != 0 {
		t.Errorf("status of a preallocated pool: %+v", st)
	}
	if out, err := ThinblkCmd(ctx, e.thinblk, "status", devPool); err != nil || !strings.Contains(string(out), "data on block device "+loop) {
		t.Errorf("status text of a pool on %s (%v):\n%s", loop, err, out)
	}
	if out, err := ThinblkCmd(ctx, e.thinblk, "status", thickPool); err != nil || !strings.Contains(string(out), "preallocated") {
		t.Errorf("status text of a preallocated pool (%v):\n%s", err, out)
	}
	if got := hostBytes(t, thickData); got < 64*mib {
		t.Fatalf("--preallocate: the data file takes %d MiB on the host, want all 64 MiB", got/mib)
	}

	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images,
		Disks: []DiskSpec{{Socket: filepath.Join(devSocks, "dv.sock")}, {Socket: filepath.Join(thickSocks, "tv.sock")}},
		Logf:  t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	dv, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	tv, err := vm.DiskDevice(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	// settled waits until a pool has committed its map and punched what it released: a FLUSH
	// from the guest commits, the punching runs behind the commit.
	settled := func(t *testing.T, pool, dev string) *PoolStatus {
		t.Helper()
		g.sh(t, time.Minute, "dd if=/dev/null of="+dev+" oflag=direct conv=notrunc,fsync 2>/dev/null")
		var st *PoolStatus
		waitUntil(t, time.Minute, func() (bool, string) {
			st = status(t, pool)
			return st.Pool.ReleasingBytes == 0 && st.Pool.PendingMapChanges == 0, fmt.Sprintf("%s: %+v", pool, st.Pool)
		})
		return st
	}

	t.Run("data-device", func(t *testing.T) {
		empty := hostBytes(t, backing)
		g.sh(t, 2*time.Minute, verifiedWrite(dv, 0, 16))
		// The loop device writes through the page cache of its file, whose blocks are counted
		// as soon as they are reserved.
		waitUntil(t, time.Minute, func() (bool, string) {
			got := hostBytes(t, backing)
			return got >= empty+16*mib, fmt.Sprintf("the loop's file takes %d MiB after the guest wrote 16 MiB (%d MiB before)", got/mib, empty/mib)
		})

		g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -z -o %d -l %d %s", 16*mib, 16*mib, dv))
		if v, _ := status(t, devPool).Volume("dv"); v.ProvisionedBytes != 16*mib {
			t.Fatalf("dv has %d MiB provisioned after blkdiscard -z of 16 MiB", v.ProvisionedBytes/mib)
		}
		// Fill the pool's remaining 32 MiB from the guest until its write fails.
		res, err := vm.Run(ctx, 3*time.Minute, fmt.Sprintf("dd if=/dev/zero of=%s bs=1M seek=32 oflag=direct 2>&1", dv))
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode == 0 {
			t.Fatalf("writing 224 MiB into a 64 MiB pool holding 32 MiB succeeded: %s", res.Stdout)
		}
		if free := status(t, devPool).Pool.FreeBytes; free >= 1*mib {
			t.Fatalf("pool on the device not full after the guest's write failed: %d MiB free", free/mib)
		}
		g.sh(t, 2*time.Minute, verifiedWrite(dv, 16, 16))
		g.shFails(t, time.Minute, fmt.Sprintf("dd if=/dev/urandom of=%s bs=64k seek=%d count=1 oflag=direct conv=notrunc", dv, 200*mib/(64<<10)))
		full := hostBytes(t, backing)

		// Discard all but the provisioned range: the device gets the discards.
		g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -o 0 -l %d %s && blkdiscard -o %d -l %d %s", 16*mib, dv, 32*mib, 224*mib, dv))
		st := settled(t, devPool, dv)
		if v, _ := st.Volume("dv"); v.MappedBytes != 16*mib || v.ProvisionedBytes != 16*mib {
			t.Errorf("dv after discarding all but its provisioned 16 MiB: mapped %d MiB, provisioned %d MiB", v.MappedBytes/mib, v.ProvisionedBytes/mib)
		}
		waitUntil(t, time.Minute, func() (bool, string) {
			got := hostBytes(t, backing)
			return got <= empty+18*mib, fmt.Sprintf("the loop's file takes %d MiB after the guest discarded all but 16 MiB (%d MiB before the discards, %d MiB empty): the discards did not reach the device",
				got/mib, full/mib, empty/mib)
		})
		t.Logf("the loop's file: %d MiB empty, %d MiB with the pool full, %d MiB after the discards", empty/mib, full/mib, hostBytes(t, backing)/mib)
		if got := strings.Fields(g.sh(t, time.Minute, fmt.Sprintf("dd if=%s bs=1M count=16 iflag=direct 2>/dev/null | sha256sum", dv)))[0]; got != sha256Hex(make([]byte, 16*mib)) {
			t.Error("the discarded range does not read as zeros")
		}
		g.sh(t, 2*time.Minute, verifiedWrite(dv, 0, 8))
	})

	t.Run("preallocate", func(t *testing.T) {
		g.sh(t, 2*time.Minute, verifiedWrite(tv, 0, 32))
		g.sh(t, time.Minute, "blkdiscard "+tv)
		st := settled(t, thickPool, tv)
		if v, _ := st.Volume("tv"); v.MappedBytes != 0 {
			t.Errorf("tv maps %d MiB after the guest discarded all of it", v.MappedBytes/mib)
		}
		if got := hostBytes(t, thickData); got < 64*mib || st.Pool.DataHostBytes < 64*mib {
			t.Errorf("a discard punched the preallocated pool: its data file takes %d MiB on the host (status: %d MiB), want 64 MiB",
				got/mib, st.Pool.DataHostBytes/mib)
		}
		if got := strings.Fields(g.sh(t, time.Minute, fmt.Sprintf("dd if=%s bs=1M count=32 iflag=direct 2>/dev/null | sha256sum", tv)))[0]; got != sha256Hex(make([]byte, 32*mib)) {
			t.Error("the discarded range does not read as zeros")
		}
		g.sh(t, 2*time.Minute, verifiedWrite(tv, 16, 32))
	})

	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}
	stopAndCheck(t, e, devB, devPool)
	stopAndCheck(t, e, thickB, thickPool)
}

// attachLoop attaches a loop device to file and detaches it when the test ends, failed or not.
func attachLoop(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--find", "--show", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup --find --show %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// verifiedWrite is a guest script that writes nMiB of random data at offMiB of dev (direct) and
// reads it back from the device (direct) to compare.
func verifiedWrite(dev string, offMiB, nMiB int) string {
	return fmt.Sprintf("dd if=/dev/urandom of=/tmp/pattern bs=1M count=%[3]d 2>/dev/null && "+
		"dd if=/tmp/pattern of=%[1]s bs=1M seek=%[2]d oflag=direct conv=notrunc 2>&1 && "+
		"test \"$(dd if=%[1]s bs=1M skip=%[2]d count=%[3]d iflag=direct 2>/dev/null | sha256sum)\" = \"$(sha256sum < /tmp/pattern)\" && "+
		"rm /tmp/pattern", dev, offMiB, nMiB)
}

// waitUntil polls cond until it holds; past timeout the test fails with cond's last word.
func waitUntil(t *testing.T, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, why := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, why)
		}
		time.Sleep(250 * time.Millisecond)
	}
}
