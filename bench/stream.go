package bench

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/thin"
)

// StreamOptions configure MeasureStream.
type StreamOptions struct {
	Bin       string // thinblk binary: send and receive run as real processes joined by a pipe
	Dir       string // work directory (removed first, and after unless Keep)
	Written   int64  // bytes written into the source volume, in BlockSize writes
	BlockSize uint32 // pool block size and write size; 0: 64 KiB
	Changed   float64
	Repeat    int // each timing this many times, alternating; medians are reported
	Keep      bool
	Log       io.Writer
}

// StreamResult is one run of the stream target; every timing has Repeat
// samples, taken alternately.
type StreamResult struct {
	Written, BlockSize int64
	// Copy: cp of the source pool's data file (as cp does it: coreutils
	// copies a sparse file's data extents in the kernel); CopySync: the
	// same copy then fdatasync'ed, which is what a receive does before it
	// returns (its data is durable, its snapshot committed).
	Copy, CopySync []time.Duration
	// Full: `thinblk send SRC s1 | thinblk receive DST vm` of Written
	// bytes into a new pool.
	Full      []time.Duration
	FullBytes int64 // the stream's size
	// Incr: `thinblk send SRC s2 --from s1 | thinblk receive DST vm`
	// after ChangedBlocks random blocks were rewritten; Empty: the same
	// for a snapshot with no change since (s3 from s2): the fixed cost of
	// two processes opening their pools and committing.
	Incr, Empty   []time.Duration
	IncrBytes     int64
	ChangedBlocks int64
	Verified      bool // the received snapshots read the same as the sent ones, byte for byte
}

// MeasureStream fills a volume, snapshots it, and times copying its pool's
// data file with cp against a full send | receive, then an incremental one
// after rewriting a fraction of the blocks, and an empty one. All in one
// run, alternating, on the same files: the source is in the page cache
// for both (written just before), destinations are new files.
func MeasureStream(o StreamOptions) (StreamResult, error) {
	if o.BlockSize == 0 {
		o.BlockSize = 64 << 10
	}
	o.Repeat = max(1, o.Repeat)
	bs := int64(o.BlockSize)
	res := StreamResult{Written: o.Written, BlockSize: bs}
	if o.Written <= 0 || o.Written%bs != 0 {
		return res, fmt.Errorf("written bytes %d: want a positive multiple of the block size %d", o.Written, bs)
	}
	logf := func(format string, a ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, format+"\n", a...)
		}
	}
	os.RemoveAll(o.Dir)
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return res, err
	}
	if !o.Keep {
		defer os.RemoveAll(o.Dir)
	}
	src, dst := filepath.Join(o.Dir, "src"), filepath.Join(o.Dir, "dst")
	// The pools have room for the data and the changed blocks' copies; the
	// volume is twice the data, so that its unwritten half is sparse.
	poolSize := uint64(o.Written + o.Written/8 + 64*bs)
	poolSize -= poolSize % uint64(bs)
	if err := thin.Create(src, thin.CreateOptions{Size: poolSize, BlockSize: o.BlockSize}); err != nil {
		return res, err
	}
	quiet := thin.OpenOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), FlushInterval: -1}
	blocks := o.Written / bs
	logf("stream: writing %d MiB in %d KiB blocks", o.Written>>20, bs>>10)
	err := withPool(src, quiet, func(p *thin.Pool) error {
		if err := p.CreateVolume("vm", uint64(2*o.Written)); err != nil {
			return err
		}
		v, err := p.Volume("vm")
		if err != nil {
			return err
		}
		buf := make([]byte, bs)
		for vb := range blocks {
			fillBlock(buf, uint64(vb), 1)
			if err := v.WriteAt([][]byte{buf}, vb*bs); err != nil {
				return err
			}
		}
		if err := p.Flush(); err != nil {
			return err
		}
		return p.CreateSnapshot("vm", "s1", false)
	})
	if err != nil {
		return res, fmt.Errorf("fill the source: %w", err)
	}
	data := filepath.Join(src, poolDataName)
	copyTo := filepath.Join(o.Dir, "copy")
	for i := range o.Repeat {
		logf("stream: cp of the data file (%d/%d)", i+1, o.Repeat)
		t0 := time.Now()
		if out, err := exec.Command("cp", data, copyTo).CombinedOutput(); err != nil {
			return res, fmt.Errorf("cp: %v: %s", err, out)
		}
		res.Copy = append(res.Copy, time.Since(t0))
		if err := fdatasync(copyTo); err != nil {
			return res, err
		}
		res.CopySync = append(res.CopySync, time.Since(t0))
		os.Remove(copyTo)
		logf("stream: full send | receive (%d/%d)", i+1, o.Repeat)
		os.RemoveAll(dst)
		if err := thin.Create(dst, thin.CreateOptions{Size: poolSize, BlockSize: o.BlockSize}); err != nil {
			return res, err
		}
		d, n, err := pipeStream(o.Bin, src, dst, "s1", "")
		if err != nil {
			return res, err
		}
		res.Full, res.FullBytes = append(res.Full, d), n
	}
	// Rewrite a fraction of the blocks, scattered; then a snapshot with
	// no change at all.
	res.ChangedBlocks = max(1, int64(float64(blocks)*o.Changed))
	err = withPool(src, quiet, func(p *thin.Pool) error {
		v, err := p.Volume("vm")
		if err != nil {
			return err
		}
		rng := rand.New(rand.NewPCG(uint64(blocks), 15))
		buf := make([]byte, bs)
		for _, vb := range rng.Perm(int(blocks))[:res.ChangedBlocks] {
			fillBlock(buf, uint64(vb), 2)
			if err := v.WriteAt([][]byte{buf}, int64(vb)*bs); err != nil {
				return err
			}
		}
		if err := p.CreateSnapshot("vm", "s2", false); err != nil {
			return err
		}
		return p.CreateSnapshot("vm", "s3", false)
	})
	if err != nil {
		return res, fmt.Errorf("change the source: %w", err)
	}
	for i := range o.Repeat {
		if i > 0 {
			// Back to s1 on the destination (not timed).
			err := withPool(dst, quiet, func(p *thin.Pool) error {
				for _, n := range []string{"vm", "s3", "s2"} {
					if err := p.DeleteVolume(n); err != nil {
						return err
					}
				}
				return p.CreateSnapshot("s1", "vm", true)
			})
			if err != nil {
				return res, fmt.Errorf("reset the destination: %w", err)
			}
		}
		logf("stream: incremental send | receive of %d blocks (%d/%d)", res.ChangedBlocks, i+1, o.Repeat)
		d, n, err := pipeStream(o.Bin, src, dst, "s2", "s1")
		if err != nil {
			return res, err
		}
		res.Incr, res.IncrBytes = append(res.Incr, d), n
		if d, _, err = pipeStream(o.Bin, src, dst, "s3", "s2"); err != nil {
			return res, err
		}
		res.Empty = append(res.Empty, d)
	}
	logf("stream: verifying")
	for _, snap := range []string{"s1", "s2", "s3"} {
		if err := sameVolume(src, dst, snap, quiet); err != nil {
			return res, err
		}
	}
	err = withPool(dst, quiet, func(p *thin.Pool) error { return p.Check(nil) })
	if err != nil {
		return res, fmt.Errorf("check the destination: %w", err)
	}
	res.Verified = true
	return res, nil
}

// fillBlock makes a block's contents distinct per block and generation
// (no run of zeros a copy could skip).
func fillBlock(b []byte, vb uint64, gen byte) {
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], vb*0x9e3779b97f4a7c15+uint64(i)+uint64(gen)<<56)
	}
}

func withPool(dir string, o thin.OpenOptions, fn func(*thin.Pool) error) error {
	p, err := thin.Open(dir, o)
	if err != nil {
		return err
	}
	err = fn(p)
	if cerr := p.Close(); err == nil {
		err = cerr
	}
	return err
}

func fdatasync(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Fdatasync(int(f.Fd()))
}

// pipeStream times `thinblk send | thinblk receive` (a shell pipeline of
// the real binary) and counts the stream's bytes with a tee-free wc.
func pipeStream(bin, src, dst, snap, base string) (time.Duration, int64, error) {
	from := ""
	if base != "" {
		from = " --from " + base
	}
	script := fmt.Sprintf(`set -o pipefail; "$T" send %s %s%s | "$T" receive %s vm >/dev/null`, src, snap, from, dst)
	cmd := exec.Command("bash", "-c", script)
	cmd.Env = append(os.Environ(), "T="+bin)
	var errOut bytes.Buffer
	cmd.Stderr = &errOut
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, 0, fmt.Errorf("send %s%s | receive: %v: %s", snap, from, err, errOut.Bytes())
	}
	el := time.Since(t0)
	// The stream's size, from a second send (not timed).
	size := exec.Command("bash", "-c", fmt.Sprintf(`set -o pipefail; "$T" send %s %s%s | wc -c`, src, snap, from))
	size.Env = cmd.Env
	out, err := size.Output()
	if err != nil {
		return el, 0, fmt.Errorf("stream size: %v", err)
	}
	var n int64
	fmt.Sscan(string(out), &n)
	return el, n, nil
}

// sameVolume compares a volume of two pools byte for byte.
func sameVolume(srcDir, dstDir, name string, o thin.OpenOptions) error {
	return withPool(srcDir, o, func(a *thin.Pool) error {
		return withPool(dstDir, o, func(b *thin.Pool) error {
			va, err := a.Volume(name)
			if err != nil {
				return err
			}
			vb, err := b.Volume(name)
			if err != nil {
				return err
			}
			if va.Size() != vb.Size() {
				return fmt.Errorf("received %s has %d bytes, the sent one %d", name, vb.Size(), va.Size())
			}
			x, y := make([]byte, 1<<20), make([]byte, 1<<20)
			for off := uint64(0); off < va.Size(); off += uint64(len(x)) {
				n := min(uint64(len(x)), va.Size()-off)
				if err := va.ReadAt([][]byte{x[:n]}, int64(off)); err != nil {
					return err
				}
				if err := vb.ReadAt([][]byte{y[:n]}, int64(off)); err != nil {
					return err
				}
				if !bytes.Equal(x[:n], y[:n]) {
					return fmt.Errorf("received snapshot %s differs from the sent one in the MiB at %d", name, off)
				}
			}
			return nil
		})
	})
}
