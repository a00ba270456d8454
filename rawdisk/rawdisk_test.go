package rawdisk

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func newImage(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return path
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestVectoredRoundTrip(t *testing.T) {
	path := newImage(t, 1<<20+300) // a tail that is not a whole sector
	d, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 1<<20 {
		t.Fatalf("size %d, want %d (rounded down to sectors)", d.Size(), 1<<20)
	}
	a, b, c := pattern(512, 1), pattern(4096, 2), pattern(1536, 3)
	if err := d.WriteAt([][]byte{a, {}, b, c}, 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(a)+len(b)+len(c))
	if err := d.ReadAt([][]byte{got[:1000], got[1000:]}, 8192); err != nil {
		t.Fatal(err)
	}
	want := append(append(append([]byte{}, a...), b...), c...)
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs from what was written")
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	if !bytes.Equal(raw[8192:8192+len(want)], want) {
		t.Fatal("file content differs from what was written")
	}
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	const size = 4 << 20
	path := newImage(t, size)
	d, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	data := pattern(size, 9)
	if err := d.WriteAt([][]byte{data}, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	full := allocatedBytes(t, path)

	// Discard releases space and reads as zeros.
	if err := d.Discard(1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	afterDiscard := allocatedBytes(t, path)
	if afterDiscard > full-1<<20 {
		t.Fatalf("discard of 1 MiB freed %d bytes", full-afterDiscard)
	}
	// Write-zeroes without unmap keeps (or re-takes) the allocation.
	if err := d.WriteZeroes(1<<20, 512<<10, false); err != nil {
		t.Fatal(err)
	}
	if got := allocatedBytes(t, path); got < afterDiscard+512<<10 {
		t.Fatalf("write-zeroes without unmap left %d bytes allocated, want at least %d", got, afterDiscard+512<<10)
	}
	// Write-zeroes with unmap at an unaligned range zeroes exactly it.
	if err := d.WriteZeroes(3<<20+512, 1024, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := d.ReadAt([][]byte{got}, 0); err != nil {
		t.Fatal(err)
	}
	want := append([]byte{}, data...)
	clear(want[1<<20 : 2<<20])
	clear(want[3<<20+512 : 3<<20+1536])
	if !bytes.Equal(got, want) {
		t.Fatal("content after discard/write-zeroes differs from the model")
	}
}

func TestReadOnly(t *testing.T) {
	path := newImage(t, 1<<20)
	d, err := Open(path, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.WriteAt([][]byte{make([]byte, 512)}, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("write on read-only disk: %v", err)
	}
	if err := d.WriteZeroes(0, 512, true); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("write-zeroes on read-only disk: %v", err)
	}
	if err := d.ReadAt([][]byte{make([]byte, 512)}, 0); err != nil {
		t.Fatal(err)
	}
}

func TestBadImages(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing"), Options{}); err == nil {
		t.Fatal("opened a missing file")
	}
	if _, err := Open(dir, Options{}); err == nil {
		t.Fatal("opened a directory")
	}
	if _, err := Open(newImage(t, 100), Options{}); err == nil {
		t.Fatal("opened an image smaller than a sector")
	}
}

func TestReadAllocFree(t *testing.T) {
	d, err := Open(newImage(t, 1<<20), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	bufs := [][]byte{make([]byte, 4096), make([]byte, 4096)}
	if n := testing.AllocsPerRun(100, func() { d.ReadAt(bufs, 4096) }); n != 0 {
		t.Fatalf("ReadAt allocates %v times per call", n)
	}
}

func BenchmarkRead4K(b *testing.B) {
	path := filepath.Join(b.TempDir(), "disk.img")
	os.WriteFile(path, make([]byte, 64<<20), 0o600)
	d, err := Open(path, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	buf := [][]byte{make([]byte, 4096)}
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		if err := d.ReadAt(buf, int64(i%16384)*4096); err != nil {
			b.Fatal(err)
		}
	}
}
