// Package guesttests boots real QEMU guests against a vhost-user-blk back-end (thinblk or
// qemu-storage-daemon) and runs checks inside them through the guest agent. The exported
// harness (StartBackend, StartVM, EnsureImages) is used by the tests in this package and by
// the demo program (guesttests/cmd/demo).
//
// A typical use:
//
//	im, _ := EnsureImages(ctx, root)                       // images/build.sh, cached
//	b, _ := StartBackend(ctx, BackendOptions{Kind: Thinblk, Image: img, Socket: sock, ThinblkBin: bin})
//	vm, _ := StartVM(ctx, VMOptions{Dir: dir, Images: im, Disks: []DiskSpec{{Socket: sock}}})
//	defer vm.Kill()
//	dev, _ := vm.DiskDevice(ctx, 0)                        // e.g. /dev/vda, found by PCI slot
//	res, _ := vm.Run(ctx, time.Minute, "mkfs.xfs -f "+dev)  // exit code, stdout, stderr
//	vm.Shutdown(ctx, time.Minute)
//
// Running the tests: `go test ./guesttests/` builds the images and thinblk itself. They need
// qemu-system-x86_64 (and qemu-storage-daemon for THINBLK_BACKEND=qsd) and fail without it
// unless THINBLK_SKIP_VM=1. THINBLK_BACKEND=thinblk (default), qsd, or thinblk,qsd for both;
// THINBLK_ACCEL=tcg|kvm skips the KVM probe; THINBLK_GUEST_KEEP=1 keeps logs and images
// (kept anyway when a test fails); THINBLK_BUILD moves the build directory.
package guesttests

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

const modulePath = "github.com/thinblk/thinblk"

// RepoRoot finds the checkout this code lives in by walking up from the working directory to
// the go.mod of the thinblk module.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find repo root: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module "+modulePath+"\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find repo root: no go.mod of " + modulePath + " above the working directory")
		}
		dir = parent
	}
}

// BuildDir is where build outputs go: $THINBLK_BUILD (set by the Makefile) or root/_build.
func BuildDir(root string) string {
	if d := os.Getenv("THINBLK_BUILD"); d != "" {
		return d
	}
	return filepath.Join(root, "_build")
}

// Images are the guest kernel and initramfs built by images/build.sh.
type Images struct {
	Kernel, Initrd string
}

var imagesOnce struct {
	sync.Mutex
	done map[string]Images
}

// EnsureImages runs images/build.sh (cached: a no-op when its inputs did not change) and
// returns the paths of the kernel and initramfs under BuildDir(root)/images.
func EnsureImages(ctx context.Context, root string) (Images, error) {
	imagesOnce.Lock()
	defer imagesOnce.Unlock()
	if im, ok := imagesOnce.done[root]; ok {
		return im, nil
	}
	out := filepath.Join(BuildDir(root), "images")
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "images", "build.sh"), out)
	cmd.Dir = root
	var logBuf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	if err := cmd.Run(); err != nil {
		return Images{}, fmt.Errorf("build guest images: %w\n%s", err, tail(logBuf.String(), 40))
	}
	im := Images{Kernel: filepath.Join(out, "vmlinuz"), Initrd: filepath.Join(out, "initramfs.cpio.gz")}
	if imagesOnce.done == nil {
		imagesOnce.done = map[string]Images{}
	}
	imagesOnce.done[root] = im
	return im, nil
}

// BuildThinblk builds ./cmd/thinblk into BuildDir(root)/bin/thinblk and returns its path.
// It builds once per process.
func BuildThinblk(ctx context.Context, root string) (string, error) {
	thinblkOnce.Lock()
	defer thinblkOnce.Unlock()
	if bin, ok := thinblkOnce.done[root]; ok {
		return bin, nil
	}
	bin, err := buildThinblk(ctx, root)
	if err != nil {
		return "", err
	}
	if thinblkOnce.done == nil {
		thinblkOnce.done = map[string]string{}
	}
	thinblkOnce.done[root] = bin
	return bin, nil
}

var thinblkOnce struct {
	sync.Mutex
	done map[string]string
}

func buildThinblk(ctx context.Context, root string) (string, error) {
	bin := filepath.Join(BuildDir(root), "bin", "thinblk")
	cmd := exec.CommandContext(ctx, goTool(), "build", "-o", bin, "./cmd/thinblk")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build thinblk: %w\n%s", err, out)
	}
	return bin, nil
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// kernelReportStarts are the first lines of the guest kernel's reports of its own trouble (an
// oops, a BUG, a WARN, the OOM killer): a console tail shows only their end, where the cause is
// not.
var kernelReportStarts = []string{"------------[ cut here ]", "BUG:", "Oops:", "WARNING:",
	"general protection fault", "Kernel panic", "invoked oom-killer", "Out of memory"}

// kernelReport returns the console from the first kernel report on (at most 120 lines), or ""
// when the kernel reported none.
func kernelReport(console string) string {
	lines := strings.Split(console, "\n")
	for i, line := range lines {
		for _, start := range kernelReportStarts {
			if strings.Contains(line, start) {
				end := min(i+120, len(lines))
				return strings.Join(lines[i:end], "\n")
			}
		}
	}
	return ""
}

// DefaultBackend is what the guest tests serve their disks with unless THINBLK_BACKEND says
// otherwise.
const DefaultBackend = Thinblk

// ThinblkCmd runs a thinblk CLI command (pool, volume, status, check) and returns its stdout.
func ThinblkCmd(ctx context.Context, bin string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("thinblk %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// PoolStatus is the part of `thinblk status --json` the tests read.
type PoolStatus struct {
	Pool struct {
		SizeBytes      int64 `json:"size_bytes"`
		AllocatedBytes int64 `json:"allocated_bytes"`
		ReservedBytes  int64 `json:"reserved_bytes"`
		FreeBytes      int64 `json:"free_bytes"`
		ReleasingBytes int64 `json:"releasing_bytes"`
		// PendingMapChanges are map changes not committed yet.
		PendingMapChanges int64 `json:"pending_map_changes"`
		// The host's side (README "The promise holds against the host").
		DataHostBytes     int64  `json:"data_host_bytes"`
		HostFreeBytes     int64  `json:"host_free_bytes"`
		HostUnbackedBytes int64  `json:"host_unbacked_bytes"`
		Preallocated      bool   `json:"preallocated"`
		DataDevice        string `json:"data_device"`
	} `json:"pool"`
	Volumes []VolumeStatus `json:"volumes"`
}

// VolumeStatus is one volume in PoolStatus.
type VolumeStatus struct {
	Name             string `json:"name"`
	SizeBytes        int64  `json:"size_bytes"`
	MappedBytes      int64  `json:"mapped_bytes"`
	ProvisionedBytes int64  `json:"provisioned_bytes"`
	ReservedBytes    int64  `json:"reserved_bytes"`
	// ReservedSharedBytes is the part of ReservedBytes held for the copy-on-write of
	// provisioned blocks shared with snapshots.
	ReservedSharedBytes int64  `json:"reserved_shared_bytes"`
	Kind                string `json:"kind"`
}

// Volume returns the named volume's status.
func (s *PoolStatus) Volume(name string) (VolumeStatus, bool) {
	for _, v := range s.Volumes {
		if v.Name == name {
			return v, true
		}
	}
	return VolumeStatus{}, false
}

// ThinblkStatus runs `thinblk status DIR --json`.
func ThinblkStatus(ctx context.Context, bin, pool string) (*PoolStatus, error) {
	out, err := ThinblkCmd(ctx, bin, "status", pool, "--json")
	if err != nil {
		return nil, err
	}
	var st PoolStatus
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("thinblk status %s: %w\n%s", pool, err, out)
	}
	return &st, nil
}
