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
