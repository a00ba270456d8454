package virtio

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/eventfd"
)

// RunnerConfig configures a Runner.
type RunnerConfig struct {
	Setup QueueSetup
	// Handle receives every chain popped from the ring, on the runner's
	// goroutine. The chain (including its buffers) belongs to the handler
	// until it calls Complete (or CompleteDeferred) for c.Head; Handle may
	// return before that and finish the request elsewhere. Malformed chains
	// (c.Err != nil) are handed over too: they must be completed, with an
	// error status where the device has one.
	Handle func(c *Chain)
	// AfterDrain, if set, runs on the runner's goroutine after every pass
	// over the available ring (also the last one, when stopping), before
	// the runner notifies the driver or sleeps: a device that collects
	// requests in Handle starts them here, as one batch.
	AfterDrain func()
	// MaxIndirect is the largest indirect table accepted (default and
	// minimum: the queue size). See Queue.SetMaxIndirect.
	MaxIndirect int
	Logger      *slog.Logger
	// Poll, if positive, keeps the runner looking at the available ring
	// for this long after the last chain it took, with kicks left off,
	// before it sleeps on the kick eventfd: a driver that sends its next
	// request within that time skips its kick, and the runner its
	// wake-up. It spins a CPU meanwhile (see PollRing).
	Poll time.Duration
	// Waiter, if set, is where the runner sleeps for kicks instead of
	// poll(2): an I/O engine that waits for the kick and wake eventfds
	// together with its own completions (an io_uring polling them), so
	// that one sleeping thread serves both. The runner's goroutine is
	// locked to its OS thread while it runs (such an engine may have one
	// issuing thread), and calls Settle before it ends.
	Waiter Waiter
}

// Waiter is an I/O engine the runner can sleep in (RunnerConfig.Waiter).
// Its methods run on the runner's goroutine; completions it collects
// reach the device on that goroutine too.
type Waiter interface {
	// Wait blocks until one of fds is readable or failed, setting
	// revents to each fd's poll events (0: not ready), and completes
	// the engine's requests that finish meanwhile.
	Wait(fds []int32, revents []int16) error
	// Poll completes the engine's requests that have finished, without
	// blocking.
	Poll()
	// Settle waits until every request the engine started has
	// completed, completing them.
	Settle()
}

// PollInterval is how often a queue without a kick eventfd looks at its
// ring, in milliseconds.
const PollInterval = 1

// Runner serves one virtqueue: it waits for the driver's kicks, drains the
// available ring into the handler, and puts completed chains on the used
// ring, interrupting the driver only as often as it asks to be.
type Runner struct {
	q       *Queue
	handle  func(*Chain)
	after   func()
	journal InflightLog
	log     *slog.Logger
	kick    *eventfd.FD // its owner closes it only after the runner stopped
	poll    time.Duration
	waiter  Waiter
	// call is where interrupts go; SetCall swaps it while the ring runs.
	call atomic.Pointer[eventfd.FD]

	// Consumer side (runner goroutine only).
	scratch Chain
	pollFds []unix.PollFd
	readBuf [8]byte
	waitFds []int32 // pollFds' descriptors and events, for waiter
	waitEvs []int16

	// Completion side, guarded by mu.
	mu       sync.Mutex
	chains   []Chain // indexed by head
	busy     []bool  // head popped and not completed
	inflight int
	idle     chan struct{} // closed when inflight drops to 0 while stopping
	faulted  bool          // guest memory faulted: rings no longer touched

	stopping atomic.Bool
	started  bool
	done     chan struct{}
	stopOnce sync.Once
	wakeMu   sync.Mutex
	wakeFd   int // eventfd that interrupts the wait; -1 once closed
}

// Points of the request path where a crash hook runs (SetCrashHook).
const (
	// CrashFetched: a chain was taken from the available ring (and
	// recorded in the in-flight log) but its request has not started.
	CrashFetched = "fetched"
	// CrashUsedElement: the request is done (data written) and its used
	// element written, but the used index not yet published.
	CrashUsedElement = "used-element"
	// CrashUsedIndex: the used index that includes the request is
	// published, but the in-flight log not yet updated.
	CrashUsedIndex = "used-index"
)

// crashHook, if set, runs at the crash points; set before queues start.
var crashHook func(point string)

// SetCrashHook makes hook run at each crash point (CrashFetched, ...), on
// the goroutine that reached it. It exists for crash-recovery tests (a
// hook that kills the process); without one each point costs a nil check.
// Call it before any queue starts.
func SetCrashHook(hook func(point string)) { crashHook = hook }

// one is the eventfd increment written to signal the driver.
var one = [8]byte{1}

// NewRunner prepares a runner for cfg.Setup; Start starts it.
func NewRunner(cfg RunnerConfig) (*Runner, error) {
	if cfg.Handle == nil {
		return nil, errors.New("virtio runner: no handler")
	}
	q, err := NewQueue(cfg.Setup)
	if err != nil {
		return nil, err
	}
	if cfg.MaxIndirect > 0 {
		q.SetMaxIndirect(cfg.MaxIndirect)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("queue %d: wake eventfd: %w", cfg.Setup.Index, err)
	}
	r := &Runner{
		q:       q,
		handle:  cfg.Handle,
		after:   cfg.AfterDrain,
		journal: cfg.Setup.Inflight,
		log:     log.With("queue", cfg.Setup.Index),
		kick:    cfg.Setup.Kick,
		poll:    cfg.Poll,
		waiter:  cfg.Waiter,
		chains:  make([]Chain, q.size),
		busy:    make([]bool, q.size),
		done:    make(chan struct{}),
		wakeFd:  wake,
	}
	// A few segments per slot up front; a slot grows (once) if the driver
	// sends longer chains.
	const segsPerSlot = 4
	backing := make([][]byte, segsPerSlot*(int(q.size)+1))
	addrs := make([]uint64, segsPerSlot*(int(q.size)+1))
	for i := range r.chains {
		r.chains[i].segs = backing[i*segsPerSlot : i*segsPerSlot : (i+1)*segsPerSlot]
		r.chains[i].addrs = addrs[i*segsPerSlot : i*segsPerSlot : (i+1)*segsPerSlot]
	}
	n := int(q.size)
	r.scratch.segs = backing[n*segsPerSlot : n*segsPerSlot : (n+1)*segsPerSlot]
	r.scratch.addrs = addrs[n*segsPerSlot : n*segsPerSlot : (n+1)*segsPerSlot]
	r.pollFds = []unix.PollFd{{Fd: int32(wake), Events: unix.POLLIN}}
	if r.kick != nil {
		r.pollFds = append(r.pollFds, unix.PollFd{Fd: int32(r.kick.Fd()), Events: unix.POLLIN})
	}
	if err := r.SetCall(cfg.Setup.Call); err != nil {
		unix.Close(wake)
		return nil, fmt.Errorf("queue %d: %w", cfg.Setup.Index, err)
	}
	return r, nil
}

// SetCall makes the runner interrupt the driver through f (nil: drop
// interrupts) from now on; it may be called while the runner serves. The
// caller may close the old FD as soon as SetCall returns: a signal under
// way holds it open until it is done (eventfd.FD's Close waits). One
// interrupt is sent to the new fd, in case a completion signalled the old
// one after the driver stopped listening to it.
func (r *Runner) SetCall(f *eventfd.FD) error {
	old := r.call.Swap(f)
	if old != nil && f != nil {
		r.signal()
	}
	return nil
}

// Queue returns the ring the runner serves. Its consumer side belongs to
// the runner goroutine while it runs.
func (r *Runner) Queue() *Queue { return r.q }

// Start starts serving the ring on a new goroutine.
func (r *Runner) Start() {
	r.started = true
	go r.run()
}

func (r *Runner) run() {
	defer close(r.done)
	if r.waiter != nil {
		// The waiter may accept submissions and waits from one thread
		// only. Settle runs last (deferred first): after the fault
		// handler's afterDrain, which may start requests.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer r.waiter.Settle()
	}
	// Guest memory is a shared mapping that a hostile front-end could
	// truncate under us; touching it then faults. Make that a panic we
	// turn into a broken queue instead of a crashed process.
	debug.SetPanicOnFault(true)
	defer func() {
		if err := RecoverFault(recover()); err != nil {
			r.mu.Lock()
			r.faulted = true
			r.mu.Unlock()
			r.q.fail(err)
			r.log.Error("virtqueue broken, no longer served", "err", r.q.broken)
			// Requests the handler collected before the fault still
			// have to start, or Stop would wait for them forever.
			r.afterDrain()
		}
	}()
	q := r.q
	ok := r.resubmit()
	r.afterDrain()
	if !ok {
		r.Notify()
		return
	}
	for !r.stopping.Load() {
		q.DisableNotify()
		for {
			before := q.LastAvail()
			ok := r.drain()
			r.afterDrain()
			if !ok {
				r.Notify()
				return
			}
			// Poll only after a pass that found work: a wake-up that
			// finds none (a kick already served) goes back to sleep.
			if r.poll > 0 && q.LastAvail() != before && r.pollRing() {
				continue
			}
			q.EnableNotify()
			// The driver may have added chains before it saw
			// notifications re-enabled: look again before sleeping.
			if r.stopping.Load() || !q.HasAvail() {
				break
			}
			q.DisableNotify()
		}
		r.Notify()
		if r.stopping.Load() {
			return
		}
		r.wait()
	}
}

// pollRing announces the pass's completions, then watches the available
// ring for up to r.poll, kicks still off. It returns true as soon as the
// driver adds a chain, false when the time is up or the runner stops.
func (r *Runner) pollRing() bool {
	r.Notify()
	deadline := time.Now().Add(r.poll)
	for i := 0; ; i++ {
		if r.q.HasAvail() {
			return true
		}
		// A clock read costs about as much as 20 looks at the ring.
		if i%32 == 31 {
			if r.stopping.Load() || time.Now().After(deadline) {
				return false
			}
			// Complete what finished; let the completion goroutine run
			// if it waits for this P.
			if r.waiter != nil {
				r.waiter.Poll()
			}
			runtime.Gosched()
		}
	}
}

func (r *Runner) afterDrain() {
	if r.after != nil {
		r.after()
	}
}

// resubmit hands the handler the chains an earlier back-end left in
// flight, as its inflight log names them, oldest first, and resumes the
// available ring after them: every entry before used index + their number
// was taken, and is either completed or one of them. It returns false if
// the log cannot be used (the ring then counts as broken).
func (r *Runner) resubmit() bool {
	if r.journal == nil {
		return true
	}
	used := r.q.UsedIdx()
	pending, err := r.journal.Pending(used)
	if err == nil && len(pending) > int(r.q.size) {
		err = fmt.Errorf("inflight log names %d heads for a ring of %d", len(pending), r.q.size)
	}
	if err != nil {
		r.log.Error("virtqueue broken, no longer served", "err", r.q.fail(err))
		return false
	}
	resume := used + uint16(len(pending))
	if resume != r.q.LastAvail() {
		r.log.Info("resuming after the requests the inflight log names", "used", used, "in_flight", len(pending), "avail", resume, "base_given", r.q.LastAvail())
	}
	r.q.resume(resume)
	for _, head := range pending {
		r.mu.Lock()
		if int(head) >= len(r.busy) || r.busy[head] {
			r.mu.Unlock()
			r.log.Error("virtqueue broken, no longer served", "err", r.q.fail(fmt.Errorf("inflight log: head %d invalid or listed twice", head)))
			return false
		}
		r.busy[head] = true
		r.inflight++
		r.mu.Unlock()
		// The slot is ours now; read guest memory outside the lock.
		c := &r.chains[head]
		if err := r.q.ReadChain(head, c); err != nil { // cannot fail: head < size
			panic(err)
		}
		r.log.Info("resubmitting request left in flight", "head", head)
		r.handle(c)
	}
	return true
}

// drain pops every available chain and hands it to the handler. It returns
// false when the runner must stop consuming (stop requested, ring broken).
func (r *Runner) drain() bool {
	for !r.stopping.Load() {
		ok, err := r.q.Pop(&r.scratch)
		if err != nil {
			r.log.Error("virtqueue broken, no longer served", "err", err)
			return false
		}
		if !ok {
			return true
		}
		head := r.scratch.Head
		r.mu.Lock()
		if r.busy[head] {
			r.mu.Unlock()
			r.log.Error("virtqueue broken, no longer served", "err", r.q.fail(fmt.Errorf("head %d made available while in flight", head)))
			return false
		}
		r.busy[head] = true
		r.inflight++
		if r.journal != nil {
			r.journal.Popped(head)
		}
		if crashHook != nil {
			crashHook(CrashFetched)
		}
		// Swap rather than copy so that both keep their own segment
		// storage.
		r.chains[head], r.scratch = r.scratch, r.chains[head]
		c := &r.chains[head]
		r.mu.Unlock()
		if c.Err != nil {
			r.log.Debug("malformed descriptor chain", "head", head, "err", c.Err)
		}
		r.handle(c)
	}
	return false
}

// wait sleeps until the driver kicks, Kick or Stop is called, or (without
// a kick eventfd) the poll interval passes.
func (r *Runner) wait() {
	timeout := -1
	if len(r.pollFds) == 1 {
		timeout = PollInterval
	}
	if r.waiter != nil && timeout < 0 {
		r.waitFds, r.waitEvs = r.waitFds[:0], r.waitEvs[:0]
		for _, p := range r.pollFds {
			r.waitFds = append(r.waitFds, p.Fd)
			r.waitEvs = append(r.waitEvs, 0)
		}
		if err := r.waiter.Wait(r.waitFds, r.waitEvs); err != nil {
			// The engine starts nothing more after a failed wait; what
			// it has in flight completes before the runner sleeps
			// without it.
			r.log.Error("wait in the I/O engine, polling the kick eventfd instead", "err", err)
			r.waiter.Settle()
			r.waiter = nil
			return
		}
		for i := range r.pollFds {
			r.pollFds[i].Revents = r.waitEvs[i]
		}
		r.afterWait()
		return
	}
	for {
		_, err := unix.Poll(r.pollFds, timeout)
		if err == nil {
			break
		}
		if err != unix.EINTR {
			r.log.Error("poll kick eventfd", "err", err)
			r.pollFds = r.pollFds[:1]
			return
		}
	}
	r.afterWait()
}

// afterWait resets the eventfds that woke the runner and drops a kick
// eventfd that failed.
func (r *Runner) afterWait() {
	for i := range r.pollFds {
		ev := r.pollFds[i].Revents
		if ev&unix.POLLIN != 0 {
			// Reset the eventfd counter; EAGAIN just means another
			// reader got there (cannot happen) or a spurious wakeup.
			_, _ = unix.Read(int(r.pollFds[i].Fd), r.readBuf[:])
		}
		if i > 0 && ev&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			r.log.Error("kick eventfd failed, polling the ring instead", "revents", ev)
			r.pollFds = r.pollFds[:1]
			break
		}
	}
}

// Kick wakes the runner to look at the ring (for transports that forward
// kicks as messages rather than through an eventfd).
func (r *Runner) Kick() {
	r.wakeMu.Lock()
	defer r.wakeMu.Unlock()
	if r.wakeFd >= 0 {
		_, _ = unix.Write(r.wakeFd, one[:])
	}
}

// Complete puts head on the used ring with written bytes and interrupts
// the driver if it asked for that. It may be called from any goroutine;
// like everything that touches guest memory, it faults if the front-end
// took the memory away, so callers run with debug.SetPanicOnFault and
// RecoverFault, and call Abandon for the request when that happens.
func (r *Runner) Complete(head uint16, written uint32) {
	if r.complete(head, written, true) {
		r.signal()
	}
}

// CompleteDeferred is Complete without the interrupt: the caller promises
// that Notify (or another Complete) follows, so that a burst of
// completions costs one interrupt.
func (r *Runner) CompleteDeferred(head uint16, written uint32) {
	r.complete(head, written, false)
}

func (r *Runner) complete(head uint16, written uint32, check bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if int(head) >= len(r.busy) || !r.busy[head] {
		// A device bug, not a driver's: never corrupt the ring for it.
		r.log.Error("completion of a head not in flight", "head", head)
		return false
	}
	if !r.faulted { // after a fault the ring may be gone
		if r.journal != nil {
			r.journal.Pushing(head)
		}
		r.q.logChain(&r.chains[head])
		if crashHook != nil {
			r.q.putUsed(head, written)
			crashHook(CrashUsedElement)
		}
		r.q.Push(head, written)
		if crashHook != nil {
			crashHook(CrashUsedIndex)
		}
		if r.journal != nil {
			r.journal.Pushed(head, r.q.UsedIdx())
		}
	}
	r.busy[head] = false
	r.inflight--
	if r.inflight == 0 && r.idle != nil {
		close(r.idle)
		r.idle = nil
	}
	return check && !r.faulted && r.q.NeedsNotify()
}

// Withdraw gives head back without completing it: its request gave up
// (it waited in the storage while the queue stops) having changed nothing
// and written nothing to the driver. It stays recorded in the inflight
// log and is resubmitted when the ring starts again; Stop no longer waits
// for it. Only a runner with a log may withdraw: without one the request
// would be lost to the driver.
func (r *Runner) Withdraw(head uint16) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.journal == nil {
		r.log.Error("request withdrawn without an inflight log: the driver never sees it complete", "head", head)
	} else {
		r.log.Info("request withdrawn; it runs again when the ring starts", "head", head)
	}
	if int(head) >= len(r.busy) || !r.busy[head] {
		return
	}
	r.busy[head] = false
	r.inflight--
	if r.inflight == 0 && r.idle != nil {
		close(r.idle)
		r.idle = nil
	}
}

// Abandon gives up on head without touching the rings, after guest memory
// became inaccessible while serving it (see RecoverFault). The queue stops
// being served; Stop no longer waits for head.
func (r *Runner) Abandon(head uint16, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log.Error("request abandoned", "head", head, "err", err)
	r.faulted = true
	if int(head) >= len(r.busy) || !r.busy[head] {
		return
	}
	r.busy[head] = false
	r.inflight--
	if r.inflight == 0 && r.idle != nil {
		close(r.idle)
		r.idle = nil
	}
}

// RecoverFault turns the value of recover() into an error if it is a
// memory fault (from debug.SetPanicOnFault) and re-panics anything else:
// only faults on guest memory are expected, other panics are bugs.
func RecoverFault(p any) error {
	if p == nil {
		return nil
	}
	if re, ok := p.(runtime.Error); ok {
		// Low addresses are nil dereferences: bugs, not guest memory.
		if a, ok := re.(interface{ Addr() uintptr }); ok && a.Addr() >= 1<<16 {
			return fmt.Errorf("guest memory fault: %w", re)
		}
	}
	panic(p)
}

// Notify interrupts the driver if chains completed since the last
// interrupt call for it (honouring EVENT_IDX and NO_INTERRUPT).
func (r *Runner) Notify() {
	if r.needsNotify() {
		r.signal()
	}
}

func (r *Runner) needsNotify() bool {
	r.mu.Lock()
	defer r.mu.Unlock() // also when reading used_event faults
	return !r.faulted && r.q.NeedsNotify()
}

// notifySafely is Notify for goroutines that do not expect guest memory
// faults (the transport's, in Stop).
func (r *Runner) notifySafely() {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if err := RecoverFault(recover()); err != nil {
			r.mu.Lock()
			r.faulted = true
			r.mu.Unlock()
			r.log.Error("final notification failed", "err", err)
		}
	}()
	r.Notify()
}

func (r *Runner) signal() {
	t := r.call.Load()
	if t == nil {
		return
	}
	// An error means the transport closed the fd after swapping it out;
	// the new fd has had its interrupt.
	if err := t.Signal(); err != nil && !errors.Is(err, os.ErrClosed) {
		r.log.Warn("signal call eventfd", "err", err)
	}
}

// InFlight is the number of chains popped and not yet completed.
func (r *Runner) InFlight() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.inflight
}

// Err returns why the ring stopped being served (wrapping ErrNeedsReset),
// or nil.
func (r *Runner) Err() error {
	select {
	case <-r.done:
		return r.q.Broken()
	default:
		return nil
	}
}

// Stop stops taking chains, waits until every chain in flight has been
// completed, and returns the available index to resume from. If ctx ends
// first it returns ctx's error; Stop may then be called again.
func (r *Runner) Stop(ctx context.Context) (uint16, error) {
	r.stopOnce.Do(func() {
		r.stopping.Store(true)
		r.Kick()
	})
	if r.started {
		select {
		case <-r.done:
		case <-ctx.Done():
			return 0, fmt.Errorf("stop queue: %w", ctx.Err())
		}
	}
	r.mu.Lock()
	var idle chan struct{}
	if r.inflight > 0 {
		if r.idle == nil {
			r.idle = make(chan struct{})
		}
		idle = r.idle
	}
	r.mu.Unlock()
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
			return 0, fmt.Errorf("stop queue: %d requests still in flight: %w", r.InFlight(), ctx.Err())
		}
	}
	r.notifySafely()
	r.wakeMu.Lock()
	if r.wakeFd >= 0 {
		unix.Close(r.wakeFd)
		r.wakeFd = -1
	}
	r.wakeMu.Unlock()
	return r.q.LastAvail(), nil
}
