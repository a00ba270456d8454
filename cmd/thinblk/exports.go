package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/handover"
	"github.com/thinblk/thinblk/internal/unixsock"
	"github.com/thinblk/thinblk/pebblemeta"
	"github.com/thinblk/thinblk/thin"
	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/blk/blktrace"
)

// exportOptions are the per-disk settings shared by every export of a pool.
type exportOptions struct {
	socketDir  string
	socketMode os.FileMode
	queues     int
	queueSize  int
	noUring    bool // every request through a worker (synchronous I/O)
	poll       time.Duration
	trace      *blktrace.Log
	noInflight bool // INFLIGHT_SHMFD not offered
	// ownSockets are serve's other unix sockets (control, metrics), by
	// path, with what they are: no volume's socket may take one's path.
	ownSockets map[string]string
}

// exports serves every volume of a pool on its own socket and follows the
// pool's changes: a created volume gets a socket, a deleted one loses it, a
// resized one tells its guest.
type exports struct {
	pool *thin.Pool
	opts exportOptions
	log  *slog.Logger
	ctx  context.Context

	mu     sync.Mutex
	byName map[string]*export
	closed bool
	events chan thin.Event
	done   chan struct{}
	stopW  func()
	// resumed are listeners and sessions handed over by the previous
	// serve process, by socket path, until their volume's export takes
	// them.
	resumed map[string]handover.Server
}

type export struct {
	dev    *blk.Device
	srv    *vhostuser.Server
	served chan struct{} // closed when Serve returns
	// resumed: the server took its listener and sessions from the
	// previous serve process.
	resumed bool
}

// startExports exports every volume of the pool; handed is what a previous
// serve process handed over (nil: nothing), taken over here.
func startExports(ctx context.Context, pool *thin.Pool, opts exportOptions, handed *handover.State, log *slog.Logger) (*exports, error) {
	e := &exports{
		pool: pool, opts: opts, log: log, ctx: ctx,
		byName:  map[string]*export{},
		events:  make(chan thin.Event, 64),
		done:    make(chan struct{}),
		resumed: map[string]handover.Server{},
	}
	if handed != nil {
		for _, sv := range handed.Servers {
			e.resumed[sv.Name] = sv
		}
		defer func() {
			// Sessions of volumes this pool no longer has end here.
			e.mu.Lock()
			defer e.mu.Unlock()
			for name, sv := range e.resumed {
				e.log.Warn("handed-over socket has no volume here; its sessions end", "socket", name, "sessions", len(sv.Sessions))
				st := handover.State{Servers: []handover.Server{sv}}
				st.Close()
			}
			e.resumed = nil
		}()
	}
	// Watch before listing, so no volume created in between is missed;
	// start is idempotent.
	e.stopW = pool.Watch(func(ev thin.Event) {
		select {
		case e.events <- ev:
		case <-e.done:
		}
	})
	go e.follow()
	for _, name := range pool.Volumes() {
		err := e.socketProblem(name)
		if err == nil {
			err = e.start(name)
		}
		if err != nil {
			e.giveBack()
			e.close()
			return nil, err
		}
	}
	return e, nil
}

// follow applies pool changes in order.
func (e *exports) follow() {
	for {
		select {
		case <-e.done:
			return
		case ev := <-e.events:
			switch ev.Type {
			case thin.VolumeCreated:
				if err := e.start(ev.Volume); err != nil {
					e.log.Error("cannot export new volume", "volume", ev.Volume, "err", err)
				}
			case thin.VolumeDeleted:
				e.stop(ev.Volume)
			case thin.VolumeResized:
				e.mu.Lock()
				x := e.byName[ev.Volume]
				e.mu.Unlock()
				if x != nil {
					if err := x.dev.NotifyResize(); err != nil {
						e.log.Warn("could not tell the front-end about the new size", "volume", ev.Volume, "err", err)
					} else {
						e.log.Info("volume resized; front-end notified", "volume", ev.Volume, "bytes", ev.Size)
					}
				}
			}
		}
	}
}

func (e *exports) socketPath(name string) string {
	return filepath.Join(e.opts.socketDir, name+".sock")
}

// socketProblem says why name's socket cannot be served: its path is one
// of serve's own sockets (a volume called "qmp" beside the default control
// socket) or too long for a unix socket. Management commands ask it before
// they create a volume, so that a volume that could not be served is
// refused rather than made; a name the pool refuses anyway passes here.
func (e *exports) socketProblem(name string) error {
	if pebblemeta.ValidVolumeName(name) != nil {
		return nil
	}
	path := e.socketPath(name)
	abs, _ := filepath.Abs(path)
	for own, what := range e.opts.ownSockets {
		if ownAbs, _ := filepath.Abs(own); ownAbs == abs {
			return fmt.Errorf("volume %s: its socket %s is serve's %s: serve the pool with another --socket-dir, or give the volume another name", name, path, what)
		}
	}
	if len(path) > unixsock.MaxPathLen {
		return fmt.Errorf("volume %s: its socket path %s is %d bytes, a unix socket path can have at most %d: use a shorter name or --socket-dir", name, path, len(path), unixsock.MaxPathLen)
	}
	return nil
}

func (e *exports) start(name string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed || e.byName[name] != nil {
		return nil
	}
	vol, err := e.pool.Volume(name)
	if err != nil {
		return err
	}
	log := e.log.With("volume", name)
	// Snapshots are read-only; volumes and clones are writable.
	readOnly := vol.ReadOnly()
	var storage blockdev.Storage = vol
	if e.opts.trace != nil {
		storage = e.opts.trace.Wrap(name, storage)
	}
	dev, err := blk.New(storage, blk.Options{
		ReadOnly:  readOnly,
		NumQueues: e.opts.queues,
		QueueSize: e.opts.queueSize,
		Serial:    baseSerial(name),
		Logger:    log,
		SyncOnly:  e.opts.noUring,
		Poll:      e.opts.poll,
	})
	if err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	srvOpts := vhostuser.ServerOptions{
		SocketPath: e.socketPath(name),
		SocketMode: e.opts.socketMode,
		Logger:     log,
		Name:       name,
		NoInflight: e.opts.noInflight,
	}
	var srv *vhostuser.Server
	sv, resumed := e.resumed[srvOpts.SocketPath]
	if resumed {
		delete(e.resumed, srvOpts.SocketPath)
		srv, err = vhostuser.Resume(srvOpts, dev, sv)
	} else {
		srv, err = vhostuser.Listen(srvOpts, dev)
	}
	if err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	x := &export{dev: dev, srv: srv, served: make(chan struct{}), resumed: resumed}
	e.byName[name] = x
	go func() {
		defer close(x.served)
		if err := srv.Serve(e.ctx); err != nil {
			log.Error("export stopped", "err", err)
		}
	}()
	log.Info("exporting volume", "socket", e.socketPath(name), "bytes", vol.Size(), "read_only", readOnly)
	return nil
}

// inUse refuses to let name be deleted while a front-end is connected to
// its socket, unless force. A front-end that is going (a VM shutting down,
// a tool that just closed) gets a moment to disconnect first.
func (e *exports) inUse(name string, force bool) error {
	if force {
		return nil
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		e.mu.Lock()
		x := e.byName[name]
		e.mu.Unlock()
		if x == nil || !x.srv.Connected() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("volume %s is in use: a front-end (a VM) is connected to %s; stop or detach it first, or delete with force", name, e.socketPath(name))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop closes one export: the socket goes, in-flight requests finish.
func (e *exports) stop(name string) error {
	e.mu.Lock()
	x := e.byName[name]
	delete(e.byName, name)
	e.mu.Unlock()
	if x == nil {
		return nil
	}
	err := x.srv.Close()
	<-x.served
	if derr := x.dev.Close(); err == nil {
		err = derr
	}
	e.log.Info("export closed", "volume", name)
	return err
}

// close stops following the pool and closes every export.
func (e *exports) close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	names := make([]string, 0, len(e.byName))
	for n := range e.byName {
		names = append(names, n)
	}
	e.mu.Unlock()
	e.stopW()
	close(e.done)
	var firstErr error
	for _, n := range names {
		if err := e.stop(n); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}

// giveBack makes the exports that took a previous serve process's sockets
// leave the socket files when closed: that process serves on from what it
// handed over.
func (e *exports) giveBack() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, x := range e.byName {
		if x.resumed {
			x.srv.LeaveSocketFile()
		}
	}
}

// handOff pauses every export for a hand-over (vhostuser.Server.HandOff),
// stops following the pool and closes the devices, so that the pool can be
// closed. On error nothing changed and every export serves on.
func (e *exports) handOff(ctx context.Context) ([]*vhostuser.HandOff, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var hos []*vhostuser.HandOff
	for name, x := range e.byName {
		ho, err := x.srv.HandOff(ctx)
		if err != nil {
			for _, h := range hos {
				h.Abort()
			}
			return nil, fmt.Errorf("volume %s: %w", name, err)
		}
		hos = append(hos, ho)
	}
	e.closed = true
	e.stopW()
	close(e.done)
	for name, x := range e.byName {
		// The rings are stopped: this only flushes.
		if err := x.dev.Close(); err != nil {
			e.log.Warn("device close before a hand-over", "volume", name, "err", err)
		}
	}
	return hos, nil
}

// inFlight sums requests in flight over the named volumes (all if none).
func (e *exports) inFlight(names ...string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	if len(names) == 0 {
		for _, x := range e.byName {
			n += x.dev.InFlight()
		}
		return n
	}
	for _, name := range names {
		if x := e.byName[name]; x != nil {
			n += x.dev.InFlight()
		}
	}
	return n
}
