package unixsock

import (
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFilesTravel: a file sent with WriteWithFiles arrives through
// ParseRights as the same open file (what one end writes, the other
// reads), close-on-exec, with the bytes it rode on.
func TestFilesTravel(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c.(*net.UnixConn)
	}
	sent, err := os.Create(filepath.Join(t.TempDir(), "sent"))
	if err != nil {
		t.Fatal(err)
	}
	defer sent.Close()
	if err := WriteWithFiles(conns[0], []byte("hello"), []*os.File{sent, sent}); err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 16), make([]byte, unix.CmsgSpace(8*4))
	n, oobn, _, _, err := conns[1].ReadMsgUnix(buf, oob)
	if err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	got, err := ParseRights(oob[:oobn], "got")
	if err != nil || len(got) != 2 {
		t.Fatalf("ParseRights: %d files, %v", len(got), err)
	}
	defer CloseFiles(got)
	if flags, err := unix.FcntlInt(got[0].Fd(), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("received descriptor flags %#x, %v: want close-on-exec", flags, err)
	}
	if _, err := got[1].WriteAt([]byte("via the copy"), 0); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(sent.Name()); err != nil || string(b) != "via the copy" {
		t.Fatalf("the sent file holds %q, %v", b, err)
	}
	if files, err := ParseRights(nil, "none"); files != nil || err != nil {
		t.Errorf("ParseRights of no control message = %v, %v", files, err)
	}
	bad := unix.UnixRights(0)
	binary.NativeEndian.PutUint64(bad, 1<<20) // cmsg_len past the buffer
	if _, err := ParseRights(bad, "junk"); err == nil {
		t.Error("ParseRights accepted a control message longer than its buffer")
	}
}
