// Command demo shows thinblk end to end: it serves a raw disk image under the build directory
// with `thinblk serve --raw`, boots a QEMU guest on it, makes an XFS filesystem in the guest,
// writes and checks a file, prints what happened, and shuts everything down.
//
//	go run ./guesttests/cmd/demo [--build DIR] [--backend thinblk|qsd] [--size 2G] [--fs xfs|ext4]
//
// `make demo` runs it. The disk image (DIR/demo/disk.img) is kept between runs; each run
// makes a new filesystem on it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/guesttests"
	"github.com/thinblk/thinblk/internal/units"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	build := flag.String("build", "", "build directory (default $THINBLK_BUILD or <repo>/_build)")
	backend := flag.String("backend", string(guesttests.Thinblk), "back-end: thinblk or qsd (qemu-storage-daemon)")
	size := flag.String("size", "2G", "size of the demo disk when it is created")
	fsType := flag.String("fs", "xfs", "filesystem to make: xfs or ext4")
	flag.Parse()
	if *fsType != "xfs" && *fsType != "ext4" {
		return fmt.Errorf("--fs %q: want xfs or ext4", *fsType)
	}
	diskBytes, err := parseSize(*size)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root, err := guesttests.RepoRoot()
	if err != nil {
		return err
	}
	if *build != "" {
		abs, err := filepath.Abs(*build)
		if err != nil {
			return err
		}
		os.Setenv("THINBLK_BUILD", abs)
	}
	buildDir := guesttests.BuildDir(root)
	dir := filepath.Join(buildDir, "demo")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}

	step("building the guest kernel and initramfs (cached)")
	images, err := guesttests.EnsureImages(ctx, root)
	if err != nil {
		return err
	}
	opts := guesttests.BackendOptions{
		Kind: guesttests.BackendKind(*backend), Image: filepath.Join(dir, "disk.img"),
		Socket: filepath.Join(dir, "disk.sock"), Queues: 1, LogPath: filepath.Join(dir, "backend.log"),
	}
	if opts.Kind == guesttests.Thinblk {
		step("building thinblk")
		if opts.ThinblkBin, err = guesttests.BuildThinblk(ctx, root); err != nil {
			return err
		}
	}
	if err := ensureDisk(opts.Image, diskBytes); err != nil {
		return err
	}

	step(fmt.Sprintf("starting the back-end: %s serving %s on %s", opts.Kind, opts.Image, opts.Socket))
	b, err := guesttests.StartBackend(ctx, opts)
	if err != nil {
		return err
	}
	defer b.Kill()

	step("booting a QEMU guest (TCG: this takes a little while)")
	vm, err := guesttests.StartVM(ctx, guesttests.VMOptions{
		Dir: filepath.Join(dir, "vm"), Images: images, CPUs: 1,
		Disks: []guesttests.DiskSpec{{Socket: opts.Socket, Queues: 1}},
		Logf: func(format string, args ...any) {
			if line := fmt.Sprintf(format, args...); strings.Contains(line, "answered") {
				fmt.Println("  " + line)
			}
		},
	})
	if err != nil {
		return err
	}
	defer vm.Kill()
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		return err
	}

	mkfs := "mkfs.xfs -f -q"
	fsck := "xfs_repair -n"
	if *fsType == "ext4" {
		mkfs, fsck = "mkfs.ext4 -F -q", "e2fsck -fn"
	}
	steps := []struct{ what, script string }{
		{"the guest sees the disk", "cat /sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/size | awk '{printf \"%s: %d MiB\\n\", \"" + dev + "\", $1/2048}'"},
		{"make a filesystem", mkfs + " " + dev + " && echo made " + *fsType + " on " + dev},
		{"mount it and write 64 MiB", "mkdir -p /mnt/demo && mount " + dev + " /mnt/demo && dd if=/dev/urandom of=/mnt/demo/data bs=1M count=64 2>/dev/null && sync && sha256sum /mnt/demo/data | tee /tmp/sum && df -h /mnt/demo | tail -1"},
		{"unmount and check the filesystem", "umount /mnt/demo && " + fsck + " " + dev + " >/dev/null 2>&1 && echo " + fsck + ": clean"},
		{"mount again and verify the data", "mount " + dev + " /mnt/demo && sha256sum -c /tmp/sum && umount /mnt/demo"},
	}
	for _, s := range steps {
		step("guest: " + s.what)
		fmt.Printf("  $ %s\n", s.script)
		res, err := vm.Run(ctx, 3*time.Minute, s.script)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(strings.TrimRight(string(res.Stdout)+string(res.Stderr), "\n"), "\n") {
			if line != "" {
				fmt.Println("  " + line)
			}
		}
		if res.ExitCode != 0 || res.TimedOut {
			return fmt.Errorf("guest step %q failed (exit %d)", s.what, res.ExitCode)
		}
	}

	step("shutting down the guest and the back-end")
	if err := vm.Shutdown(ctx, time.Minute); err != nil {
		return err
	}
	if err := b.Stop(15 * time.Second); err != nil {
		return fmt.Errorf("back-end: %w", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(opts.Image, &st); err == nil {
		fmt.Printf("  host image %s: %d MiB virtual, %d MiB allocated on the host\n", opts.Image, st.Size>>20, st.Blocks*512>>20)
	}
	step("done: logs in " + dir)
	return nil
}

func step(s string) { fmt.Println("==> " + s) }

// ensureDisk creates a sparse image of the given size unless one exists.
func ensureDisk(path string, size int64) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create demo disk: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("size demo disk: %w", err)
	}
	return nil
}

// parseSize reads sizes like 8G, 512M, 4096 (K, M, G, T: powers of 1024).
func parseSize(s string) (int64, error) {
	n, err := units.ParseSize(s)
	if err != nil || n == 0 || n > 1<<62 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T", s)
	}
	return int64(n), nil
}
