package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/unixsock"
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// SocketPath is the unix socket the front-end (QEMU) connects to.
	SocketPath string
	// SocketMode is the socket file's permission bits; 0 means 0600.
	SocketMode os.FileMode
	// Logger receives one line per event that matters; nil discards.
	Logger *slog.Logger
	// Name identifies the device in log lines.
	Name string
	// NoInflight withholds INFLIGHT_SHMFD: requests in flight when the
	// process dies are then lost to the guest (for comparison and tests).
	NoInflight bool
}

// Server serves one Device over a unix socket to one vhost-user front-end,
// or two during a live migration on one host (the source's QEMU and the
// destination's): each has its own session and memory table, and only one
// runs the device's rings at a time. A third concurrent connection is
// refused; after a front-end disconnects the next one is accepted.
type Server struct {
	opts ServerOptions
	dev  Device
	log  *slog.Logger
	ln   *net.UnixListener
	sock os.FileInfo // the socket file we created, to remove only ours

	share *deviceShare

	mu      sync.Mutex
	active  map[*net.UnixConn]*connState // the front-end connections being served
	closed  bool
	serving bool
	done    chan struct{} // closed by Close
	// handing is the hand-over in progress; handedOff: one committed, so
	// the socket file belongs to the other process now.
	handing   *handOff
	handedOff bool

	conns     sync.WaitGroup
	accepted  atomic.Uint64 // front-end connections served so far
	closeOnce sync.Once
	closeErr  error
}

// Listen creates the socket. A socket file left behind by a dead process
// is removed; a socket something still listens on is not.
func Listen(opts ServerOptions, dev Device) (*Server, error) {
	s, err := newServer(opts, dev)
	if err != nil {
		return nil, err
	}
	ln, fi, err := unixsock.Listen(s.opts.SocketPath, s.opts.SocketMode)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: %w", err)
	}
	s.ln, s.sock = ln, fi
	s.log.Info("listening", "mode", fmt.Sprintf("%#o", s.opts.SocketMode.Perm()))
	return s, nil
}

// newServer checks the options and makes a Server without a listener.
func newServer(opts ServerOptions, dev Device) (*Server, error) {
	if opts.SocketPath == "" {
		return nil, errors.New("vhost-user: no socket path")
	}
	if dev == nil {
		return nil, errors.New("vhost-user: no device")
	}
	if opts.SocketMode == 0 {
		opts.SocketMode = 0o600
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("socket", opts.SocketPath)
	if opts.Name != "" {
		log = log.With("device", opts.Name)
	}
	return &Server{opts: opts, dev: dev, log: log, done: make(chan struct{}),
		share: newDeviceShare(dev), active: map[*net.UnixConn]*connState{}}, nil
}

// Serve accepts front-end connections until ctx is done or Close is
// called, then returns nil after the connection has been torn down.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.serving || s.closed {
		s.mu.Unlock()
		return errors.New("vhost-user: server already serving or closed")
	}
	s.serving = true
	s.mu.Unlock()

	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()

	for {
		uc, err := s.ln.AcceptUnix()
		if err != nil {
			if handing, end := s.acceptParked(); handing {
				if end {
					return nil
				}
				continue
			}
			select {
			case <-s.done:
				s.Close() // waits for a Close in progress to finish
				return nil
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				s.log.Warn("accept failed, retrying", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			s.Close()
			return fmt.Errorf("vhost-user: accept on %s: %w", s.opts.SocketPath, err)
		}
		s.mu.Lock()
		switch {
		case s.closed:
			s.mu.Unlock()
			uc.Close()
			s.Close()
			return nil
		case len(s.active) >= maxFrontEnds:
			s.mu.Unlock()
			s.log.Warn("refused a third front-end connection: two are already being served (a migration's source and destination)", unixsock.PeerAttrs(uc)...)
			uc.Close()
			continue
		}
		cs := &connState{conn: NewConn(uc), paused: make(chan pausedSession, 1), verdict: make(chan bool, 1)}
		s.active[uc] = cs
		s.accepted.Add(1)
		second := len(s.active) == 2
		s.conns.Add(1)
		s.mu.Unlock()
		go s.serveConn(cs, second)
	}
}

// peerHungUp reports whether the front-end closed its end of uc (or uc is
// closed), without reading from it: the session's own goroutine may be
// reading at the same time.
func peerHungUp(uc *net.UnixConn) bool {
	rc, err := uc.SyscallConn()
	if err != nil {
		return true
	}
	gone := false
	if err := rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(pfd, 0); err == nil && n > 0 {
			gone = pfd[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) != 0
		}
	}); err != nil {
		return true
	}
	return gone
}

// serveConn runs the protocol on one connection, then releases everything
// the connection held so that the next front-end starts from scratch.
func (s *Server) serveConn(cs *connState, second bool) {
	uc := cs.conn.uc
	log := s.log.With(unixsock.PeerAttrs(uc)...)
	if second {
		log.Info("front-end connected while another is served (a live migration's other end)")
	} else {
		log.Info("front-end connected")
	}
	s.runSession(cs, s.newConnSession(log, cs.conn, uc), log)
}

// newConnSession makes the session of a front-end connection.
func (s *Server) newConnSession(log *slog.Logger, conn *Conn, uc *net.UnixConn) *session {
	sess := newSession(log, s.dev, conn)
	sess.share = s.share
	sess.peerGone = func() bool { return peerHungUp(uc) }
	if s.opts.NoInflight {
		sess.offeredProto &^= 1 << ProtoInflightShmfd
	}
	return sess
}

// runSession reads and dispatches the connection's messages until it
// ends or is handed over.
func (s *Server) runSession(cs *connState, sess *session, log *slog.Logger) {
	defer s.conns.Done()
	conn, uc := cs.conn, cs.conn.uc
	defer func() {
		if p := recover(); p != nil {
			// A bug must not take down every other disk of the process.
			log.Error("panic while serving front-end; connection closed", "panic", p, "stack", string(debug.Stack()))
		}
		sess.close()
		// Free the slot before the peer sees the close, so that a
		// front-end reconnecting at once is not refused.
		s.mu.Lock()
		delete(s.active, uc)
		s.mu.Unlock()
		conn.Close()
	}()
	for {
		// Wait for a message without reading it, so that a hand-over can
		// stop the session between messages (its read deadline ends the
		// wait).
		werr := waitReadable(uc)
		cs.mu.Lock()
		if cs.pausing {
			cs.mu.Unlock()
			if s.pauseForHandOff(cs, sess) {
				log.Info("session handed over to another process")
				return
			}
			continue
		}
		var m Message
		err := werr
		if err == nil {
			m, err = conn.Read()
		}
		cs.mu.Unlock()
		if err != nil {
			switch {
			case isClosed(err):
				log.Info("front-end disconnected")
			default:
				log.Warn("protocol error; closing connection", "err", err)
			}
			return
		}
		if log.Enabled(context.Background(), slog.LevelDebug) {
			log.Debug("request", "request", m.Header.Request.String(), "flags", m.Header.Flags,
				"size", len(m.Payload), "fds", len(m.Files))
		}
		if err := sess.dispatch(&m); err != nil {
			if isClosed(err) || errors.Is(err, syscall.EPIPE) {
				log.Info("front-end disconnected", "err", err)
			} else {
				log.Warn("protocol error; closing connection", "request", m.Header.Request.String(), "err", err)
			}
			return
		}
	}
}

// waitReadable waits until uc has something to read (or its peer hung
// up) without reading; a read deadline ends the wait with an error.
func waitReadable(uc *net.UnixConn) error {
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		n, err := unix.Poll(pfd, 0)
		return err == nil && n > 0 || err != nil && err != unix.EINTR
	})
}

// Close stops accepting, disconnects the front-end (stopping its rings and
// unmapping its memory) and removes the socket file.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		close(s.done)
		var active []*net.UnixConn
		for uc := range s.active {
			active = append(active, uc)
		}
		handedOff := s.handedOff
		s.mu.Unlock()
		if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			s.closeErr = fmt.Errorf("vhost-user: close listener: %w", err)
		}
		for _, uc := range active {
			uc.Close()
		}
		s.conns.Wait()
		// Remove the socket only if it is still the one we created (and
		// not handed over: the other process serves it now).
		if s.sock != nil && !handedOff {
			if err := unixsock.Remove(s.opts.SocketPath, s.sock); err != nil && s.closeErr == nil {
				s.closeErr = fmt.Errorf("vhost-user: %w", err)
			}
		}
		s.log.Info("closed")
	})
	return s.closeErr
}

// Addr returns the socket path.
func (s *Server) Addr() string { return s.opts.SocketPath }

var _ io.Closer = (*Server)(nil)

// Connections is the number of front-end connections served so far (the
// one now included); after the first, each is a reconnection.
func (s *Server) Connections() uint64 { return s.accepted.Load() }

// Connected reports whether a front-end is connected now (during a live
// migration on one host, two are).
func (s *Server) Connected() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.active) > 0
}
