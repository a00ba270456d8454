package virtio_test

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/eventfd"

	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// runnerHarness runs a Runner whose handler passes chains to the test.
type runnerHarness struct {
	d      *virtiotest.Driver
	r      *virtio.Runner
	chains chan *virtio.Chain
}

func newRunner(t *testing.T, size uint16, features uint64, eventfds bool, handle func(r *virtio.Runner, c *virtio.Chain)) *runnerHarness {
	t.Helper()
	return newPollingRunner(t, size, features, eventfds, 0, handle)
}

// newPollingRunner is newRunner with RunnerConfig.Poll set.
func newPollingRunner(t *testing.T, size uint16, features uint64, eventfds bool, poll time.Duration, handle func(r *virtio.Runner, c *virtio.Chain)) *runnerHarness {
	t.Helper()
	mem := virtiotest.NewMemory(memBase, memSize)
	h := &runnerHarness{d: virtiotest.NewDriver(mem, size, features), chains: make(chan *virtio.Chain, size)}
	if eventfds {
		if err := h.d.WithEventfds(); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	h.r, err = virtio.NewRunner(virtio.RunnerConfig{
		Setup: h.d.Setup(0),
		Poll:  poll,
		Handle: func(c *virtio.Chain) {
			if handle != nil {
				handle(h.r, c)
				return
			}
			h.chains <- c
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	h.r.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := h.r.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		h.d.Close()
	})
	return h
}

// waitUsed waits until n used elements are available and returns them.
func (h *runnerHarness) waitUsed(t *testing.T, n int) []virtiotest.Used {
	t.Helper()
	var got []virtiotest.Used
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d completions after 5s", len(got), n)
		}
		if u, ok := h.d.PopUsed(); ok {
			got = append(got, u)
			continue
		}
		time.Sleep(100 * time.Microsecond)
	}
	return got
}

func TestRunnerAsyncCompletion(t *testing.T) {
	h := newRunner(t, 32, allFeat, true, nil)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a device completing out of order, elsewhere
		defer wg.Done()
		var held []*virtio.Chain
		for c := range h.chains {
			held = append(held, c)
			if len(held) == 10 {
				for i := len(held) - 1; i >= 0; i-- {
					h.r.Complete(held[i].Head, uint32(held[i].Head)+100)
				}
				return
			}
		}
	}()
	heads := map[uint16]bool{}
	for range 10 {
		heads[h.d.AddChain(h.d.AllocBuf(16, false, nil), h.d.AllocBuf(8, true, nil))] = true
	}
	if err := h.d.KickNow(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for _, u := range h.waitUsed(t, 10) {
		if !heads[uint16(u.ID)] || u.Len != u.ID+100 {
			t.Fatalf("used %+v", u)
		}
		delete(heads, uint16(u.ID))
	}
	if ok, _ := h.d.WaitCall(1000); !ok {
		t.Fatal("driver not interrupted")
	}
	if h.r.InFlight() != 0 {
		t.Fatalf("in flight %d", h.r.InFlight())
	}
}

// One pass of synchronous completions costs one interrupt, and EVENT_IDX
// suppresses interrupts the driver did not ask for.
func TestRunnerInterruptsPerPass(t *testing.T) {
	h := newRunner(t, 64, allFeat, true, func(r *virtio.Runner, c *virtio.Chain) {
		r.CompleteDeferred(c.Head, 0)
	})
	// batch submits 20 chains with one kick and counts the interrupts
	// that follow.
	batch := func(expect uint64) uint64 {
		t.Helper()
		for range 20 {
			h.d.AddChain(h.d.AllocBuf(16, false, nil))
		}
		h.d.KickNow()
		h.waitUsed(t, 20)
		var n uint64
		for start := time.Now(); n < expect && time.Since(start) < 5*time.Second; time.Sleep(time.Millisecond) {
			n += h.d.CallCount()
		}
		time.Sleep(20 * time.Millisecond) // room for a wrong extra one
		return n + h.d.CallCount()
	}
	if n := batch(1); n != 1 {
		t.Fatalf("first pass: %d interrupts, want 1", n)
	}
	// used_event stays 0, behind: no interrupt wanted.
	if n := batch(0); n != 0 {
		t.Fatalf("used_event behind: %d interrupts, want 0", n)
	}
	h.d.SetUsedEvent(h.d.UsedIdx())
	if n := batch(1); n != 1 {
		t.Fatalf("used_event current: %d interrupts, want 1", n)
	}
	// Notifications re-enabled at the end of the pass: avail_event is the
	// next entry.
	if ev := h.d.AvailEvent(); ev != h.d.AvailIdx() {
		t.Fatalf("avail_event %d, want %d", ev, h.d.AvailIdx())
	}
}

func TestRunnerNoInterruptFlag(t *testing.T) {
	h := newRunner(t, 16, 1<<virtio.FeatureVersion1, true, func(r *virtio.Runner, c *virtio.Chain) {
		r.Complete(c.Head, 0)
	})
	h.d.SetAvailFlags(virtio.AvailFlagNoInterrupt)
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.KickNow()
	h.waitUsed(t, 1)
	time.Sleep(10 * time.Millisecond)
	if n := h.d.CallCount(); n != 0 {
		t.Fatalf("NO_INTERRUPT: %d interrupts", n)
	}
	h.d.SetAvailFlags(0)
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.KickNow()
	h.waitUsed(t, 1)
	if ok, _ := h.d.WaitCall(1000); !ok {
		t.Fatal("no interrupt without NO_INTERRUPT")
	}
	// The interrupt may come from the completion, before the pass ends
	// and turns kicks back on: wait for the runner to go idle.
	for deadline := time.Now().Add(time.Second); h.d.UsedFlags() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("used flags %d after the pass, want notifications on", h.d.UsedFlags())
		}
	}
}

func TestRunnerWithoutKickPolls(t *testing.T) {
	h := newRunner(t, 8, allFeat, false, func(r *virtio.Runner, c *virtio.Chain) {
		r.Complete(c.Head, 7)
	})
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	if u := h.waitUsed(t, 1); u[0].Len != 7 {
		t.Fatalf("used %+v", u)
	}
	// Kick() (a VRING_KICK message) also wakes it.
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.r.Kick()
	h.waitUsed(t, 1)
}

func TestRunnerStopWaitsAndResumes(t *testing.T) {
	h := newRunner(t, 8, allFeat, true, nil)
	for range 3 {
		h.d.AddChain(h.d.AllocBuf(16, false, nil))
	}
	h.d.KickNow()
	var held []*virtio.Chain
	for range 3 {
		held = append(held, <-h.chains)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	if _, err := h.r.Stop(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("stop with 3 in flight: %v", err)
	}
	// Stopped: new chains are not taken.
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.KickNow()
	time.Sleep(10 * time.Millisecond)
	select {
	case c := <-h.chains:
		t.Fatalf("chain %d taken after stop", c.Head)
	default:
	}
	for _, c := range held {
		h.r.Complete(c.Head, 0)
	}
	last, err := h.r.Stop(context.Background())
	if err != nil || last != 3 {
		t.Fatalf("stop: %d, %v", last, err)
	}
	h.waitUsed(t, 3)
}

func TestRunnerHeadReusedInFlight(t *testing.T) {
	h := newRunner(t, 8, allFeat, true, nil)
	head := h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.Publish(head) // the same head again, still in flight
	h.d.KickNow()
	<-h.chains
	deadline := time.Now().Add(5 * time.Second)
	for h.r.Err() == nil {
		if time.Now().After(deadline) {
			t.Fatal("runner did not stop")
		}
		time.Sleep(time.Millisecond)
	}
	if !errors.Is(h.r.Err(), virtio.ErrNeedsReset) {
		t.Fatalf("err %v", h.r.Err())
	}
	h.r.Complete(head, 0)
}

// A driver that honours the device's kick suppression (NO_NOTIFY or
// avail_event) only kicks when asked to. If the runner did not look at the
// ring again after re-enabling notifications, some chains would never be
// served.
func TestRunnerKickSuppressionStress(t *testing.T) {
	for name, feat := range map[string]uint64{"event idx": allFeat, "flags": 1 << virtio.FeatureVersion1} {
		for _, poll := range []time.Duration{0, 20 * time.Microsecond} {
			t.Run(fmt.Sprintf("%s/poll=%v", name, poll), func(t *testing.T) {
				kickSuppressionStress(t, feat, poll)
			})
		}
	}
}

// kickSuppressionStress sends bursts, kicking only when the ring asks for
// it, and completes out of order: no chain may be left unserved (with
// polling: also when the poll window ends just as a chain arrives).
func kickSuppressionStress(t *testing.T, feat uint64, poll time.Duration) {
	{
		{
			h := newPollingRunner(t, 16, feat, true, poll, func(r *virtio.Runner, c *virtio.Chain) {
				go r.Complete(c.Head, 0) // complete elsewhere, in any order
			})
			buf := h.d.AllocBuf(16, false, nil)
			const total = 3000
			submitted, completed, kicks := 0, 0, 0
			inRing := 0
			deadline := time.Now().Add(20 * time.Second)
			for completed < total {
				if time.Now().After(deadline) {
					t.Fatalf("stalled: %d submitted, %d completed, %d kicks", submitted, completed, kicks)
				}
				old := h.d.AvailIdx()
				burst := 1 + submitted%5
				for k := 0; k < burst && inRing < 16 && submitted < total; k++ {
					h.d.AddChain(buf)
					submitted++
					inRing++
				}
				if h.d.AvailIdx() != old && h.d.NeedKick(old) {
					h.d.KickNow()
					kicks++
				}
				for {
					if _, ok := h.d.PopUsed(); !ok {
						break
					}
					completed++
					inRing--
				}
				if inRing == 16 || submitted == total {
					h.d.SetUsedEvent(h.d.UsedIdx())
					if h.d.UsedIdx() == h.d.AvailIdx() {
						continue
					}
					h.d.WaitCall(2)
				}
			}
			t.Logf("%d chains, %d kicks", total, kicks)
		}
	}
}

// TestRunnerPolls: with Poll set, the runner serves chains the driver adds
// without kicking while it polls, and asks for kicks again once the poll
// time is up. Without polling the unkicked chain would wait forever.
func TestRunnerPolls(t *testing.T) {
	for name, feat := range map[string]uint64{"event idx": allFeat, "flags": 1 << virtio.FeatureVersion1} {
		t.Run(name, func(t *testing.T) {
			const poll = 300 * time.Millisecond
			h := newPollingRunner(t, 8, feat, true, poll, func(r *virtio.Runner, c *virtio.Chain) {
				r.Complete(c.Head, 3)
			})
			buf := h.d.AllocBuf(16, false, nil)
			old := h.d.AvailIdx()
			h.d.AddChain(buf)
			if !h.d.NeedKick(old) {
				t.Fatalf("first chain: no kick asked for")
			}
			h.d.KickNow()
			start := time.Now()
			h.waitUsed(t, 1)
			// Within the poll time: no kick asked for, none sent, served.
			old = h.d.AvailIdx()
			h.d.AddChain(buf)
			kick := h.d.NeedKick(old)
			if time.Since(start) < poll/2 && kick {
				t.Errorf("kick asked for %v after the last chain, while polling for %v", time.Since(start), poll)
			}
			if u := h.waitUsed(t, 1); u[0].Len != 3 {
				t.Fatalf("used %+v", u)
			}
			// After the poll time the runner sleeps and asks for kicks
			// again (waited for: a loaded machine may run it late).
			kicksOn := func() bool {
				if feat&(1<<virtio.FeatureEventIdx) != 0 {
					return h.d.AvailEvent() == h.d.AvailIdx()
				}
				return h.d.UsedFlags()&virtio.UsedFlagNoNotify == 0
			}
			for deadline := time.Now().Add(10 * time.Second); !kicksOn(); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("kicks still off 10 s after the last chain (poll time %v)", poll)
				}
			}
			old = h.d.AvailIdx()
			h.d.AddChain(buf)
			if !h.d.NeedKick(old) {
				t.Fatalf("no kick asked for after the poll time")
			}
			h.d.KickNow()
			h.waitUsed(t, 1)
		})
	}
}

// The eventfds are shared with the front-end (QEMU reads its notifiers
// with non-blocking reads): the runner must leave their mode alone.
func TestRunnerKeepsEventfdsNonblocking(t *testing.T) {
	h := newRunner(t, 8, allFeat, true, func(r *virtio.Runner, c *virtio.Chain) { r.Complete(c.Head, 0) })
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.KickNow()
	h.waitUsed(t, 1)
	if _, err := h.r.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if nb, err := h.d.EventfdsNonblocking(); err != nil || !nb {
		t.Fatalf("eventfds switched to blocking mode (%v)", err)
	}
}

// fakeJournal is an in-memory InflightLog following vhost-user's
// split-ring procedure (counters for order, last batch reconciliation).
type fakeJournal struct {
	mu        sync.Mutex
	inflight  map[uint16]uint64 // head -> submission counter
	counter   uint64
	lastBatch int // head being pushed, -1 when none
	usedIdx   uint16
	calls     []string
}

func newFakeJournal() *fakeJournal {
	return &fakeJournal{inflight: map[uint16]uint64{}, lastBatch: -1}
}

func (j *fakeJournal) Pending(usedIdx uint16) ([]uint16, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.lastBatch >= 0 && usedIdx != j.usedIdx {
		// Published on the used ring but not cleared from the log.
		delete(j.inflight, uint16(j.lastBatch))
	}
	var heads []uint16
	for h := range j.inflight {
		heads = append(heads, h)
	}
	slices.SortFunc(heads, func(a, b uint16) int { return cmp.Compare(j.inflight[a], j.inflight[b]) })
	j.usedIdx = usedIdx
	return heads, nil
}

func (j *fakeJournal) Popped(head uint16) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.inflight[head] = j.counter
	j.counter++
	j.calls = append(j.calls, fmt.Sprintf("pop %d", head))
}

func (j *fakeJournal) Pushing(head uint16) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.lastBatch = int(head)
}

func (j *fakeJournal) Pushed(head uint16, usedIdx uint16) {
	j.mu.Lock()
	defer j.mu.Unlock()
	delete(j.inflight, head)
	j.usedIdx = usedIdx
	j.lastBatch = -1
	j.calls = append(j.calls, fmt.Sprintf("push %d", head))
}

// A back-end that stops with requests in flight (crash, upgrade) leaves
// them in the inflight log; the next one finishes them, oldest first,
// before taking new chains.
func TestRunnerResubmitsInflight(t *testing.T) {
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, 8, allFeat)
	j := newFakeJournal()
	s := d.Setup(0)
	s.Inflight = j
	held := make(chan *virtio.Chain, 8)
	r1, err := virtio.NewRunner(virtio.RunnerConfig{Setup: s, Handle: func(c *virtio.Chain) { held <- c }})
	if err != nil {
		t.Fatal(err)
	}
	r1.Start()
	var heads []uint16
	for i := range 3 {
		heads = append(heads, d.AddChain(d.AllocBuf(16, false, []byte{byte(i)})))
	}
	r1.Kick()
	var chains []*virtio.Chain
	for range 3 {
		chains = append(chains, <-held)
	}
	r1.Complete(chains[1].Head, 1)
	// The first back-end dies with two requests in flight.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r1.Stop(ctx)

	s.LastAvail = 1 // what QEMU sends after a crash: the used index
	var got []uint16
	var mu sync.Mutex
	var r2 *virtio.Runner
	r2, err = virtio.NewRunner(virtio.RunnerConfig{Setup: s, Handle: func(c *virtio.Chain) {
		mu.Lock()
		got = append(got, c.Head)
		mu.Unlock()
		if c.Err != nil || c.ReadLen != 16 {
			t.Errorf("resubmitted chain %+v", c)
		}
		r2.Complete(c.Head, 2)
	}})
	if err != nil {
		t.Fatal(err)
	}
	r2.Start()
	used := map[uint32]bool{}
	deadline := time.Now().Add(5 * time.Second)
	for len(used) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("completions %v", used)
		}
		if u, ok := d.PopUsed(); ok {
			used[u.ID] = true
		} else {
			time.Sleep(time.Millisecond)
		}
	}
	if last, err := r2.Stop(context.Background()); err != nil || last != 3 {
		t.Fatalf("stop: %d %v", last, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(got, []uint16{heads[0], heads[2]}) {
		t.Fatalf("resubmitted %v, want %v oldest first", got, []uint16{heads[0], heads[2]})
	}
	if len(j.inflight) != 0 {
		t.Fatalf("log still holds %v", j.inflight)
	}
}

// SetCall moves interrupts to a new call eventfd while requests are in
// flight; the old one may be closed as soon as SetCall returns.
func TestRunnerSetCallWhileRunning(t *testing.T) {
	h := newRunner(t, 8, allFeat&^(1<<virtio.FeatureEventIdx), true, nil)
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.KickNow()
	c := <-h.chains
	newCall, err := eventfd.New()
	if err != nil {
		t.Fatal(err)
	}
	defer newCall.Close()
	fd := newCall.Fd()
	if err := h.r.SetCall(newCall); err != nil {
		t.Fatal(err)
	}
	h.d.CallCount() // the swap's own interrupt, if any, went to the new fd
	var buf [8]byte
	unix.Read(fd, buf[:])
	h.r.Complete(c.Head, 0)
	if n := h.d.CallCount(); n != 0 {
		t.Fatalf("old call fd signalled %d times after the swap", n)
	}
	if _, err := unix.Read(fd, buf[:]); err != nil {
		t.Fatalf("new call fd not signalled: %v", err)
	}
	// A nil call fd drops interrupts.
	if err := h.r.SetCall(nil); err != nil {
		t.Fatal(err)
	}
	h.d.AddChain(h.d.AllocBuf(16, false, nil))
	h.d.KickNow()
	h.r.Complete((<-h.chains).Head, 0)
	if _, err := unix.Read(fd, buf[:]); err != unix.EAGAIN {
		t.Fatalf("interrupt after SetCall(nil): %v", err)
	}
}
