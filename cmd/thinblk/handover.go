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

// listenHandOver listens for a new serve process asking for the sessions.
func listenHandOver(path string, log *slog.Logger) (<-chan *handover.Conn, func(), error) {
	ln, fi, err := unixsock.Listen(path, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("hand-over socket: %w", err)
	}
	requests := make(chan *handover.Conn)
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
			log.Info("a new serve process asks for the sessions", peerAttrs(uc)...)
			select {
			case requests <- handover.NewConn(uc):
			case <-done:
				uc.Close()
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

func peerAttrs(uc *net.UnixConn) []any {
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	var attrs []any
	rc.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			attrs = []any{"peer_pid", cred.Pid, "peer_uid", cred.Uid}
		}
	})
	return attrs
}

// handOver hands the pool's sessions to the process at the other end of
// to. It returns (nil, err) if nothing was let go of (serve on), (nil,
// nil) once the new process took everything (exit), and the state back
// with the reason if the new process failed after this one closed the
// pool (open it again and resume from the state).
func handOver(ctx context.Context, to *handover.Conn, pool *thin.Pool, ex *exports, log *slog.Logger, stopServices func()) (*handover.State, error) {
	defer to.Close()
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
