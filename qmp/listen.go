package qmp

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ListenUnix creates a unix socket at path with permission bits mode (0
// means 0600) for Serve. A socket file left behind by a dead process is
// replaced; one that something still listens on is an error. Close removes
// the socket file if it is still the one created here.
func (s *Server) ListenUnix(path string, mode os.FileMode) (*net.UnixListener, error) {
	if path == "" {
		return nil, errors.New("qmp: no socket path")
	}
	if mode == 0 {
		mode = 0o600
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil, errors.New("qmp: server closed")
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	ln, err := listenUnix(path, mode.Perm())
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("qmp: stat socket %s: %w", path, err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		os.Remove(path)
		return nil, errors.New("qmp: server closed")
	}
	s.sockets = append(s.sockets, socketFile{path: path, fi: fi})
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	s.log.Info("QMP listening", "socket", path, "mode", fmt.Sprintf("%#o", mode.Perm()))
	return ln, nil
}

// socketFile is a socket the server created and removes on Close.
type socketFile struct {
	path string
	fi   os.FileInfo
}

// removeStaleSocket removes path if it is a socket that nobody listens on.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("qmp: stat %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("qmp: %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("qmp: socket %s is in use: another process listens on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("qmp: probe existing socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("qmp: remove stale socket %s: %w", path, err)
	}
	return nil
}

var tmpSocketSeq atomic.Uint64

// listenUnix binds under a temporary name, sets the mode, then links the
// socket into place: nobody can connect while it still has the umask's
// permissions, and an existing path is never replaced. Where a temporary
// name cannot work (path too long, no hard links) it binds in place.
func listenUnix(path string, mode os.FileMode) (*net.UnixListener, error) {
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".qmp%d.%d.tmp", os.Getpid(), tmpSocketSeq.Add(1)))
	if len(tmp) < len(unix.RawSockaddrUnix{}.Path) {
		os.Remove(tmp) // left over by an earlier process with this pid
		ln, err := bindChmod(tmp, mode)
		if err != nil {
			return nil, err
		}
		err = os.Link(tmp, path)
		os.Remove(tmp)
		if err == nil {
			return ln, nil
		}
		ln.Close()
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("qmp: put socket in place: %w", err)
		}
	}
	return bindChmod(path, mode)
}

func bindChmod(path string, mode os.FileMode) (*net.UnixListener, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("qmp: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // Close removes it, after checking it is ours
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("qmp: chmod socket %s: %w", path, err)
	}
	return ln, nil
}
