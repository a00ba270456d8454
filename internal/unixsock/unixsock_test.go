package unixsock

import (
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")

	ln, fi, err := Listen(path, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, want 0640", st.Mode().Perm())
	}
	// Live: refused, and the file stays.
	if _, _, err := Listen(path, 0o600); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Listen on a live socket: %v", err)
	}
	ln.Close()
	// Stale (nobody listens): replaced.
	ln2, fi2, err := Listen(path, 0o600)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer ln2.Close()
	// Remove with the old identity leaves the new socket alone.
	if err := Remove(path, fi); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatal("Remove deleted a socket that is not the caller's")
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("dial the new socket: %v", err)
	}
	c.Close()
	if err := Remove(path, fi2); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatal("Remove left the caller's socket")
	}
	// Not a socket: refused and untouched.
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("x"), 0o600)
	if _, _, err := Listen(plain, 0o600); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(plain); string(b) != "x" {
		t.Fatal("regular file changed")
	}
	// No temporary names left behind.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Errorf("leftover %s", e.Name())
		}
	}
}

func TestPeerAttrs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.sock")
	ln, fi, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer Remove(path, fi)
	defer ln.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	want := []any{"peer_pid", int32(os.Getpid()), "peer_uid", uint32(os.Getuid())}
	if got := PeerAttrs(sc); !reflect.DeepEqual(got, want) {
		t.Errorf("PeerAttrs of our own connection = %v, want %v", got, want)
	}
	sc.Close()
	if got := PeerAttrs(sc); got != nil {
		t.Errorf("PeerAttrs of a closed connection = %v, want none", got)
	}
}
