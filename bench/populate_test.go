package bench

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/thinblk/thinblk/thin"
)

func quietOpen(t *testing.T, dir string) *thin.Pool {
	t.Helper()
	p, err := thin.Open(dir, thin.OpenOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// TestPopulateThin: a populated pool is one thin itself could have
// written: Check is clean, the counters say so, stamped blocks read
// their stamps and unstamped mapped blocks zeros, and the pool keeps
// working (new writes get blocks of their own, snapshots copy on write).
func TestPopulateThin(t *testing.T) {
	for _, tc := range []struct {
		mapped, volBlocks, every uint64
		bs                       uint32
	}{
		{mapped: 5000, every: 1, bs: 4096},            // crosses a bitmap chunk (4096 blocks)
		{mapped: 8193, volBlocks: 9000, every: 7},     // two full chunks and one bit, sparse stamps
		{mapped: 1, volBlocks: 3, every: 1, bs: 8192}, // one block
		{mapped: 0, volBlocks: 2},                     // nothing mapped
	} {
		t.Run(fmt.Sprintf("mapped%d", tc.mapped), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "pool")
			o := PopulateOptions{Volume: "v", BlockSize: tc.bs, Mapped: tc.mapped, VolumeBlocks: tc.volBlocks, StampEvery: tc.every, FreeBlocks: 64}
			st, err := PopulateThin(dir, o)
			if err != nil {
				t.Fatal(err)
			}
			if st.Entries != tc.mapped {
				t.Fatalf("stats %+v", st)
			}
			if o.BlockSize == 0 {
				o.BlockSize = 64 << 10
			}
			bs := uint64(o.BlockSize)
			p := quietOpen(t, dir)
			if err := p.Check(nil); err != nil {
				t.Fatalf("check of the populated pool: %v", err)
			}
			s := p.Status()
			if s.Pool.AllocatedBytes != tc.mapped*bs || s.Pool.FreeBytes != 64*bs || s.Pool.BlockSize != o.BlockSize {
				t.Fatalf("pool status %+v", s.Pool)
			}
			if vs := volStatus(p, "v"); vs.MappedBytes != tc.mapped*bs || vs.SizeBytes != max(tc.volBlocks, tc.mapped)*bs {
				t.Fatalf("volume status %+v", vs)
			}
			v, err := p.Volume("v")
			if err != nil {
				t.Fatal(err)
			}
			// Every mapped block: its stamp when stamped, zeros when not
			// (the sparse data file).
			zero := make([]byte, StampLen)
			buf := make([]byte, StampLen)
			stamped := 0
			for vb := uint64(0); vb < tc.mapped; vb++ {
				if err := v.ReadAt([][]byte{buf}, int64(vb*bs)); err != nil {
					t.Fatal(err)
				}
				want := zero
				if o.Stamped(vb) {
					want = Stamp(vb)
					stamped++
				}
				if !bytes.Equal(buf, want) {
					t.Fatalf("block %d reads %x, want %x", vb, buf, want)
				}
			}
			if uint64(stamped) != st.Stamped {
				t.Fatalf("%d stamped blocks read, populate stamped %d", stamped, st.Stamped)
			}
			if n, err := CheckStamps(v, o, 10); err != nil || (tc.every != 0 && tc.mapped > 0 && n == 0) {
				t.Fatalf("CheckStamps: %d, %v", n, err)
			}
			// An unmapped block beyond the populated ones: a first write
			// allocates a free block, not one of the populated ones.
			vsize := max(tc.volBlocks, tc.mapped)
			if vsize > tc.mapped {
				data := bytes.Repeat([]byte{0x5a}, int(bs))
				if err := v.WriteAt([][]byte{data}, int64(tc.mapped*bs)); err != nil {
					t.Fatal(err)
				}
			}
			// A snapshot, then an overwrite of block 0 in the origin: the
			// snapshot keeps the old contents.
			if err := p.CreateSnapshot("v", "s", false); err != nil {
				t.Fatal(err)
			}
			if tc.mapped > 0 {
				if err := v.WriteAt([][]byte{bytes.Repeat([]byte{1}, StampLen)}, 0); err != nil {
					t.Fatal(err)
				}
				sv, err := p.Volume("s")
				if err != nil {
					t.Fatal(err)
				}
				if err := sv.ReadAt([][]byte{buf}, 0); err != nil {
					t.Fatal(err)
				}
				if want := Stamp(0); o.Stamped(0) && !bytes.Equal(buf, want) {
					t.Fatalf("snapshot block 0 reads %x after the origin's overwrite, want %x", buf, want)
				}
			}
			if err := p.Check(nil); err != nil {
				t.Fatalf("check after writes and a snapshot: %v", err)
			}
			// The state survives a reopen.
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
			p = quietOpen(t, dir)
			if err := p.Check(nil); err != nil {
				t.Fatalf("check after reopening: %v", err)
			}
		})
	}
}

func TestPopulateThinRefuses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	if _, err := PopulateThin(dir, PopulateOptions{Volume: "v", Mapped: 10, VolumeBlocks: 5}); err == nil {
		t.Fatal("a volume smaller than its mapped blocks was accepted")
	}
	if _, err := PopulateThin(dir, PopulateOptions{Volume: "v", Mapped: 10}); err != nil {
		t.Fatal(err)
	}
	// An existing pool is not overwritten.
	if _, err := PopulateThin(dir, PopulateOptions{Volume: "v", Mapped: 10}); err == nil {
		t.Fatal("populating over an existing pool succeeded")
	}
}

// TestMeasureSnapshot runs the whole measurement on small volumes with
// deletes and checks (timings are not asserted: the machine is shared).
func TestMeasureSnapshot(t *testing.T) {
	for _, mapped := range []uint64{1, 3000} {
		dir := SnapshotDir(t.TempDir(), mapped)
		r, err := MeasureSnapshot(mapped, SnapshotOptions{Dir: dir, BlockSize: 4096, Samples: 3, Check: true, Delete: true})
		if err != nil {
			t.Fatalf("%d mapped: %v", mapped, err)
		}
		if len(r.Snapshots) != 3 || len(r.Clones) != 3 || len(r.Baseline) != 3 || len(r.Deletes) != 6 ||
			r.Check == 0 || r.DeleteCheck == 0 || r.StampsRead == 0 || r.Populate.Entries != mapped {
			t.Fatalf("%d mapped: result %+v", mapped, r)
		}
	}
}

// BenchmarkCreateSnapshot times CreateSnapshot on a volume with 1k and
// 100k mapped blocks (populated once, outside the timer). Each iteration
// is one more read-only snapshot of the same volume; the first freezes the
// layer holding every mapped block. `make bench` (thinblk-bench --targets
// snapshot) reports 10M too.
func BenchmarkCreateSnapshot(b *testing.B) {
	for _, mapped := range []uint64{1000, 100_000} {
		b.Run(fmt.Sprintf("mapped=%d", mapped), func(b *testing.B) {
			dir := filepath.Join(b.TempDir(), "pool")
			if _, err := PopulateThin(dir, PopulateOptions{Volume: "v", Mapped: mapped}); err != nil {
				b.Fatal(err)
			}
			p, err := thin.Open(dir, thin.OpenOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			i := 0
			for b.Loop() {
				if err := p.CreateSnapshot("v", fmt.Sprintf("s%d", i), false); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}
