// Package testenv holds what the tests of several packages share: the thinblk command built
// from this checkout, the QEMU prerequisite of VM tests, and short directories for unix
// sockets. Only tests import it.
package testenv

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

var thinblk struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// Thinblk builds ./cmd/thinblk of this checkout once per test binary (a link costs seconds
// on a loaded machine) and returns its path. Main removes it.
func Thinblk(t testing.TB) string {
	t.Helper()
	thinblk.once.Do(func() {
		if thinblk.dir, thinblk.err = os.MkdirTemp("", "thinblk-test-bin-"); thinblk.err != nil {
			return
		}
		thinblk.bin = filepath.Join(thinblk.dir, "thinblk")
		out, err := exec.Command(goTool(), "build", "-o", thinblk.bin, "github.com/thinblk/thinblk/cmd/thinblk").CombinedOutput()
		if err != nil {
			thinblk.err = fmt.Errorf("go build thinblk: %v\n%s", err, out)
		}
	})
	if thinblk.err != nil {
		t.Fatal(thinblk.err)
	}
	return thinblk.bin
}

// goTool is the go command: from PATH, else the one that built this test.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// Main runs the tests and then removes what Thinblk built; a package that uses Thinblk
// calls it from its TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if thinblk.dir != "" {
		os.RemoveAll(thinblk.dir)
	}
	os.Exit(code)
}

// NeedQEMU fails a test that needs QEMU where it is missing, unless VM tests are opted out
// with THINBLK_SKIP_VM=1.
func NeedQEMU(t testing.TB) {
	t.Helper()
	if os.Getenv("THINBLK_SKIP_VM") == "1" {
		t.Skip("THINBLK_SKIP_VM=1: VM tests opted out")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatalf("qemu-system-x86_64 not found (install qemu-system-x86, or set THINBLK_SKIP_VM=1): %v", err)
	}
}

// ShortDir is a new directory with a short path (unix socket paths are limited to 108
// bytes), removed when the test ends unless it failed.
func ShortDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kept %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return dir
}

// Buffer collects output written from one goroutine (a child's stderr, a logger) while the
// test reads it from another.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// WaitContains waits until the buffer holds s, failing the test after waitTimeout.
func (b *Buffer) WaitContains(t testing.TB, s string) {
	t.Helper()
	if !poll(func() bool { return strings.Contains(b.String(), s) }) {
		t.Fatalf("the output never said %q in %v; it holds:\n%s", s, waitTimeout, b.String())
	}
}

// waitTimeout bounds a wait for something that happens in milliseconds on an idle machine;
// seconds pass on a loaded one.
const waitTimeout = 20 * time.Second

// WaitFor polls cond until it holds, failing the test after waitTimeout.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	if !poll(cond) {
		t.Fatalf("timed out after %v waiting for %s", waitTimeout, what)
	}
}

// WaitDial waits until something accepts connections on the unix socket
// at path (connecting once it does), failing the test after waitTimeout.
func WaitDial(t testing.TB, path string) {
	t.Helper()
	var err error
	if !poll(func() bool {
		var c net.Conn
		if c, err = net.Dial("unix", path); err != nil {
			return false
		}
		c.Close()
		return true
	}) {
		t.Fatalf("%s does not accept connections after %v: %v", path, waitTimeout, err)
	}
}

func poll(cond func() bool) bool {
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}
