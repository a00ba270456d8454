package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/handover"
	"github.com/thinblk/thinblk/internal/unixsock"
	"github.com/thinblk/thinblk/thin"
)

// A pool's serve hands its vhost-user sessions to a new serve process
// (`serve DIR --handover-from DIR/thinblk.handover`) without QEMU seeing a
// disconnect. The old process pauses every session between messages and
// stops its rings (requests waiting for space stay recorded in QEMU's
// in-flight area), closes its control socket and metrics, commits and
// closes the pool (a pool is open in one process at a time), and sends
// the listeners, connections and session state (internal/handover). The
// new one opens the pool, rebuilds each session, starts its rings and
// answers; the old one then exits. If the new one fails, the old one
// opens the pool again and serves on from the same state.

// handoverSocketName is the socket, in the pool directory, a new serve
// process connects to with --handover-from. Not NAME.sock: the volumes'
// sockets may be in the pool directory too.
const handoverSocketName = "thinblk.handover"

// handOverPause bounds the pause of every session (rings stopping: the
// requests in flight finish first).
const handOverPause = 30 * time.Second

// handOverAnswer bounds the wait for the new process to open the pool and
// take the sessions.
const handOverAnswer = 2 * time.Minute

// handOverRequest is a new serve process asking for the sessions.
type handOverRequest struct {
	conn *handover.Conn
	// pidfd refers to the asking process (-1: unknown), so that a process
	// that took the state and then hangs can be killed, never a process
	// that reused its pid.
	pidfd int
}

func (r handOverRequest) close() {
	r.conn.Close()
	if r.pidfd >= 0 {
		unix.Close(r.pidfd)
	}
}

// killPeer ends the asking process and waits until it is gone: after it
// received the state without answering, it may be running the rings; the
// old process must not run them too.
func (r handOverRequest) killPeer(log *slog.Logger) {
	if r.pidfd < 0 {
		log.Error("the new serve process cannot be told apart from others: not killed; if it runs, stop it")
		return
	}
	if err := unix.PidfdSendSignal(r.pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		log.Error("could not kill the new serve process", "err", err)
		return
	}
	// A pidfd becomes readable when its process has exited.
	pfd := []unix.PollFd{{Fd: int32(r.pidfd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(pfd, -1); err != unix.EINTR {
			break
		}
	}
	log.Warn("killed the new serve process: it took the sessions without answering")
}

// listenHandOver listens for a new serve process asking for the sessions.
func listenHandOver(path string, log *slog.Logger) (<-chan handOverRequest, func(), error) {
	ln, fi, err := unixsock.Listen(path, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("hand-over socket: %w", err)
	}
	requests := make(chan handOverRequest)
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		for {
			uc, err := ln.AcceptUnix()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					log.Warn("hand-over socket: accept failed", "err", err)
				}
				return
			}
			log.Info("a new serve process asks for the sessions", unixsock.PeerAttrs(uc)...)
			req := handOverRequest{conn: handover.NewConn(uc), pidfd: peerPidfd(uc)}
			select {
			case requests <- req:
			case <-done:
				req.close()
				return
			}
		}
	}()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		close(done)
		ln.Close()
		<-exited
		unixsock.Remove(path, fi)
	}
	return requests, stop, nil
}

// peerPidfd opens a pidfd of the process at the other end of uc (-1 if
// it cannot).
func peerPidfd(uc *net.UnixConn) int {
	cred, err := unixsock.PeerCred(uc)
	if err != nil {
		return -1
	}
	pidfd, err := unix.PidfdOpen(int(cred.Pid), 0)
	if err != nil {
		return -1
	}
	return pidfd
}

// handOver hands the pool's sessions to the process at the other end of
// to. It returns (nil, err) if nothing was let go of (serve on), (nil,
// nil) once the new process took everything (exit), and the state back
// with the reason if the new process failed after this one closed the
// pool (open it again and resume from the state).
func handOver(ctx context.Context, req handOverRequest, pool *thin.Pool, ex *exports, log *slog.Logger, stopServices func()) (*handover.State, error) {
	defer req.close()
	to := req.conn
	began := time.Now()
	pctx, cancel := context.WithTimeout(ctx, handOverPause)
	hos, err := ex.handOff(pctx)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("pause for a hand-over: %w", err)
	}
	paused := time.Since(began)
	stopServices()
	if err := pool.Flush(); err != nil {
		log.Error("commit before a hand-over", "err", err)
	}
	if err := pool.Close(); err != nil {
		log.Error("pool close before a hand-over", "err", err)
	}
	released := time.Since(began)
	st := &handover.State{}
	for _, ho := range hos {
		st.Servers = append(st.Servers, ho.State)
	}
	err = to.SendState(st)
	if err == nil {
		to.SetDeadline(time.Now().Add(handOverAnswer))
		err = to.ReadAnswer()
	}
	if err != nil {
		if !errors.Is(err, handover.ErrAborted) {
			// The new process may hold the sessions and run the rings.
			req.killPeer(log)
		}
		back := &handover.State{}
		for _, ho := range hos {
			back.Servers = append(back.Servers, ho.Detach())
		}
		return back, err
	}
	for _, ho := range hos {
		ho.Commit()
	}
	log.Info("handed over to the new serve process", "volumes", len(hos),
		"paused_ms", paused.Milliseconds(), "pool_released_ms", released.Milliseconds(),
		"taken_ms", time.Since(began).Milliseconds())
	return nil, nil
}

// receiveHandOver asks the serve process listening at path for its
// sessions and reads them; the connection is for the answer.
func receiveHandOver(ctx context.Context, path string, log *slog.Logger) (*handover.Conn, *handover.State, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, nil, fmt.Errorf("--handover-from: %w", err)
	}
	conn := handover.NewConn(c.(*net.UnixConn))
	// The old process pauses its sessions and closes the pool first.
	conn.SetDeadline(time.Now().Add(handOverPause + handOverAnswer))
	st, err := handover.ReadState(conn)
	conn.SetDeadline(time.Time{})
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("--handover-from %s: %w", path, err)
	}
	n := 0
	for _, sv := range st.Servers {
		n += len(sv.Sessions)
	}
	log.Info("received the sessions of the previous serve process", "sockets", len(st.Servers), "sessions", n)
	return conn, st, nil
}
