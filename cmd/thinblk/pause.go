package main

// serve DIR --qemu-qmp unix:PATH: with the no-space policy "pause", the VM
// behind that QEMU monitor is stopped when a write finds the pool out of
// space and resumed when space appears, as QEMU itself does with
// werror=enospc. QMP events on thinblk's control socket say so.

import (
	"context"
	"log/slog"
	"time"

	"github.com/thinblk/thinblk/thin"
	"github.com/thinblk/thinblk/vmsnap"
)

// QMP events of the pause policy.
const (
	eventVMStopped = "BLOCK_POOL_VM_STOPPED" // {pool, volume, qemu[, error]}
	eventVMResumed = "BLOCK_POOL_VM_RESUMED" // {pool, qemu[, error]}
)

// pauser stops and resumes one QEMU on the pool's space events; each
// QEMU has its own, so that a stop held up in one does not hold up the
// others. Its actions run one at a time on its own goroutine, in event
// order: a stop that QEMU takes long to finish (it stops the vhost-user
// rings, and a ring whose request waits for space answers only once space
// is back) is followed by the matching cont, never overtaken by it.
type pauser struct {
	qemu, pool string
	emit       func(event string, data any)
	log        *slog.Logger
	events     chan thin.Event
	done       chan struct{}
	ctx        context.Context
	cancel     context.CancelFunc
	stopped    bool // we stopped the VM and owe it a cont
}

// pauseActionTimeout bounds one QMP action on QEMU. A stop waits for the
// vhost-user rings, so it gets long.
const pauseActionTimeout = 10 * time.Minute

func startPauser(pool *thin.Pool, qemu string, emit func(string, any), log *slog.Logger) (stop func()) {
	st := pool.Status()
	if st.Pool.NoSpace != thin.NoSpacePause.String() {
		log.Warn("--qemu-qmp is ignored: the pool's no-space policy is not pause", "policy", st.Pool.NoSpace)
		return func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &pauser{
		qemu: qemu, pool: st.Pool.Dir, emit: emit, log: log.With("qemu_qmp", qemu),
		events: make(chan thin.Event, 256), done: make(chan struct{}), ctx: ctx, cancel: cancel,
	}
	unwatch := pool.Watch(func(ev thin.Event) {
		if ev.Type != thin.OutOfSpace && ev.Type != thin.SpaceAvailable {
			return
		}
		select {
		case p.events <- ev:
		default:
			p.log.Error("pause policy: event queue full, event dropped", "event", ev.Type)
		}
	})
	go p.run()
	return func() {
		unwatch()
		cancel()
		<-p.done
	}
}

func (p *pauser) run() {
	defer close(p.done)
	for {
		select {
		case <-p.ctx.Done():
			return
		case ev := <-p.events:
			p.handle(ev)
		}
	}
}

func (p *pauser) handle(ev thin.Event) {
	ctx, cancel := context.WithTimeout(p.ctx, pauseActionTimeout)
	defer cancel()
	switch ev.Type {
	case thin.OutOfSpace:
		if p.stopped {
			return
		}
		// QEMU pauses the vCPUs at once; its answer waits until the
		// vhost-user rings stop, which for a ring whose request waits for
		// space is when space comes back.
		p.log.Warn("pause policy: pool out of space; stopping the VM", "volume", ev.Volume)
		stopped, err := vmsnap.Stop(ctx, p.qemu)
		data := map[string]any{"pool": p.pool, "volume": ev.Volume, "qemu": p.qemu}
		if err != nil {
			// A stop that was sent may have happened anyway (its answer
			// came too late): owe a cont, harmless on a running VM.
			p.stopped = stopped
			data["error"] = err.Error()
			p.log.Error("pause policy: could not stop the VM", "volume", ev.Volume, "err", err)
			p.emit(eventVMStopped, data)
			return
		}
		if !stopped {
			p.log.Info("pause policy: pool out of space; the VM was already paused, left alone", "volume", ev.Volume)
			return
		}
		p.stopped = true
		p.log.Warn("pause policy: VM stopped until space appears", "volume", ev.Volume)
		p.emit(eventVMStopped, data)
	case thin.SpaceAvailable:
		if !p.stopped {
			return
		}
		p.stopped = false
		data := map[string]any{"pool": p.pool, "qemu": p.qemu}
		if err := vmsnap.Cont(ctx, p.qemu); err != nil {
			data["error"] = err.Error()
			p.log.Error("pause policy: could not resume the VM", "err", err)
		} else {
			p.log.Info("pause policy: space available; VM resumed", "free_bytes", ev.Free)
		}
		p.emit(eventVMResumed, data)
	}
}
