package guesttests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Harness pieces that need no VM.

func TestQemuOptEscape(t *testing.T) {
	if got := qemuOptEscape("/a,b/c,,d"); got != "/a,,b/c,,,,d" {
		t.Errorf("qemuOptEscape = %q", got)
	}
}

func TestTail(t *testing.T) {
	if got := tail("a\nb\nc\n", 2); got != "b\nc" {
		t.Errorf("tail = %q", got)
	}
	if got := tail("a", 5); got != "a" {
		t.Errorf("tail = %q", got)
	}
}

func TestKernelReport(t *testing.T) {
	console := "[ 1.0] booting\n[ 2.0] ------------[ cut here ]------------\n[ 2.0] kernel BUG at block/blk-lib.c:10!\n" +
		strings.Repeat("[ 2.1] frame\n", 200) + "[ 9.0] ---[ end trace 0000000000000000 ]---\n"
	report := kernelReport(console)
	if !strings.HasPrefix(report, "[ 2.0] ------------[ cut here ]") || !strings.Contains(report, "blk-lib.c:10") {
		t.Errorf("report does not start at the kernel's first line of it:\n%s", report)
	}
	if n := strings.Count(report, "\n") + 1; n != 120 {
		t.Errorf("report has %d lines, want it cut at 120", n)
	}
	if report := kernelReport("[ 1.0] booting\n[ 2.0] EXT4-fs (vdb): mounted\n"); report != "" {
		t.Errorf("a clean console gave a report: %q", report)
	}
}

func TestGuestCIDsDistinct(t *testing.T) {
	seen := map[uint32]bool{}
	for i := 0; i < 100; i++ {
		c := guestCID()
		if c < 3 || c == 0xffffffff || seen[c] {
			t.Fatalf("guest CID %d reused or reserved", c)
		}
		seen[c] = true
	}
}

func TestRepoRoot(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "images", "build.sh")); err != nil {
		t.Errorf("repo root %s has no images/build.sh: %v", root, err)
	}
}

func TestStartBackendUnknownKind(t *testing.T) {
	if _, err := StartBackend(context.Background(), BackendOptions{Kind: "nbd"}); err == nil {
		t.Error("unknown back-end kind accepted")
	}
}

// TestStartBackendFailureShowsLog: a back-end that exits at once (its image is missing) is
// reported with its own log lines, not as a socket timeout.
func TestStartBackendFailureShowsLog(t *testing.T) {
	if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
		if os.Getenv("THINBLK_SKIP_VM") == "1" {
			t.Skip("THINBLK_SKIP_VM=1 and no qemu-storage-daemon")
		}
		t.Fatalf("qemu-storage-daemon not found (install qemu-system-x86, or THINBLK_SKIP_VM=1): %v", err)
	}
	dir := t.TempDir()
	start := time.Now()
	_, err := StartBackend(context.Background(), BackendOptions{
		Kind: QSD, Image: filepath.Join(dir, "missing.img"), Socket: filepath.Join(dir, "s.sock"),
		LogPath: filepath.Join(dir, "log"),
	})
	if err == nil {
		t.Fatal("back-end on a missing image started")
	}
	if !strings.Contains(err.Error(), "exited before listening") || !strings.Contains(err.Error(), "missing.img") {
		t.Errorf("error does not explain itself: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("failure took %v to report", d)
	}
}
