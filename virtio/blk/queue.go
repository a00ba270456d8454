package blk

import (
	"context"
	"runtime/debug"
	"sync"
	"sync/atomic"

	"github.com/thinblk/thinblk/virtio"
)

// queue serves one virtqueue: the runner pops chains and hands them to a
// pool of workers through a channel that can hold every possible in-flight
// chain, so the runner never blocks on it.
type queue struct {
	dev    *Device
	index  int
	runner *virtio.Runner
	work   chan *virtio.Chain
	reqs   []request // per head: scratch that survives between requests
	wg     sync.WaitGroup
	// notifyPending: completions were put on the used ring without an
	// interrupt check.
	notifyPending atomic.Bool
	// waiting counts chains handed to the workers that no worker has
	// taken yet (each taker checks notifyPending first).
	waiting atomic.Int32

	// Guarded by Device.mu.
	stopped   bool
	lastAvail uint16
}

// request is the per-slot scratch of one request; reused, so serving a
// request allocates nothing once the slot has seen its longest chain.
type request struct {
	bufs [][]byte
}

func (d *Device) newQueue(s virtio.QueueSetup) (*queue, error) {
	q := &queue{
		dev:   d,
		index: s.Index,
		work:  make(chan *virtio.Chain, s.Size),
		reqs:  make([]request, s.Size),
	}
	const bufsPerSlot = 4
	backing := make([][]byte, bufsPerSlot*int(s.Size))
	for i := range q.reqs {
		q.reqs[i].bufs = backing[i*bufsPerSlot : i*bufsPerSlot : (i+1)*bufsPerSlot]
	}
	r, err := virtio.NewRunner(virtio.RunnerConfig{
		Setup:       s,
		Handle:      q.dispatch,
		MaxIndirect: d.opts.QueueSize,
		Logger:      d.log,
	})
	if err != nil {
		return nil, err
	}
	q.runner = r
	return q, nil
}

func (q *queue) start() {
	for range min(q.dev.opts.Workers, cap(q.work)) {
		q.wg.Add(1)
		go q.worker()
	}
	q.runner.Start()
}

func (q *queue) dispatch(c *virtio.Chain) {
	q.dev.inflight.Add(1)
	q.waiting.Add(1)
	q.work <- c
}

func (q *queue) worker() {
	defer q.wg.Done()
	// Guest memory faults (a front-end truncating its memory file) become
	// panics that handle recovers, not a crashed process.
	debug.SetPanicOnFault(true)
	for c := range q.work {
		q.waiting.Add(-1)
		q.handle(c)
	}
}

func (q *queue) handle(c *virtio.Chain) {
	defer q.dev.inflight.Add(-1)
	defer func() {
		if err := virtio.RecoverFault(recover()); err != nil {
			q.runner.Abandon(c.Head, err)
		}
	}()
	// Completions deferred by workers that saw more work coming are
	// announced now, before this request (which may be slow) runs:
	// batching must not delay them behind it.
	if q.notifyPending.Load() && q.notifyPending.Swap(false) {
		q.runner.Notify()
	}
	written := q.dev.serve(c, &q.reqs[c.Head])
	q.complete(c.Head, written)
}

// complete puts a served chain on the used ring. If another chain waits for
// a worker, the interrupt is left to that worker (it notifies before it
// serves), so that a burst of completions costs one interrupt.
//
// The check and the deferral are not atomic: the chain counted on may be
// taken, served and completed by another worker before notifyPending is
// set, and then nobody would announce this completion (the guest's request
// hangs). So after setting the flag, look again: once no chain waits, the
// flag is ours to clear and announce. Every chain still waiting after the
// store is taken by a worker that loads the flag afterwards.
func (q *queue) complete(head uint16, written uint32) {
	if q.waiting.Load() == 0 {
		q.runner.Complete(head, written)
		return
	}
	if testHookDeferring != nil {
		testHookDeferring()
	}
	q.runner.CompleteDeferred(head, written)
	q.notifyPending.Store(true)
	if q.waiting.Load() == 0 && q.notifyPending.Swap(false) {
		q.runner.Notify()
	}
}

// testHookDeferring, if set (by tests), runs when a worker has decided to
// leave its completion's interrupt to another worker.
var testHookDeferring func()

// stop stops the runner, waits for requests in flight and the workers.
// Called with Device.mu held.
func (q *queue) stop(ctx context.Context) (uint16, error) {
	if q.stopped {
		return q.lastAvail, nil
	}
	last, err := q.runner.Stop(ctx)
	if err != nil {
		return 0, err
	}
	close(q.work)
	q.wg.Wait()
	if err := q.runner.Err(); err != nil {
		q.dev.log.Error("queue stopped after the driver broke it", "queue", q.index, "err", err)
	}
	q.stopped, q.lastAvail = true, last
	return last, nil
}
