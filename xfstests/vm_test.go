package xfstests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/guesttests"
)

// vmEnv builds what the guest tests need: thinblk and the xfstests guest image. It fails
// without QEMU unless THINBLK_SKIP_VM=1.
func vmEnv(t *testing.T) (root, thinblk string, im GuestImage) {
	t.Helper()
	if os.Getenv("THINBLK_SKIP_VM") == "1" {
		t.Skip("THINBLK_SKIP_VM=1")
	}
	for _, bin := range []string{"qemu-system-x86_64", "qemu-storage-daemon"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found (install qemu-system-x86 and qemu-utils, or set THINBLK_SKIP_VM=1): %v", bin, err)
		}
	}
	ctx := context.Background()
	root, err := guesttests.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	thinblk, err = guesttests.BuildThinblk(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	im, err = EnsureGuestImage(ctx, root, filepath.Join(guesttests.BuildDir(root), "xfstests-image"))
	if err != nil {
		t.Fatal(err)
	}
	return root, thinblk, im
}

// TestGuestFakeCheck boots the xfstests guest on both back-ends with the fake check in place
// of xfstests: the host root is shared over 9p, both disks are found by PCI slot (and on
// thinblk by serial), TEST holds a filesystem, the scratch disk takes a filesystem, data and
// fstrim, fsgqa and /dev/fd exist, results come back to the host, and the pool is clean.
func TestGuestFakeCheck(t *testing.T) {
	root, thinblk, im := vmEnv(t)
	out := filepath.Join(guesttests.BuildDir(root), "xfstests-vmtest", t.Name())
	_ = os.RemoveAll(out)
	var progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rep := RunSuite(ctx, SuiteOptions{
		XfstestsDir: fakeTree(t), OutDir: out, FSTYP: "xfs",
		Tests:    []string{"generic/100", "generic/001", "generic/002"},
		Backends: []string{"thinblk", "qsd"}, ThinblkBin: thinblk, Image: im,
		VolumeSize: "8G", PoolSize: "1G", Queues: 2, MemoryMB: 1024, CPUs: 2,
		TestTimeout: 5 * time.Minute, Progress: &progress, Logf: t.Logf,
	})
	t.Logf("progress:\n%s", progress.String())
	var table bytes.Buffer
	rep.WriteTable(&table)
	t.Logf("summary:\n%s", table.String())
	if len(rep.Runs) != 2 {
		t.Fatalf("runs: %+v", rep.Runs)
	}
	for _, run := range rep.Runs {
		got := byTest(run.Results)
		if run.Error != "" || run.PoolCheck != "" {
			t.Errorf("%s: error %q, pool check %q", run.Backend, run.Error, run.PoolCheck)
		}
		for test, want := range map[string]Outcome{"generic/100": Pass, "generic/001": Pass, "generic/002": NotRun} {
			if got[test].Outcome != want {
				t.Errorf("%s: %s %s (%s), want %s; output:\n%s", run.Backend, test, got[test].Outcome, got[test].Reason, want, got[test].Output)
			}
		}
		// Results written in the guest are on the host.
		full, err := os.ReadFile(filepath.Join(out, run.Backend, "results", "generic", "100.full"))
		if err != nil {
			t.Errorf("%s: %v", run.Backend, err)
		} else if n := strings.Count(string(full), " 8589934592\n"); n != 2 {
			t.Errorf("%s: want both disks of 8 GiB in 100.full:\n%s", run.Backend, full)
		}
		check, _ := os.ReadFile(filepath.Join(out, run.Backend, "session1", "check.out"))
		// Two vCPUs: the guest driver uses min(queues offered, CPUs) queues.
		queues := strings.Count(string(check), "queues 2")
		if queues != 2 {
			t.Errorf("%s: want two disks with 2 queues each in the guest:\n%s", run.Backend, check)
		}
		if run.Backend == "thinblk" && (!strings.Contains(string(check), "serial '"+TestVolume+"'") || !strings.Contains(string(check), "serial '"+ScratchVolume+"'")) {
			t.Errorf("thinblk: serials not seen:\n%s", check)
		}
	}
	if len(rep.Differences) != 0 || !rep.OK() {
		t.Errorf("differences %+v, OK %v", rep.Differences, rep.OK())
	}
	// The pool is thin: the filesystems and data took real space, far below the volumes' size.
	st, err := guesttests.ThinblkStatus(context.Background(), thinblk, filepath.Join(out, "thinblk", "backend", "pool"))
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := st.Volume(ScratchVolume); v.MappedBytes == 0 || v.MappedBytes > 512<<20 {
		t.Errorf("scratch volume maps %d bytes", v.MappedBytes)
	}
	if !t.Failed() && os.Getenv("THINBLK_GUEST_KEEP") == "" {
		os.RemoveAll(out)
	}
}

// TestGuestFileBackend: --backend file boots the same guest on QEMU's own virtio-blk-pci over
// two sparse raw files (no vhost-user): both disks are found at their PCI slots with the
// requested queues, TEST holds a filesystem, and results come back to the host.
func TestGuestFileBackend(t *testing.T) {
	root, thinblk, im := vmEnv(t)
	out := filepath.Join(guesttests.BuildDir(root), "xfstests-vmtest", t.Name())
	_ = os.RemoveAll(out)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rep := RunSuite(ctx, SuiteOptions{
		XfstestsDir: fakeTree(t), OutDir: out, FSTYP: "xfs",
		Tests:    []string{"generic/100", "generic/001"},
		Backends: []string{"file"}, ThinblkBin: thinblk, Image: im,
		VolumeSize: "8G", Queues: 2, MemoryMB: 1024, CPUs: 2,
		TestTimeout: 5 * time.Minute, Logf: t.Logf,
	})
	if len(rep.Runs) != 1 || rep.Runs[0].Error != "" {
		t.Fatalf("runs: %+v", rep.Runs)
	}
	for _, x := range rep.Runs[0].Results {
		if x.Outcome != Pass {
			t.Errorf("%s: %s (%s)\n%s", x.Test, x.Outcome, x.Reason, x.Output)
		}
	}
	full, err := os.ReadFile(filepath.Join(out, "file", "results", "generic", "100.full"))
	if err != nil {
		t.Fatal(err)
	} else if n := strings.Count(string(full), " 8589934592\n"); n != 2 {
		t.Errorf("want both disks of 8 GiB in 100.full:\n%s", full)
	}
	check, _ := os.ReadFile(filepath.Join(out, "file", "session1", "check.out"))
	if n := strings.Count(string(check), "queues 2"); n != 2 {
		t.Errorf("want two disks with 2 queues each in the guest:\n%s", check)
	}
	// QEMU served the files itself: the guest's writes are in them.
	for _, name := range []string{TestVolume, ScratchVolume} {
		img := filepath.Join(out, "file", "backend", name+".raw")
		var st syscall.Stat_t
		if err := syscall.Stat(img, &st); err != nil {
			t.Fatal(err)
		} else if st.Blocks == 0 || st.Size != 8<<30 {
			t.Errorf("%s: size %d, %d blocks allocated: the guest did not write it", img, st.Size, st.Blocks)
		}
	}
	if !t.Failed() && os.Getenv("THINBLK_GUEST_KEEP") == "" {
		os.RemoveAll(out)
	}
}
