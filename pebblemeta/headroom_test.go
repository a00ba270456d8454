package pebblemeta

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// fillFS writes a file until the file system holding dir is full.
func fillFS(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0xee}, 64<<10)
	for _, n := range []int{64 << 10, 4096} {
		for {
			if _, err := f.Write(buf[:n]); err != nil {
				if !errors.Is(err, unix.ENOSPC) {
					t.Fatal(err)
				}
				break
			}
		}
	}
}

// commitMany commits batches of map entries and bitmap chunks, as a pool
// writing provisioned blocks does, enough to grow Pebble's log past its
// preallocation and flush.
func commitMany(s *Store, rounds int) error {
	chunk := bytes.Repeat([]byte{0x5a}, 512)
	for r := range rounds {
		b := s.NewBatch()
		for i := range 64 {
			b.SetEntry(1, uint64(r*64+i), Entry{Flags: FlagMapped | FlagProvisioned, PBlock: uint64(r*64 + i)})
		}
		b.SetBitmapChunk(uint64(r%64), chunk)
		b.SetSpareChunk(uint64(r%64), chunk)
		if err := b.Commit(true); err != nil {
			return fmt.Errorf("commit %d: %w", r, err)
		}
	}
	return nil
}

// TestHeadroomOnFullFS: on a real file system that another file filled,
// a store without headroom fails its commits (the log cannot grow); with
// headroom it gives up pieces of it to Pebble and goes on committing, and
// restores it once the file system has space again.
func TestHeadroomOnFullFS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	for _, headroom := range []int64{0, 8 << 20} {
		t.Run(fmt.Sprint("headroom=", headroom), func(t *testing.T) {
			mnt := t.TempDir()
			if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, fmt.Sprintf("size=%d", 32<<20)); err != nil {
				t.Fatal(err)
			}
			defer unix.Unmount(mnt, unix.MNT_DETACH)
			dir := filepath.Join(mnt, "meta")
			s, err := Create(dir, PoolRecord{BlockSize: 4096, SizeBlocks: 1 << 20, NextLayer: 2}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			s.Close()
			used := 0
			s, err = Open(dir, Options{Headroom: headroom, OnHeadroomUsed: func() { used++ }})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if err := s.RestoreHeadroom(); err != nil {
				t.Fatal(err)
			}
			if have, want := s.Headroom(); have != headroom || want != headroom || s.HeadroomShort() {
				t.Fatalf("headroom %d of %d (short %v), want %d", have, want, s.HeadroomShort(), headroom)
			}
			filler := filepath.Join(mnt, "other-tenant")
			fillFS(t, filler)
			err = commitMany(s, 1000)
			if headroom == 0 {
				if err == nil {
					t.Fatal("commits on a full file system without headroom succeeded: the test does not exercise Pebble's need for space")
				}
				t.Logf("without headroom: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("commits on a full file system with headroom: %v", err)
			}
			have, _ := s.Headroom()
			if used == 0 || !s.HeadroomShort() || have >= headroom {
				t.Fatalf("headroom after the full file system: %d of %d, used %d times", have, headroom, used)
			}
			t.Logf("headroom given up to Pebble: %d of %d bytes (%d times)", headroom-have, headroom, used)
			if err := s.RestoreHeadroom(); err == nil {
				t.Fatal("headroom restored on a full file system")
			}
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
			if err := s.RestoreHeadroom(); err != nil {
				t.Fatal(err)
			}
			if have, _ := s.Headroom(); have != headroom || s.HeadroomShort() {
				t.Fatalf("headroom after restoring: %d of %d", have, headroom)
			}
		})
	}
}
