package qmp

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/thinblk/thinblk/internal/unixsock"
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
	ln, fi, err := unixsock.Listen(path, mode)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
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
