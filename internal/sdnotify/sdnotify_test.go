package sdnotify

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// listen opens a datagram socket the way a service manager does and returns a function that
// reads the next datagram.
func listen(t *testing.T, name string) func() string {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return func() string {
		t.Helper()
		buf := make([]byte, 4096)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:n])
	}
}

func TestNotifyPathAndAbstract(t *testing.T) {
	for _, name := range []string{
		filepath.Join(t.TempDir(), "notify"),
		fmt.Sprintf("@thinblk-sdnotify-test-%d", os.Getpid()),
	} {
		recv := listen(t, name)
		t.Setenv("NOTIFY_SOCKET", name)
		n, err := FromEnv()
		if err != nil || n == nil {
			t.Fatalf("FromEnv with NOTIFY_SOCKET=%s: %v, %v", name, n, err)
		}
		if err := n.Notify(Ready, Status("serving 2 volumes")); err != nil {
			t.Fatal(err)
		}
		if got, want := recv(), "READY=1\nSTATUS=serving 2 volumes\n"; got != want {
			t.Errorf("%s got %q, want %q", name, got, want)
		}
		if err := n.Notify(Stopping); err != nil {
			t.Fatal(err)
		}
		if got := recv(); got != "STOPPING=1\n" {
			t.Errorf("%s got %q, want STOPPING=1", name, got)
		}
	}
}

func TestNotifyUnsetIsNoop(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n, err := FromEnv()
	if err != nil || n != nil {
		t.Fatalf("FromEnv without NOTIFY_SOCKET: %v, %v; want nil, nil", n, err)
	}
	if err := n.Notify(Ready); err != nil {
		t.Errorf("nil Notifier: %v", err)
	}
}

func TestNotifyRejects(t *testing.T) {
	if _, err := New("relative/path"); err == nil {
		t.Error("New accepted a relative path")
	}
	if _, err := New(""); err == nil {
		t.Error("New accepted an empty path")
	}
	n, err := New(filepath.Join(t.TempDir(), "nobody-listens"))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Notify(Ready); err == nil {
		t.Error("Notify to a socket nobody listens on succeeded")
	}
	if err := n.Notify("READY=1\nSTATUS=x"); err == nil {
		t.Error("Notify accepted a line with a newline")
	}
	if err := n.Notify("READY"); err == nil {
		t.Error("Notify accepted a line without =")
	}
	if got := Status("a\nb"); got != "STATUS=a b" {
		t.Errorf("Status kept a newline: %q", got)
	}
}
