package pebblemeta

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
)

func TestStoreOnDisk(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "meta")
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrNoStore) {
		t.Fatalf("Open of nothing: %v", err)
	}
	pool := PoolRecord{BlockSize: 4096, SizeBlocks: 10, NextLayer: 1}
	s, err := Create(dir, pool, Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	b.SetVolume(VolumeRecord{Name: "a", Layer: 1, Size: 4096, Mapped: 1})
	b.SetVolume(VolumeRecord{Name: "b", Layer: 2, Size: 8192})
	b.SetEntry(1, 0, Entry{Flags: FlagMapped, PBlock: 3})
	b.SetEntry(1, 5, Entry{Flags: FlagProvisioned})
	b.SetEntry(2, 0, Entry{Flags: FlagMapped, PBlock: 4})
	b.SetBitmapChunk(0, []byte{0x18})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(dir, pool, Options{}); !errors.Is(err, ErrExists) {
		t.Fatalf("Create over a store: %v", err)
	}
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	vols, err := s.Volumes()
	if err != nil || len(vols) != 2 || vols[0].Name != "a" || vols[0].Mapped != 1 || vols[1].Layer != 2 {
		t.Fatalf("Volumes = %+v, %v", vols, err)
	}
	e, ok, err := s.MapEntry(1, 0)
	if err != nil || !ok || e.PBlock != 3 {
		t.Fatalf("MapEntry = %+v %v %v", e, ok, err)
	}
	if _, ok, _ := s.MapEntry(1, 1); ok {
		t.Fatal("absent entry found")
	}
	var seen []uint64
	if err := s.LayerMap(1, 0, func(vb uint64, e Entry) error { seen = append(seen, vb); return nil }); err != nil || len(seen) != 2 || seen[1] != 5 {
		t.Fatalf("LayerMap = %v %v", seen, err)
	}
	snap := s.Snapshot()
	defer snap.Close()
	b = s.NewBatch()
	b.DeleteLayer(1)
	b.DeleteVolume("a")
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	n := 0
	if err := s.AllMap(func(l, vb uint64, e Entry) error { n++; return nil }); err != nil || n != 1 {
		t.Fatalf("after DeleteLayer %d entries left, %v", n, err)
	}
	n = 0
	if err := snap.AllMap(func(l, vb uint64, e Entry) error { n++; return nil }); err != nil || n != 3 {
		t.Fatalf("snapshot sees %d entries, want the 3 from before: %v", n, err)
	}
}

func TestNewerFormatRefused(t *testing.T) {
	fs := vfs.NewMem()
	s, err := Create("meta", PoolRecord{BlockSize: 4096}, Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetFormatForTest(FormatVersion + 1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open("meta", Options{FS: fs}); !errors.Is(err, ErrNewerFormat) {
		t.Fatalf("Open newer format: %v", err)
	}
}

// TestCrashKeepsSyncedBatches checks the property thin relies on: a batch
// committed with sync survives a crash, and an unsynced one is either
// entirely there or entirely absent.
func TestCrashKeepsSyncedBatches(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20 {
		fs := vfs.NewCrashableMem()
		s, err := Create("meta", PoolRecord{BlockSize: 4096}, Options{FS: fs})
		if err != nil {
			t.Fatal(err)
		}
		b := s.NewBatch()
		b.SetEntry(1, 1, Entry{Flags: FlagMapped, PBlock: 1})
		if err := b.Commit(true); err != nil {
			t.Fatal(err)
		}
		b = s.NewBatch()
		b.SetEntry(1, 2, Entry{Flags: FlagMapped, PBlock: 2})
		b.SetEntry(1, 3, Entry{Flags: FlagMapped, PBlock: 3})
		if err := b.Commit(false); err != nil {
			t.Fatal(err)
		}
		crashed := fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 50, RNG: rand.New(rand.NewPCG(uint64(i), rng.Uint64()))})
		s.Close()
		s2, err := Open("meta", Options{FS: crashed})
		if err != nil {
			t.Fatal(err)
		}
		_, ok1, _ := s2.MapEntry(1, 1)
		_, ok2, _ := s2.MapEntry(1, 2)
		_, ok3, _ := s2.MapEntry(1, 3)
		s2.Close()
		if !ok1 || ok2 != ok3 {
			t.Fatalf("after crash: synced=%v unsynced pair=%v,%v", ok1, ok2, ok3)
		}
	}
}

// TestMapRange: only the layer's entries in [first, end) come back, in
// order, deleted ones not at all.
func TestMapRange(t *testing.T) {
	s, err := Create(filepath.Join(t.TempDir(), "meta"), PoolRecord{BlockSize: 4096, SizeBlocks: 100, NextLayer: 1}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b := s.NewBatch()
	for _, vb := range []uint64{0, 5, 10, 63, 64} {
		b.SetEntry(1, vb, Entry{Flags: FlagMapped, PBlock: vb})
		b.SetEntry(2, vb, Entry{Flags: FlagMapped, PBlock: vb})
	}
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	b = s.NewBatch()
	b.SetEntry(1, 10, Entry{})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	var seen []uint64
	if err := s.MapRange(1, 5, 64, func(vb uint64, e Entry) error {
		if e.PBlock != vb {
			t.Errorf("entry %d points at %d", vb, e.PBlock)
		}
		seen = append(seen, vb)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 2 || seen[0] != 5 || seen[1] != 63 {
		t.Fatalf("MapRange(1, 5, 64) = %v, want [5 63]", seen)
	}
	if err := s.MapRange(1, 7, 7, func(uint64, Entry) error { t.Error("empty range called back"); return nil }); err != nil {
		t.Fatal(err)
	}
}
