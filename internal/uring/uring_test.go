package uring

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestWriteReadNop drives each operation once through a real ring on a
// real file and checks results, user data and ring accounting.
func TestWriteReadNop(t *testing.T) {
	r, err := New(4)
	if err != nil {
		t.Fatalf("io_uring works on the machines thinblk runs on (PLATFORM.md): %v", err)
	}
	defer r.Close()
	if r.Free() != r.SQEntries() || r.SQEntries() < 4 || r.CQEntries() < r.SQEntries() {
		t.Fatalf("fresh ring: free %d of %d, cq %d", r.Free(), r.SQEntries(), r.CQEntries())
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	a, b := bytes.Repeat([]byte{1}, 512), bytes.Repeat([]byte{2}, 1024)
	iov := []unix.Iovec{{Base: &a[0], Len: uint64(len(a))}, {Base: &b[0], Len: uint64(len(b))}}
	do := func(op uint8, fd int, iov []unix.Iovec, off uint64, flags uint32, ud uint64) int32 {
		t.Helper()
		var addr uintptr
		if len(iov) > 0 {
			addr = uintptr(unsafe.Pointer(&iov[0]))
		}
		if err := r.Prep(op, fd, addr, uint32(len(iov)), off, flags, ud); err != nil {
			t.Fatal(err)
		}
		if r.Free() != r.SQEntries()-1 {
			t.Fatalf("free %d after one prep", r.Free())
		}
		if err := r.Submit(); err != nil {
			t.Fatal(err)
		}
		if err := r.WaitCQE(); err != nil {
			t.Fatal(err)
		}
		c := r.Reap(make([]CQE, 0, 4))
		if len(c) != 1 || c[0].UserData != ud {
			t.Fatalf("op %d: completions %+v, want one with user data %d", op, c, ud)
		}
		return c[0].Res
	}
	if n := do(OpWritev, fd, iov, 4096, 0, 7); n != 1536 {
		t.Fatalf("writev: %d", n)
	}
	if n := do(OpFsync, fd, nil, 0, FsyncDatasync, 8); n != 0 {
		t.Fatalf("fsync: %d", n)
	}
	got := make([]byte, 2048)
	giov := []unix.Iovec{{Base: &got[0], Len: uint64(len(got))}}
	if n := do(OpReadv, fd, giov, 4096, 0, 1<<40); n != 1536 {
		t.Fatalf("readv: %d (short at end of file)", n)
	}
	if !bytes.Equal(got[:1536], append(a, b...)) {
		t.Fatal("read back differs")
	}
	if n := do(OpNop, -1, nil, 0, 0, 9); n != 0 {
		t.Fatalf("nop: %d", n)
	}
	if n := do(OpReadv, -1, giov, 0, 0, 10); n != -int32(unix.EBADF) {
		t.Fatalf("readv on a bad descriptor: %d, want -EBADF", n)
	}
}

// TestRingFull checks that Prep refuses once every slot is taken and that
// Unsubmitted lists the entries not yet handed to the kernel.
func TestRingFull(t *testing.T) {
	r, err := New(2)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	n := r.SQEntries()
	for i := range n {
		if err := r.Prep(OpNop, -1, 0, 0, 0, 0, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Prep(OpNop, -1, 0, 0, 0, 0, 99); err != ErrRingFull {
		t.Fatalf("prep on a full ring: %v", err)
	}
	var seen []uint64
	r.Unsubmitted(func(ud uint64) { seen = append(seen, ud) })
	if uint32(len(seen)) != n || seen[0] != 0 {
		t.Fatalf("unsubmitted %v, want %d entries from 0", seen, n)
	}
	if err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if r.Free() != n {
		t.Fatalf("free %d after submit", r.Free())
	}
}
