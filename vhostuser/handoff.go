package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/thinblk/thinblk/internal/eventfd"
	"github.com/thinblk/thinblk/internal/handover"
	"github.com/thinblk/thinblk/internal/unixsock"
)

// A hand-over moves a Server's listening socket and front-end connections
// to another process without the front-end seeing a disconnect: each
// session stops reading at a message boundary, its rings stop (requests
// in flight complete, or stay recorded in the in-flight area for the next
// process to resubmit), and its state is exported as the vhost-user
// requests that rebuild it, with duplicates of every descriptor. The other
// process replays them (Resume) with the validation any front-end gets.

// connState coordinates a hand-over with one connection's goroutine.
type connState struct {
	conn *Conn
	// mu is held while a message is read, so that the read deadline a
	// hand-over sets can only interrupt the wait between messages, never
	// cut one in half.
	mu      sync.Mutex
	pausing bool
	paused  chan pausedSession // the goroutine's export
	verdict chan bool          // true: handed over; false: serve on
}

type pausedSession struct {
	state handover.Session
	err   error
}

// handOff is the Server's part of a hand-over in progress.
type handOff struct {
	parked  chan struct{} // the accept loop stopped accepting
	verdict chan bool
}

// HandOff is a hand-over in progress: every session of the Server is
// paused with its rings stopped. Commit after the other process took the
// state; Abort to serve on here.
type HandOff struct {
	s     *Server
	conns []*connState
	// State is the Server's listener and sessions, with descriptors this
	// HandOff owns (closed by Commit and Abort).
	State handover.Server
	done  bool
}

// errHandOffRefused marks a session whose state cannot be handed over.
var errHandOffRefused = errors.New("vhost-user: session cannot be handed over")

// HandOff pauses the Server for a hand-over: it stops accepting, stops
// each session at a message boundary, stops its rings and exports the
// listener and sessions. A live migration in progress (dirty logging) is
// refused: its log is not carried over. On error everything serves on.
func (s *Server) HandOff(ctx context.Context) (*HandOff, error) {
	s.mu.Lock()
	if s.closed || s.handing != nil {
		s.mu.Unlock()
		return nil, errors.New("vhost-user: server closed or already handing over")
	}
	h := &handOff{parked: make(chan struct{}), verdict: make(chan bool, 1)}
	s.handing = h
	serving := s.serving
	s.mu.Unlock()
	ho := &HandOff{s: s}
	fail := func(err error) (*HandOff, error) {
		ho.Abort()
		return nil, err
	}
	if serving {
		// The accept loop parks; a connection it accepted just before is
		// registered first and so paused below.
		s.ln.SetDeadline(time.Unix(1, 0))
		select {
		case <-h.parked:
		case <-ctx.Done():
			return fail(fmt.Errorf("vhost-user: hand-over: accept loop did not stop: %w", ctx.Err()))
		}
	}
	s.mu.Lock()
	for _, cs := range s.active {
		ho.conns = append(ho.conns, cs)
	}
	s.mu.Unlock()
	for _, cs := range ho.conns {
		cs.mu.Lock()
		cs.pausing = true
		cs.conn.uc.SetReadDeadline(time.Unix(1, 0))
		cs.mu.Unlock()
	}
	var firstErr error
	for i, cs := range ho.conns {
		select {
		case p := <-cs.paused:
			if p.err != nil && firstErr == nil {
				firstErr = p.err
			}
			ho.State.Sessions = append(ho.State.Sessions, p.state)
		case <-ctx.Done():
			// Those not paused yet get their verdict when they pause.
			for _, late := range ho.conns[i:] {
				go func() {
					p := <-late.paused
					closeRequests(p.state.Replay)
					if p.state.Conn != nil {
						p.state.Conn.Close()
					}
					late.verdict <- false
				}()
			}
			ho.conns = ho.conns[:i]
			return fail(fmt.Errorf("vhost-user: hand-over: a session did not pause: %w", ctx.Err()))
		}
	}
	if firstErr != nil {
		return fail(firstErr)
	}
	ln, err := s.ln.File()
	if err != nil {
		return fail(fmt.Errorf("vhost-user: hand-over: listener: %w", err))
	}
	ho.State.Name, ho.State.Listener = s.opts.SocketPath, ln
	s.log.Info("paused for a hand-over", "sessions", len(ho.conns))
	return ho, nil
}

// Commit ends the Server here after the other process took its state: the
// sessions end without touching the front-ends (the other process holds
// the connections), Serve returns, and Close leaves the socket file.
func (ho *HandOff) Commit() {
	if ho.done {
		return
	}
	st := ho.Detach()
	closeServerState(st)
}

// Detach ends the Server here as Commit does, but gives the caller the
// state (its descriptors still open), to Resume in this process: after a
// hand-over that failed once this process had let go of its storage.
func (ho *HandOff) Detach() handover.Server {
	if ho.done {
		return handover.Server{}
	}
	ho.done = true
	s := ho.s
	s.mu.Lock()
	s.handedOff = true
	s.mu.Unlock()
	for _, cs := range ho.conns {
		cs.verdict <- true
	}
	s.handing.verdict <- true
	st := ho.State
	ho.State = handover.Server{}
	s.log.Info("handed over")
	s.Close()
	return st
}

// Abort serves on: rings start again, reads and accepts resume.
func (ho *HandOff) Abort() {
	if ho.done {
		return
	}
	ho.done = true
	s := ho.s
	for _, cs := range ho.conns {
		cs.verdict <- false
	}
	s.mu.Lock()
	h := s.handing
	s.handing = nil
	s.mu.Unlock()
	// The accept loop may not have parked yet: it must not find the
	// hand-over's deadline once the hand-over is gone.
	s.ln.SetDeadline(time.Time{})
	h.verdict <- false
	ho.closeState()
	s.log.Info("hand-over aborted; serving on")
}

func (ho *HandOff) closeState() { closeServerState(ho.State) }

func closeServerState(sv handover.Server) {
	st := handover.State{Servers: []handover.Server{sv}}
	st.Close()
}

// acceptParked is called by the accept loop when its accept failed: during
// a hand-over it waits for the verdict and reports whether Serve ends.
func (s *Server) acceptParked() (handing, end bool) {
	s.mu.Lock()
	h := s.handing
	s.mu.Unlock()
	if h == nil {
		return false, false
	}
	close(h.parked)
	if <-h.verdict {
		return true, true
	}
	s.ln.SetDeadline(time.Time{})
	return true, false
}

// pauseForHandOff runs on a connection's goroutine once a hand-over asked
// it to pause: it stops the rings, exports the session and waits for the
// verdict. It reports whether the session was handed over (the goroutine
// then ends it without a word to the front-end).
func (s *Server) pauseForHandOff(cs *connState, sess *session) bool {
	p := pausedSession{}
	reqs, err := sess.handOffRequests()
	if err == nil {
		var conn *os.File
		if conn, err = cs.conn.uc.File(); err == nil {
			p.state = handover.Session{Conn: conn, Replay: reqs}
		} else {
			closeRequests(reqs)
		}
	}
	p.err = err
	cs.paused <- p
	if <-cs.verdict {
		return true
	}
	cs.mu.Lock()
	cs.pausing = false
	cs.conn.uc.SetReadDeadline(time.Time{})
	cs.mu.Unlock()
	sess.startReady()
	return false
}

func closeRequests(reqs []handover.Request) {
	for _, r := range reqs {
		for _, f := range r.Files {
			f.Close()
		}
	}
}

// handOffRequests stops the session's rings and lists the vhost-user
// requests that rebuild the session elsewhere, with duplicated
// descriptors. Rings whose requests waited for space are withdrawn into
// the in-flight area, to be resubmitted by the next process.
func (s *session) handOffRequests() (reqs []handover.Request, err error) {
	if s.dirty.migrating() || s.dirty.mapped() {
		return nil, fmt.Errorf("%w: a live migration is under way (dirty log)", errHandOffRefused)
	}
	if err := s.stopAll(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			closeRequests(reqs)
			reqs = nil
		}
	}()
	add := func(req Request, payload []byte, files ...*os.File) error {
		var dups []*os.File
		for _, f := range files {
			d, err := dupFile(f)
			if err != nil {
				closeRequests([]handover.Request{{Files: dups}})
				return fmt.Errorf("hand-over: %v: %w", req, err)
			}
			dups = append(dups, d)
		}
		reqs = append(reqs, handover.Request{Request: uint32(req), Payload: payload, Files: dups})
		return nil
	}
	addEventfd := func(req Request, payload []byte, e *eventfd.FD) error {
		f, err := e.File("eventfd")
		if err != nil {
			return fmt.Errorf("hand-over: %v: %w", req, err)
		}
		reqs = append(reqs, handover.Request{Request: uint32(req), Payload: payload, Files: []*os.File{f}})
		return nil
	}
	if s.protocol != 0 {
		if err := add(ReqSetProtocolFeatures, EncodeU64(s.protocol)); err != nil {
			return nil, err
		}
	}
	if s.features != 0 {
		if err := add(ReqSetFeatures, EncodeU64(s.features)); err != nil {
			return nil, err
		}
	}
	if s.backend != nil {
		f, err := s.backend.conn.uc.File()
		if err != nil {
			return nil, fmt.Errorf("hand-over: back-end channel: %w", err)
		}
		err = add(ReqSetBackendReqFd, nil, f)
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	if s.protocol&(1<<ProtoStatus) != 0 {
		if err := add(ReqSetStatus, EncodeU64(uint64(s.status))); err != nil {
			return nil, err
		}
	}
	if s.mem.len() > 0 {
		regs := s.mem.regions
		if s.protocol&(1<<ProtoConfigureMemSlots) != 0 {
			for _, r := range regs {
				if err := add(ReqAddMemReg, EncodeSingleRegion(r.MemoryRegion), r.file); err != nil {
					return nil, err
				}
			}
		} else {
			descs := make([]MemoryRegion, len(regs))
			files := make([]*os.File, len(regs))
			for i, r := range regs {
				descs[i], files[i] = r.MemoryRegion, r.file
			}
			if err := add(ReqSetMemTable, EncodeMemTable(descs), files...); err != nil {
				return nil, err
			}
		}
	}
	if a := s.inflight; a != nil {
		if err := add(ReqSetInflightFd, a.desc.Encode(), a.file); err != nil {
			return nil, err
		}
	}
	perRingEnable := s.features&(1<<FeatureProtocolFeatures) != 0
	for i := range s.rings {
		r := &s.rings[i]
		idx := uint32(i)
		if r.num != 0 {
			if err := add(ReqSetVringNum, VringState{Index: idx, Num: uint32(r.num)}.Encode()); err != nil {
				return nil, err
			}
		}
		if r.addrSet {
			a := r.addr
			a.Index = idx
			if err := add(ReqSetVringAddr, a.Encode()); err != nil {
				return nil, err
			}
		}
		if r.base != 0 {
			if err := add(ReqSetVringBase, VringState{Index: idx, Num: uint32(r.base)}.Encode()); err != nil {
				return nil, err
			}
		}
		if r.call != nil {
			if err := addEventfd(ReqSetVringCall, EncodeU64(uint64(i)), r.call); err != nil {
				return nil, err
			}
		}
		if r.errFd != nil {
			if err := add(ReqSetVringErr, EncodeU64(uint64(i)), r.errFd); err != nil {
				return nil, err
			}
		}
		if perRingEnable && r.enabled {
			if err := add(ReqSetVringEnable, VringState{Index: idx, Num: 1}.Encode()); err != nil {
				return nil, err
			}
		}
		// Last: the kick starts the ring.
		if r.kickSet {
			var err error
			if r.kick != nil {
				err = addEventfd(ReqSetVringKick, EncodeU64(uint64(i)), r.kick)
			} else {
				err = add(ReqSetVringKick, EncodeU64(uint64(i)|VringNoFd))
			}
			if err != nil {
				return nil, err
			}
		}
	}
	return reqs, nil
}

// refuseWriter is a session's output while it is rebuilt from replayed
// requests: none of them has a reply.
type refuseWriter struct{}

func (refuseWriter) Write(h Header, _ []byte, _ ...*os.File) error {
	return fmt.Errorf("hand-over: replayed %v wants to write to the front-end", h.Request)
}

// Resume serves the listener and sessions another process handed over (a
// HandOff's State): each session is rebuilt by replaying its requests
// (its rings start at once) and then served as if its front-end had set
// it up here. A session whose replay fails is closed (a front-end with
// reconnect=1 then connects again). st's descriptors are taken over.
func Resume(opts ServerOptions, dev Device, st handover.Server) (*Server, error) {
	s, err := newServer(opts, dev)
	if err != nil {
		closeServerState(st)
		return nil, err
	}
	if st.Name != opts.SocketPath {
		closeServerState(st)
		return nil, fmt.Errorf("vhost-user: handed-over listener is %s, not %s", st.Name, opts.SocketPath)
	}
	l, err := net.FileListener(st.Listener)
	st.Listener.Close()
	st.Listener = nil
	if err != nil {
		closeServerState(st)
		return nil, fmt.Errorf("vhost-user: handed-over listener: %w", err)
	}
	ln, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		closeServerState(st)
		return nil, fmt.Errorf("vhost-user: handed-over listener is a %T", l)
	}
	ln.SetUnlinkOnClose(false)
	s.ln = ln
	if s.sock, err = os.Stat(opts.SocketPath); err != nil {
		s.log.Warn("handed-over socket file is gone: it stays in place only for connections already made", "err", err)
	}
	for i := range st.Sessions {
		se := &st.Sessions[i]
		c, err := net.FileConn(se.Conn)
		se.Conn.Close()
		se.Conn = nil
		if err != nil {
			closeRequests(se.Replay)
			s.log.Error("handed-over connection unusable", "err", err)
			continue
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			closeRequests(se.Replay)
			s.log.Error("handed-over connection is not a unix socket")
			continue
		}
		s.resume(uc, se.Replay)
	}
	s.log.Info("resumed from a hand-over", "sessions", len(st.Sessions))
	return s, nil
}

// LeaveSocketFile makes Close leave the socket file in place: a Server
// from Resume that gives its state back (the process that handed it over
// serves on) must not remove the socket that process listens on.
func (s *Server) LeaveSocketFile() {
	s.mu.Lock()
	s.handedOff = true
	s.mu.Unlock()
}

// resume rebuilds one session from its requests and serves it.
func (s *Server) resume(uc *net.UnixConn, replay []handover.Request) {
	log := s.log.With(unixsock.PeerAttrs(uc)...)
	conn := NewConn(uc)
	sess := s.newConnSession(log, conn, uc)
	sess.out = refuseWriter{}
	sess.replaying = true
	fail := func(err error) {
		log.Error("replaying a handed-over session failed; connection closed (the front-end reconnects)", "err", err)
		sess.close()
		conn.Close()
	}
	for i, r := range replay {
		m := Message{Header: Header{Request: Request(r.Request), Size: uint32(len(r.Payload))}, Payload: r.Payload, Files: r.Files}
		if err := sess.dispatch(&m); err != nil {
			closeRequests(replay[i+1:])
			fail(fmt.Errorf("%v: %w", m.Header.Request, err))
			return
		}
	}
	// A ring that ran in the other process runs here too, or the guest's
	// queue would hang: a reconnect is better.
	for i := range sess.rings {
		r := &sess.rings[i]
		if r.enabled && r.kickSet && r.addrSet && r.num != 0 && !r.running {
			fail(fmt.Errorf("ring %d did not start", i))
			return
		}
	}
	sess.replaying = false
	sess.out = conn
	cs := &connState{conn: conn, paused: make(chan pausedSession, 1), verdict: make(chan bool, 1)}
	s.mu.Lock()
	s.active[uc] = cs
	s.accepted.Add(1)
	s.conns.Add(1)
	s.mu.Unlock()
	log.Info("front-end session resumed from a hand-over")
	go s.runSession(cs, sess, log)
}
