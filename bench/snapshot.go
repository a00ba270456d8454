package bench

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/thinblk/thinblk/thin"
)

// SnapshotOptions configure MeasureSnapshot.
type SnapshotOptions struct {
	Dir       string // the pool is made in Dir (removed first, and after)
	BlockSize uint32 // pool block size; 0: 64 KiB
	Samples   int    // read-only snapshots and clones taken (each); at least 1
	Check     bool   // run Pool.Check after populating (and after the deletes)
	Delete    bool   // time deleting every snapshot and clone
	Keep      bool   // leave the pool in Dir
	Log       io.Writer
}

// SnapshotResult is what MeasureSnapshot measured for one volume size.
type SnapshotResult struct {
	Mapped    uint64
	BlockSize uint32
	Populate  PopulateStats
	Open      time.Duration // thin.Open of the populated pool
	Check     time.Duration // Pool.Check after populating; 0: not run
	MetaBytes uint64        // Pebble store size after populating
	// Baseline: CreateVolume of an empty volume, a metadata commit of
	// the same kind as a snapshot's, for scale.
	Baseline []time.Duration
	// Snapshots[0] and Clones[0] are the first ones: Snapshots[0]
	// freezes the layer holding all Mapped entries. Later ones are
	// snapshots of the same volume (still Mapped blocks readable, now
	// through a chain of layers).
	Snapshots, Clones []time.Duration
	StampsRead        int             // stamped blocks read back through the snapshot and the clone
	Deletes           []time.Duration // when measured: each snapshot or clone, newest first
	DeleteCheck       time.Duration   // Pool.Check after the deletes; 0: not run
}

// Median returns the median of ds (0 for none).
func Median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// MeasureSnapshot populates a pool whose volume has mapped blocks
// (PopulateThin) and times CreateSnapshot on it: read-only snapshots and
// writable clones, against an empty CreateVolume as the baseline. It
// also proves that what it timed is a real snapshot: stamped blocks read
// back through the snapshot and the clone, and a write to the origin
// after the snapshot leaves the snapshot's block as it was.
func MeasureSnapshot(mapped uint64, o SnapshotOptions) (SnapshotResult, error) {
	if o.BlockSize == 0 {
		o.BlockSize = 64 << 10
	}
	o.Samples = max(o.Samples, 1)
	logf := func(format string, args ...any) {
		if o.Log != nil {
			fmt.Fprintf(o.Log, format, args...)
		}
	}
	res := SnapshotResult{Mapped: mapped, BlockSize: o.BlockSize}
	if err := os.RemoveAll(o.Dir); err != nil {
		return res, err
	}
	if !o.Keep {
		defer os.RemoveAll(o.Dir)
	}
	// About a thousand stamps whatever the size: enough to see every
	// region of the map through the snapshot, cheap to write.
	po := PopulateOptions{Volume: "origin", BlockSize: o.BlockSize, Mapped: mapped, StampEvery: max(mapped/1024, 1)}
	logf("snapshot: populating %d mapped blocks of %d KiB in %s\n", mapped, o.BlockSize>>10, o.Dir)
	var err error
	if res.Populate, err = PopulateThin(o.Dir, po); err != nil {
		return res, err
	}
	logf("snapshot: populated in %v\n", res.Populate.Duration.Round(time.Millisecond))
	t0 := time.Now()
	p, err := thin.Open(o.Dir, thin.OpenOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return res, err
	}
	res.Open = time.Since(t0)
	defer p.Close()
	res.MetaBytes = p.Status().Pool.MetadataBytes
	if o.Check {
		t0 = time.Now()
		if err := p.Check(nil); err != nil {
			return res, fmt.Errorf("check of the populated pool: %w", err)
		}
		res.Check = time.Since(t0)
		logf("snapshot: check clean in %v\n", res.Check.Round(time.Millisecond))
	}
	if st := volStatus(p, "origin"); st.MappedBytes != mapped*uint64(o.BlockSize) {
		return res, fmt.Errorf("origin maps %d bytes, want %d", st.MappedBytes, mapped*uint64(o.BlockSize))
	}
	timed := func(fn func() error) (time.Duration, error) {
		t0 := time.Now()
		err := fn()
		return time.Since(t0), err
	}
	// Baseline, snapshot and clone samples interleave, so that the
	// three see the same machine: on a shared one the cost of a synced
	// commit drifts by several times within a minute.
	var made []string
	for i := 0; i < o.Samples; i++ {
		d, err := timed(func() error { return p.CreateVolume(fmt.Sprintf("baseline%d", i), uint64(o.BlockSize)) })
		if err != nil {
			return res, err
		}
		res.Baseline = append(res.Baseline, d)
		for _, writable := range []bool{false, true} {
			name := fmt.Sprintf("snap%d", i)
			if writable {
				name = fmt.Sprintf("clone%d", i)
			}
			d, err := timed(func() error { return p.CreateSnapshot("origin", name, writable) })
			if err != nil {
				return res, err
			}
			made = append(made, name)
			if writable {
				res.Clones = append(res.Clones, d)
			} else {
				res.Snapshots = append(res.Snapshots, d)
			}
		}
	}
	logf("snapshot: first snapshot %v, first clone %v, median %v / %v of %d each\n",
		res.Snapshots[0], res.Clones[0], Median(res.Snapshots), Median(res.Clones), o.Samples)
	if err := verifySnapshot(p, po, &res); err != nil {
		return res, err
	}
	if o.Delete {
		for i := len(made) - 1; i >= 0; i-- {
			d, err := timed(func() error { return p.DeleteVolume(made[i]) })
			if err != nil {
				return res, err
			}
			res.Deletes = append(res.Deletes, d)
		}
		logf("snapshot: deleted %d snapshots and clones, longest %v\n", len(made), slices.Max(res.Deletes))
		if o.Check {
			t0 = time.Now()
			if err := p.Check(nil); err != nil {
				return res, fmt.Errorf("check after deleting the snapshots: %w", err)
			}
			res.DeleteCheck = time.Since(t0)
		}
	}
	return res, p.Close()
}

func volStatus(p *thin.Pool, name string) thin.VolumeStatus {
	for _, v := range p.Status().Volumes {
		if v.Name == name {
			return v
		}
	}
	return thin.VolumeStatus{}
}

// verifySnapshot reads stamps through the first snapshot and clone, then
// overwrites a stamped block in the origin and in the clone and checks
// that the snapshot still reads the stamp (copy-on-write happened).
func verifySnapshot(p *thin.Pool, po PopulateOptions, res *SnapshotResult) error {
	if po.Mapped == 0 {
		return nil
	}
	for _, name := range []string{"snap0", "clone0", "origin"} {
		v, err := p.Volume(name)
		if err != nil {
			return err
		}
		n, err := CheckStamps(v, po, 256)
		if err != nil {
			return err
		}
		if name != "origin" {
			res.StampsRead += n
		}
	}
	last := po.Mapped - 1
	newData := bytes.Repeat([]byte{0xa5}, StampLen)
	for _, w := range []struct {
		vol string
		vb  uint64
	}{{"origin", 0}, {"clone0", last}} {
		v, err := p.Volume(w.vol)
		if err != nil {
			return err
		}
		off := int64(w.vb * uint64(po.BlockSize))
		if err := v.WriteAt([][]byte{newData}, off); err != nil {
			return fmt.Errorf("write to %s after the snapshot: %w", w.vol, err)
		}
		got := make([]byte, StampLen)
		if err := v.ReadAt([][]byte{got}, off); err != nil {
			return err
		}
		if !bytes.Equal(got, newData) {
			return fmt.Errorf("%s block %d reads %x after the write", w.vol, w.vb, got)
		}
	}
	snap, err := p.Volume("snap0")
	if err != nil {
		return err
	}
	for _, vb := range []uint64{0, last} {
		got := make([]byte, StampLen)
		if err := snap.ReadAt([][]byte{got}, int64(vb*uint64(po.BlockSize))); err != nil {
			return err
		}
		if !bytes.Equal(got, Stamp(vb)) {
			return fmt.Errorf("snapshot block %d changed after a write to its origin or clone: %x", vb, got)
		}
	}
	return nil
}

// SnapshotDir is where MeasureSnapshot's pool for mapped blocks goes
// under dir.
func SnapshotDir(dir string, mapped uint64) string {
	return filepath.Join(dir, fmt.Sprintf("snappool-%d", mapped))
}
