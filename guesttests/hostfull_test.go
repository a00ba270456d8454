package guesttests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestGuestProvisionOnFullHost is issue 12's scenario: a 1 GiB pool on a 256 MiB ext4 host file
// system (a loop-mounted image, data and metadata on it; pool create warns), a guest provisions
// 64 MiB with `blkdiscard -z`, another file fills the host file system, and the guest writes its
// whole provisioned range and reads it back intact; a write to unprovisioned space fails (the
// error policy) instead. `thinblk check` is clean afterwards.
func TestGuestProvisionOnFullHost(t *testing.T) {
	e := setup(t)
	needRootPool(t, e, "loop-mounting an ext4 image")
	ctx := context.Background()
	dir := workDir(t)
	img := sparseFile(t, filepath.Join(dir, "host.img"), 256*mib)
	mnt := filepath.Join(dir, "host")
	for _, c := range [][]string{{"mkfs.ext4", "-q", "-F", img}, {"mkdir", "-p", mnt}, {"mount", "-o", "loop", img, mnt}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", c, err, out)
		}
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })

	pool := filepath.Join(mnt, "pool")
	var stderr bytes.Buffer
	create := exec.Command(e.thinblk, "pool", "create", pool, "--size", "1G")
	create.Stderr = &stderr
	if out, err := create.Output(); err != nil {
		t.Fatalf("pool create: %v\n%s%s", err, out, stderr.String())
	}
	if !strings.Contains(stderr.String(), "warning: the host file system has") {
		t.Errorf("pool create of 1 GiB on a 256 MiB file system did not warn: %q", stderr.String())
	}
	if _, err := ThinblkCmd(ctx, e.thinblk, "volume", "create", pool, "keeper", "--size", "512M"); err != nil {
		t.Fatal(err)
	}
	// Sockets and the log stay off the host file system that fills up.
	b, err := StartBackend(ctx, BackendOptions{
		Kind: ThinPool, Image: pool, Socket: filepath.Join(dir, "socks", "keeper.sock"), Queues: 1,
		LogPath: filepath.Join(dir, "pool-backend.log"), ThinblkBin: e.thinblk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(15 * time.Second) })
	vm, err := StartVM(ctx, VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: e.images,
		Disks: []DiskSpec{{Socket: filepath.Join(dir, "socks", "keeper.sock")}},
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

	g.sh(t, time.Minute, fmt.Sprintf("blkdiscard -z -o 0 -l %d %s", 64*mib, dev))
	st, err := ThinblkStatus(ctx, e.thinblk, pool)
	if err != nil {
		t.Fatal(err)
	}
	if k, _ := st.Volume("keeper"); k.ProvisionedBytes != 64*mib {
		t.Fatalf("keeper has %d MiB provisioned after blkdiscard -z of 64 MiB", k.ProvisionedBytes/mib)
	}

	// Another tenant fills the host file system.
	filler := filepath.Join(mnt, "other-tenant")
	fillHost(t, filler)

	g.sh(t, 2*time.Minute, fmt.Sprintf("dd if=/dev/urandom of=/tmp/pattern bs=1M count=64 2>/dev/null && "+
		"dd if=/tmp/pattern of=%s bs=1M oflag=direct conv=notrunc 2>&1 && "+
		"test \"$(dd if=%s bs=1M count=64 iflag=direct 2>/dev/null | sha256sum)\" = \"$(sha256sum < /tmp/pattern)\"", dev, dev))
	g.shFails(t, time.Minute, fmt.Sprintf("dd if=/dev/urandom of=%s bs=64k seek=%d count=1 oflag=direct conv=notrunc", dev, 256*mib/(64<<10)))

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}
	stopAndCheck(t, e, b, pool)
}

// fillHost writes path until its file system is full (ENOSPC).
func fillHost(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0xee}, 1<<20)
	for _, n := range []int{1 << 20, 4096} {
		for {
			if _, err := f.Write(buf[:n]); err != nil {
				if !errors.Is(err, unix.ENOSPC) {
					t.Fatalf("fill host: %v", err)
				}
				break
			}
		}
	}
	if err := f.Sync(); err != nil && !errors.Is(err, unix.ENOSPC) {
		t.Fatal(err)
	}
}
