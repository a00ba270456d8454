// Package sdnotify tells a service manager (systemd's Type=notify) about a daemon's state: one
// datagram of "KEY=VALUE" lines to the unix socket named by $NOTIFY_SOCKET, the protocol of
// sd_notify(3). No library: the protocol is a single write.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
)

// Messages a daemon sends (sd_notify(3)).
const (
	Ready    = "READY=1"    // startup finished: every socket accepts connections
	Stopping = "STOPPING=1" // shutdown began
)

// Status is a one-line, human-readable state ("systemctl status" shows it).
func Status(s string) string { return "STATUS=" + strings.ReplaceAll(s, "\n", " ") }

// Notifier sends to one notification socket. The zero value (and a nil one) does nothing: the
// daemon was not started by a service manager that wants notifications.
type Notifier struct {
	addr *net.UnixAddr
}

// FromEnv returns a Notifier for $NOTIFY_SOCKET, or nil when it is unset. An address starting
// with '@' is in the abstract namespace, as sd_notify(3) says.
func FromEnv() (*Notifier, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil, nil
	}
	return New(path)
}

// New returns a Notifier for the socket at path ('@' first: abstract).
func New(path string) (*Notifier, error) {
	if !strings.HasPrefix(path, "/") && !strings.HasPrefix(path, "@") {
		return nil, fmt.Errorf("NOTIFY_SOCKET %q: want an absolute path or an abstract name (@...)", path)
	}
	// Go's net package maps a leading '@' to the abstract namespace itself.
	return &Notifier{addr: &net.UnixAddr{Name: path, Net: "unixgram"}}, nil
}

// Notify sends the given lines in one datagram. A nil Notifier does nothing.
func (n *Notifier) Notify(lines ...string) error {
	if n == nil || n.addr == nil || len(lines) == 0 {
		return nil
	}
	for _, l := range lines {
		if strings.ContainsRune(l, '\n') || !strings.Contains(l, "=") {
			return fmt.Errorf("sd_notify: %q is not one KEY=VALUE line", l)
		}
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
	}
	defer c.Close()
	msg := strings.Join(lines, "\n") + "\n"
	w, err := c.Write([]byte(msg))
	if err == nil && w != len(msg) {
		err = errors.New("short write")
	}
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
	}
	return nil
}
