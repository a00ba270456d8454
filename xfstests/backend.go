package xfstests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/thinblk/thinblk/guesttests"

	"github.com/thinblk/thinblk/internal/units"
)

// Volume names in the thinblk pool; they are also the serials the guest reads.
const (
	TestVolume    = "xfstest"
	ScratchVolume = "xfsscratch"
)

// BackendSetup describes the disks of one back-end's run.
type BackendSetup struct {
	Kind       string // "thinblk", "qsd" or "file" (QEMU's own virtio-blk on a raw file)
	Dir        string // the back-end's directory under the run directory
	ThinblkBin string
	// VolumeSize is the virtual size of TEST and SCRATCH; PoolSize the thin pool's real size
	// (smaller than both volumes together: over-committed).
	VolumeSize, PoolSize string
	Queues               int
	Logf                 func(format string, args ...any)
}

// Disks is a started back-end with its two disks.
type Disks struct {
	Setup         BackendSetup
	Test, Scratch Disk
	pool          string
	procs         []*guesttests.Backend
}

// StartDisks creates the storage (a pool with two volumes, or two sparse raw files of the
// same virtual size) and starts the back-end.
func StartDisks(ctx context.Context, s BackendSetup) (*Disks, error) {
	if s.Queues == 0 {
		s.Queues = 2
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("back-end dir: %w", err)
	}
	socks := filepath.Join(s.Dir, "sockets")
	d := &Disks{Setup: s,
		Test:    Disk{Socket: filepath.Join(socks, TestVolume+".sock"), Queues: s.Queues},
		Scratch: Disk{Socket: filepath.Join(socks, ScratchVolume+".sock"), Queues: s.Queues},
	}
	switch s.Kind {
	case "thinblk":
		d.pool = filepath.Join(s.Dir, "pool")
		_ = os.RemoveAll(d.pool)
		for _, args := range [][]string{
			{"pool", "create", d.pool, "--size", s.PoolSize},
			{"volume", "create", d.pool, TestVolume, "--size", s.VolumeSize},
			{"volume", "create", d.pool, ScratchVolume, "--size", s.VolumeSize},
		} {
			if _, err := guesttests.ThinblkCmd(ctx, s.ThinblkBin, args...); err != nil {
				return nil, err
			}
		}
		b, err := guesttests.StartBackend(ctx, guesttests.BackendOptions{
			Kind: guesttests.ThinPool, Image: d.pool, Socket: d.Test.Socket, Queues: s.Queues,
			LogPath: filepath.Join(s.Dir, "serve.log"), ThinblkBin: s.ThinblkBin,
		})
		if err != nil {
			return nil, err
		}
		d.procs = append(d.procs, b)
		if err := waitFile(ctx, d.Scratch.Socket, 15*time.Second); err != nil {
			d.Stop()
			return nil, err
		}
		d.Test.Serial, d.Scratch.Serial = TestVolume, ScratchVolume
	case "file":
		// QEMU's own virtio-blk on sparse raw files: no vhost-user back-end at all, the
		// reference for "the guest kernel does this on any disk".
		size, err := parseSize(s.VolumeSize)
		if err != nil {
			return nil, err
		}
		for _, disk := range []*Disk{&d.Test, &d.Scratch} {
			disk.File = strings.TrimSuffix(disk.Socket, ".sock") + ".raw"
			disk.File = filepath.Join(s.Dir, filepath.Base(disk.File))
			disk.Socket = ""
			if err := sparseFile(disk.File, size); err != nil {
				return nil, err
			}
		}
	case "qsd":
		size, err := parseSize(s.VolumeSize)
		if err != nil {
			return nil, err
		}
		for _, disk := range []Disk{d.Test, d.Scratch} {
			img := strings.TrimSuffix(disk.Socket, ".sock") + ".raw"
			img = filepath.Join(s.Dir, filepath.Base(img))
			_ = os.Remove(img)
			f, err := os.Create(img)
			if err == nil {
				err = f.Truncate(size)
				f.Close()
			}
			if err != nil {
				return nil, fmt.Errorf("raw image: %w", err)
			}
			if err := os.MkdirAll(socks, 0o755); err != nil {
				return nil, err
			}
			b, err := guesttests.StartBackend(ctx, guesttests.BackendOptions{
				Kind: guesttests.QSD, Image: img, Socket: disk.Socket, Queues: s.Queues,
				LogPath: strings.TrimSuffix(img, ".raw") + ".qsd.log",
			})
			if err != nil {
				d.Stop()
				return nil, err
			}
			d.procs = append(d.procs, b)
		}
	default:
		return nil, fmt.Errorf("back-end %q: want thinblk, qsd or file", s.Kind)
	}
	return d, nil
}

// sparseFile creates (or empties) a sparse file of size bytes.
func sparseFile(path string, size int64) error {
	_ = os.Remove(path)
	f, err := os.Create(path)
	if err == nil {
		err = f.Truncate(size)
		f.Close()
	}
	if err != nil {
		return fmt.Errorf("raw image: %w", err)
	}
	return nil
}

// Stop stops the back-end processes (SIGTERM: in-flight I/O finishes, data is synced).
func (d *Disks) Stop() error {
	var errs []string
	for _, b := range d.procs {
		if err := b.Stop(30 * time.Second); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", b.Opts.Kind, err))
		}
	}
	d.procs = nil
	if len(errs) > 0 {
		return fmt.Errorf("stop back-end: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Alive reports whether every back-end process still runs.
func (d *Disks) Alive() bool {
	for _, b := range d.procs {
		if !b.Alive() {
			return false
		}
	}
	return true
}

// CheckPool runs `thinblk check` on the stopped pool and verifies its accounting; it
// returns "" when both are clean (and always for qsd).
func (d *Disks) CheckPool(ctx context.Context) string {
	if d.pool == "" {
		return ""
	}
	var problems []string
	if out, err := guesttests.ThinblkCmd(ctx, d.Setup.ThinblkBin, "check", d.pool, "--quiet"); err != nil {
		problems = append(problems, fmt.Sprintf("thinblk check: %v\n%s", err, out))
	}
	st, err := guesttests.ThinblkStatus(ctx, d.Setup.ThinblkBin, d.pool)
	if err != nil {
		problems = append(problems, err.Error())
	} else if msg := AccountingProblem(st); msg != "" {
		problems = append(problems, msg)
	}
	return strings.Join(problems, "; ")
}

// AccountingProblem checks a pool's status: allocated + reserved + free is the size, and
// the volumes' reserved bytes add up to the pool's; the volumes' mapped bytes add up to no
// more than the allocated bytes (the rest is being released).
func AccountingProblem(st *guesttests.PoolStatus) string {
	p := st.Pool
	var problems []string
	if p.AllocatedBytes+p.ReservedBytes+p.FreeBytes != p.SizeBytes || p.AllocatedBytes < 0 || p.FreeBytes < 0 || p.ReservedBytes < 0 {
		problems = append(problems, fmt.Sprintf("allocated %d + reserved %d + free %d != size %d",
			p.AllocatedBytes, p.ReservedBytes, p.FreeBytes, p.SizeBytes))
	}
	var mapped, reserved int64
	for _, v := range st.Volumes {
		mapped += v.MappedBytes
		reserved += v.ReservedBytes
		if v.MappedBytes > v.SizeBytes {
			problems = append(problems, fmt.Sprintf("volume %s maps %d bytes of %d", v.Name, v.MappedBytes, v.SizeBytes))
		}
	}
	if reserved != p.ReservedBytes {
		problems = append(problems, fmt.Sprintf("volumes reserve %d bytes, pool says %d", reserved, p.ReservedBytes))
	}
	if mapped > p.AllocatedBytes {
		problems = append(problems, fmt.Sprintf("volumes map %d bytes, pool allocated only %d", mapped, p.AllocatedBytes))
	}
	if len(problems) == 0 {
		return ""
	}
	return "pool accounting: " + strings.Join(problems, "; ")
}

func waitFile(ctx context.Context, path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not there after %v", path, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// parseSize reads sizes like 8G, 512M, 4096 (K, M, G, T: powers of 1024).
func parseSize(s string) (int64, error) {
	n, err := units.ParseSize(s)
	if err != nil || n == 0 || n > 1<<62 {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T", s)
	}
	return int64(n), nil
}
