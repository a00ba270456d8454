package blk

import (
	"context"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
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
	// async, if not nil, runs reads, writes and flushes without workers:
	// the runner starts them, the storage's goroutine completes them.
	async blockdev.AsyncQueue
	wg    sync.WaitGroup
	// notifyPending: completions were put on the used ring without an
	// interrupt check.
	notifyPending atomic.Bool
	// waiting counts chains handed to the workers that no worker has
	// taken yet (each taker checks notifyPending first).
	waiting atomic.Int32

	// stats are this queue index's counters; they outlive the queue (a
	// restarted ring counts on).
	stats *queueStats
	// passStart is when the runner's current pass over the ring began
	// (0 between passes), the start of every request that pass takes:
	// a clock read costs 0.1-0.2 us here, once per pass instead of per
	// request. Runner goroutine only.
	passStart time.Duration
	// withdraw is closed when the queue stops, to withdraw the requests
	// waiting without bound in the storage (blockdev.WithdrawableStorage); nil
	// without an in-flight log, where a withdrawn request would be lost.
	withdraw chan struct{}
	// migrating is QueueSetup.Migrating: no withdrawal while it is true.
	migrating func() bool

	// Guarded by Device.mu.
	stopped   bool
	lastAvail uint16
}

// request is the per-slot scratch of one request; reused, so serving a
// request allocates nothing once the slot has seen its longest chain.
type request struct {
	bufs [][]byte
	// An asynchronous request's type, status byte and used length on
	// success.
	typ     uint32
	status  *byte
	written uint32
	// For the statistics: when the runner took the request, its type,
	// and its data bytes.
	start time.Duration
	op    Op
	n     uint64
	// withdraw is the queue's (see queue.withdraw).
	withdraw <-chan struct{}
}

func (d *Device) newQueue(s virtio.QueueSetup) (*queue, error) {
	q := &queue{
		dev:   d,
		index: s.Index,
		stats: d.stats[s.Index].Load(),
		work:  make(chan *virtio.Chain, s.Size),
		reqs:  make([]request, s.Size),
	}
	if _, ok := d.storage.(blockdev.WithdrawableStorage); ok && s.Inflight != nil {
		q.withdraw = make(chan struct{})
		q.migrating = s.Migrating
	}
	const bufsPerSlot = 4
	backing := make([][]byte, bufsPerSlot*int(s.Size))
	for i := range q.reqs {
		q.reqs[i].bufs = backing[i*bufsPerSlot : i*bufsPerSlot : (i+1)*bufsPerSlot]
		q.reqs[i].withdraw = q.withdraw
	}
	afterDrain := func() { q.passStart = 0 }
	var waiter virtio.Waiter
	if as, ok := d.storage.(blockdev.AsyncStorage); ok && !d.opts.SyncOnly {
		aq, err := as.OpenQueue(int(s.Size), q.asyncDone)
		if err != nil {
			d.log.Info("storage serves this queue synchronously", "queue", s.Index, "reason", err)
		} else {
			q.async = aq
			afterDrain = func() {
				q.passStart = 0
				aq.Submit()
			}
			// The runner sleeps in the storage's queue, for kicks and
			// completions at once, and completes requests itself.
			if iq, ok := aq.(blockdev.InlineQueue); ok && s.Kick != nil && iq.Inline() {
				waiter = iq
			}
		}
	}
	r, err := virtio.NewRunner(virtio.RunnerConfig{
		Setup:       s,
		Handle:      q.dispatch,
		AfterDrain:  afterDrain,
		MaxIndirect: d.opts.QueueSize,
		Logger:      d.log,
		Poll:        d.opts.Poll,
		Waiter:      waiter,
	})
	if err != nil {
		if q.async != nil {
			q.async.Close()
		}
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
	if q.passStart == 0 {
		q.passStart = now()
	}
	q.reqs[c.Head].start = q.passStart
	if q.async != nil && q.startAsync(c) {
		return
	}
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
	r := &q.reqs[c.Head]
	written, st, withdrawn := q.dev.serve(c, r)
	if withdrawn {
		q.runner.Withdraw(c.Head)
		return
	}
	// Counted before the driver can see the completion, so that what it
	// saw complete is always in the counts.
	q.stats.record(r.op, st, r.n, now()-r.start)
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

// startAsync starts c on the asynchronous queue if it is a request that
// queue serves. It runs on the runner's goroutine.
func (q *queue) startAsync(c *virtio.Chain) (started bool) {
	defer func() {
		if err := virtio.RecoverFault(recover()); err != nil {
			q.runner.Abandon(c.Head, err)
			q.dev.inflight.Add(-1)
			started = true
		}
	}()
	return q.dev.startAsync(q.async, c, &q.reqs[c.Head])
}

// asyncDone completes a batch of asynchronous requests and interrupts the
// driver once for all of them. It runs on the storage's goroutine.
func (q *queue) asyncDone(batch []blockdev.Completion) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	done := now() // one clock read for the batch
	for _, cpl := range batch {
		q.finishAsync(cpl, done)
	}
	defer func() {
		if err := virtio.RecoverFault(recover()); err != nil {
			q.dev.log.Error("interrupt check failed", "queue", q.index, "err", err)
		}
	}()
	q.runner.Notify()
}

func (q *queue) finishAsync(cpl blockdev.Completion, done time.Duration) {
	defer q.dev.inflight.Add(-1)
	defer func() {
		if err := virtio.RecoverFault(recover()); err != nil {
			q.runner.Abandon(cpl.Tag, err)
		}
	}()
	r := &q.reqs[cpl.Tag]
	st, written := byte(StatusOK), r.written
	switch {
	case cpl.Err != nil:
		q.dev.logRequestError("request failed", "type", r.typ, "err", cpl.Err)
		st = StatusIOErr
	case r.typ == TypeOut && !q.dev.writeback.Load():
		// The write cache was disabled while this write was in flight:
		// it completes after a flush, which runs on a goroutine of its
		// own. This is the storage's completion goroutine, and a flush
		// may wait for requests only it completes (a thin pool's commit
		// waits for the reads in flight).
		q.dev.inflight.Add(1)
		go q.writeThroughLater(cpl.Tag)
		return
	}
	q.finishReq(cpl.Tag, st, written, false, done)
}

// finishReq writes an asynchronous request's status and puts it on the
// used ring (with an interrupt check if notify); done is the time it
// completed.
func (q *queue) finishReq(tag uint16, st byte, written uint32, notify bool, done time.Duration) {
	r := &q.reqs[tag]
	if st != StatusOK {
		written = 1
	}
	clear(r.bufs)
	r.bufs = r.bufs[:0]
	status := r.status
	r.status = nil
	*status = st
	q.stats.record(r.op, st, r.n, done-r.start)
	if notify {
		q.runner.Complete(tag, written)
	} else {
		q.runner.CompleteDeferred(tag, written)
	}
}

// writeThroughLater flushes, then completes an asynchronous write.
func (q *queue) writeThroughLater(tag uint16) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer q.dev.inflight.Add(-1)
	defer func() {
		if err := virtio.RecoverFault(recover()); err != nil {
			q.runner.Abandon(tag, err)
		}
	}()
	q.finishReq(tag, q.dev.writeThrough(), q.reqs[tag].written, true, now())
}

// stop stops the runner, waits for requests in flight and the workers.
// Called with Device.mu held.
func (q *queue) stop(ctx context.Context) (uint16, error) {
	if q.stopped {
		return q.lastAvail, nil
	}
	if q.withdraw != nil && (q.migrating == nil || !q.migrating()) {
		select {
		case <-q.withdraw:
		default:
			close(q.withdraw)
		}
	} else if q.withdraw != nil {
		q.dev.log.Info("queue stops for a live migration: requests waiting for space are completed first", "queue", q.index)
	}
	last, err := q.runner.Stop(ctx)
	if err != nil {
		return 0, err
	}
	close(q.work)
	q.wg.Wait()
	if q.async != nil {
		// Nothing is in flight any more (the runner waited for it).
		if err := q.async.Close(); err != nil {
			q.dev.log.Error("close asynchronous queue", "queue", q.index, "err", err)
		}
		q.async = nil
	}
	if err := q.runner.Err(); err != nil {
		q.dev.log.Error("queue stopped after the driver broke it", "queue", q.index, "err", err)
	}
	q.stopped, q.lastAvail = true, last
	return last, nil
}
