package thin

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
)

// asyncIO serves one request at a time through a volume's AsyncQueue, as
// the virtio-blk device does: declined requests go to the synchronous
// calls. It counts both, so tests can tell that the queue did the work.
type asyncIO struct {
	v                 *Volume
	q                 blockdev.AsyncQueue
	done              chan blockdev.Completion
	started, declined int
}

func openAsyncIO(t testing.TB, v *Volume) *asyncIO {
	t.Helper()
	a := &asyncIO{v: v, done: make(chan blockdev.Completion, 64)}
	q, err := v.OpenQueue(8, func(cs []blockdev.Completion) {
		for _, c := range cs {
			a.done <- c
		}
	})
	if err != nil {
		t.Fatalf("open queue: %v", err)
	}
	a.q = q
	return a
}

func (a *asyncIO) wait() error {
	select {
	case c := <-a.done:
		if c.Tag != 3 {
			return errors.New("completion for a tag never started")
		}
		return c.Err
	case <-time.After(30 * time.Second):
		return errors.New("no completion within 30s")
	}
}

func (a *asyncIO) ReadAt(bufs [][]byte, off int64) error {
	if err := a.q.ReadAt(3, bufs, off); err != nil {
		a.declined++
		return a.v.ReadAt(bufs, off)
	}
	a.started++
	a.q.Submit()
	return a.wait()
}

func (a *asyncIO) WriteAt(bufs [][]byte, off int64) error {
	if err := a.q.WriteAt(3, bufs, off); err != nil {
		a.declined++
		return a.v.WriteAt(bufs, off)
	}
	a.started++
	a.q.Submit()
	return a.wait()
}

// TestModelAsync is TestModel with every read and write going through
// asynchronous queues (on the crashable files: the queue's goroutine
// does their I/O), so the ordering rules are checked across crashes for
// that path too.
func TestModelAsync(t *testing.T) {
	started, declined := useAsyncModelIO(t)
	steps := forModelSeeds(t, 1000, runModel)
	t.Logf("requests started asynchronously: %d, declined (served synchronously): %d", *started, *declined)
	if *started < 3**declined || *started < steps/2 {
		t.Fatalf("only %d requests went through the queue (%d declined)", *started, *declined)
	}
}

// useAsyncModelIO routes the model's reads and writes through
// asynchronous queues until the test ends, counting the requests the
// queues started and declined.
func useAsyncModelIO(t *testing.T) (started, declined *int) {
	started, declined = new(int), new(int)
	modelIO = func(md *model, v *Volume) volumeIO {
		if md.asyncs == nil {
			md.asyncs = map[*Volume]*asyncIO{}
		}
		a := md.asyncs[v]
		if a == nil {
			a = openAsyncIO(md.t, v)
			md.asyncs[v] = a
		}
		return a
	}
	modelClose = func(md *model) {
		for _, a := range md.asyncs {
			a.q.Close()
			*started += a.started
			*declined += a.declined
		}
		md.asyncs = nil
	}
	t.Cleanup(func() { modelIO, modelClose = nil, nil })
	return started, declined
}

// realPool makes a pool on real files (io_uring on its data file).
func realPool(t testing.TB, blocks uint64, bs uint32, o OpenOptions) *Pool {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pool")
	if err := Create(dir, CreateOptions{Size: blocks * uint64(bs), BlockSize: bs}); err != nil {
		t.Fatal(err)
	}
	p, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	if _, ok := p.data.(interface{ fd() int }); !ok {
		t.Fatal("a real pool's data file has no descriptor")
	}
	return p
}

// TestAsyncAgainstModelOnRealPool drives a pool on real files through
// io_uring: random reads and writes of every shape (partial, multi-block,
// scatter-gather, unaligned to blocks), discards and flushes between
// them so that freed blocks are reused (their first partial write must
// be padded with zeros unless the block was punched: both happen, as
// punching is switched on and off at random), compared with a byte
// model.
func TestAsyncAgainstModelOnRealPool(t *testing.T) {
	const bs = 16 * kib
	o := quietOpts()
	o.MaxPending = 8
	// Raise the zero mark often, so that both padded and unpadded first
	// writes happen.
	tune := defaultTuning()
	tune.zeroStep = 2
	o.tuning = &tune
	p := realPool(t, 24, bs, o)
	const volSize = 32 * bs
	v := mustVolume(t, p, "v", volSize)
	a := openAsyncIO(t, v)
	defer a.q.Close()
	want := make([]byte, volSize)
	rng := rand.New(rand.NewPCG(7, 7))
	mapped := map[int64]bool{}
	for step := range 3000 {
		off := rng.Int64N(volSize/512) * 512
		n := min(int64(1+rng.IntN(3*bs/512))*512, volSize-off)
		switch r := rng.IntN(10); {
		case r < 4:
			need := 0
			for b := off / bs; b <= (off+n-1)/bs; b++ {
				if !mapped[b] {
					need++
				}
			}
			if need > 0 && len(mapped)+need > 20 {
				continue // keep clear of ErrNoSpace (the model does not count releasing blocks)
			}
			buf := make([]byte, n)
			for i := range buf {
				buf[i] = byte(step*7 + i/512 + 1)
			}
			cut := rng.Int64N(n/512+1) * 512
			if err := a.WriteAt([][]byte{buf[:cut], nil, buf[cut:]}, off); err != nil {
				t.Fatalf("step %d: write %d+%d: %v", step, off, n, err)
			}
			copy(want[off:], buf)
			for b := off / bs; b <= (off+n-1)/bs; b++ {
				mapped[b] = true
			}
		case r < 8:
			got := make([]byte, n)
			cut := rng.Int64N(n/512+1) * 512
			for i := range got {
				got[i] = 0xee // unmapped blocks must be cleared
			}
			if err := a.ReadAt([][]byte{got[:cut], got[cut:]}, off); err != nil {
				t.Fatalf("step %d: read %d+%d: %v", step, off, n, err)
			}
			if !bytes.Equal(got, want[off:off+n]) {
				t.Fatalf("step %d: read %d+%d differs from what was written", step, off, n)
			}
		case r < 9:
			if err := v.Discard(off, n); err != nil {
				t.Fatalf("step %d: discard: %v", step, err)
			}
			clear(want[off : off+n])
			for b := off / bs; b <= (off+n-1)/bs; b++ {
				if off <= b*bs && off+n >= (b+1)*bs {
					delete(mapped, b)
				}
			}
		default:
			p.noPunch.Store(rng.IntN(2) == 0)
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p) // runs Check too
	t.Logf("started %d, declined %d", a.started, a.declined)
	if a.started < 10*a.declined {
		t.Fatalf("only %d of %d requests went through io_uring", a.started, a.started+a.declined)
	}
}

// TestAsyncConcurrentQueues runs several queues on two volumes at once,
// each keeping many requests in flight, with discards, flushes and
// background commits racing them, and checks every byte at the end. Run
// it with -race.
func TestAsyncConcurrentQueues(t *testing.T) {
	const (
		bs      = 4 * kib
		workers = 3
		own     = 16 // blocks per worker
		depth   = 8
	)
	o := quietOpts()
	o.FlushInterval = 2 * time.Millisecond
	o.MaxPending = 4
	p := realPool(t, 2*workers*own+8, bs, o)
	vols := []*Volume{mustVolume(t, p, "a", workers*own*bs), mustVolume(t, p, "b", workers*own*bs)}
	var wg sync.WaitGroup
	errc := make(chan error, 2*workers)
	for vi, v := range vols {
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errc <- asyncWorker(v, int64(w*own)*bs, own, bs, depth, uint64(vi*10+w))
			}()
		}
	}
	stop := make(chan struct{})
	flushed := make(chan struct{})
	go func() {
		defer close(flushed)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				if err := p.Flush(); err != nil {
					errc <- err
					return
				}
			}
		}
	}()
	wg.Wait()
	close(stop)
	<-flushed
	close(errc)
	for err := range errc {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	checkAccounting(t, p) // runs Check too
}

// asyncWorker owns blocks [base, base+blocks*bs) of v: it writes, reads
// back and discards there through one queue with up to depth requests in
// flight (requests in flight never overlap), and finally checks it all.
func asyncWorker(v *Volume, base int64, blocks int, bs int64, depth int, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, 1))
	want := make([]byte, int64(blocks)*bs)
	type req struct {
		read       bool
		off        int64
		buf        []byte
		inflight   bool
		sync       bool
		syncResult error
	}
	reqs := make([]req, depth)
	done := make(chan blockdev.Completion, depth)
	q, err := v.OpenQueue(depth, func(cs []blockdev.Completion) {
		for _, c := range cs {
			done <- c
		}
	})
	if err != nil {
		return err
	}
	defer q.Close()
	busy := map[int64]bool{} // blocks with a request in flight
	finish := func(c blockdev.Completion) error {
		r := &reqs[c.Tag]
		if c.Err != nil {
			return c.Err
		}
		if r.read && !bytes.Equal(r.buf, want[r.off-base:r.off-base+int64(len(r.buf))]) {
			return errors.New("async read differs from what was written")
		}
		for b := r.off / bs; b <= (r.off+int64(len(r.buf))-1)/bs; b++ {
			delete(busy, b)
		}
		r.inflight = false
		return nil
	}
	started, declined := 0, 0
	for i := range 400 {
		tag := -1
		for t := range reqs {
			if !reqs[t].inflight {
				tag = t
				break
			}
		}
		if tag < 0 {
			q.Submit()
			if err := finish(<-done); err != nil {
				return err
			}
			continue
		}
		off := base + rng.Int64N(int64(blocks)*bs/512)*512
		n := min(int64(1+rng.IntN(int(2*bs/512)))*512, base+int64(blocks)*bs-off)
		clash := false
		for b := off / bs; b <= (off+n-1)/bs; b++ {
			clash = clash || busy[b]
		}
		if clash {
			continue
		}
		r := &reqs[tag]
		*r = req{read: rng.IntN(2) == 0, off: off, buf: make([]byte, n), inflight: true}
		if rng.IntN(10) == 0 {
			// A discard, synchronously (requests in flight elsewhere).
			// Like the device's runner, never block with requests
			// started but not submitted: they hold the I/O gate, and a
			// commit this call may run would wait for them.
			q.Submit()
			r.inflight = false
			if err := v.Discard(off, n); err != nil {
				return err
			}
			clear(want[off-base : off-base+n])
			continue
		}
		var err error
		if r.read {
			err = q.ReadAt(uint16(tag), [][]byte{r.buf}, off)
		} else {
			for j := range r.buf {
				r.buf[j] = byte(i + j/512 + 1)
			}
			copy(want[off-base:], r.buf)
			err = q.WriteAt(uint16(tag), [][]byte{r.buf}, off)
		}
		if err != nil {
			declined++
			r.inflight = false
			q.Submit() // as above
			if r.read {
				err = v.ReadAt([][]byte{r.buf}, off)
				if err == nil && !bytes.Equal(r.buf, want[off-base:off-base+n]) {
					err = errors.New("sync read differs from what was written")
				}
			} else {
				err = v.WriteAt([][]byte{r.buf}, off)
			}
			if err != nil {
				return err
			}
			continue
		}
		started++
		for b := off / bs; b <= (off+n-1)/bs; b++ {
			busy[b] = true
		}
		if rng.IntN(3) == 0 {
			q.Submit()
		}
	}
	q.Submit()
	for t := range reqs {
		for reqs[t].inflight {
			if err := finish(<-done); err != nil {
				return err
			}
		}
	}
	got := make([]byte, len(want))
	if err := v.ReadAt([][]byte{got}, base); err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return errors.New("final contents differ from what was written")
	}
	if started < declined {
		return errors.New("most requests were declined")
	}
	return nil
}

// TestAsyncCloseWaitsAndPoolClose: Close of a queue waits for requests in
// flight; a queue of a closed pool declines everything (the synchronous
// path reports why).
func TestAsyncCloseWaitsAndPoolClose(t *testing.T) {
	p := realPool(t, 16, 4*kib, quietOpts())
	v := mustVolume(t, p, "v", 64*kib)
	var mu sync.Mutex
	var got []blockdev.Completion
	q, err := v.OpenQueue(4, func(cs []blockdev.Completion) {
		mu.Lock()
		got = append(got, cs...)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	// The first write to a new pool raises its zero mark (a commit): the
	// queue leaves that to the synchronous path.
	write(t, v, 56*kib, make([]byte, 512))
	bufs := make([][]byte, 4)
	for i := range bufs {
		bufs[i] = bytes.Repeat([]byte{byte(i + 1)}, 8*kib)
		if err := q.WriteAt(uint16(i), bufs[i:i+1], int64(i)*8*kib); err != nil {
			t.Fatalf("write %d declined: %v", i, err)
		}
	}
	q.Submit()
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(got) != 4 {
		t.Fatalf("Close returned with %d of 4 completions", len(got))
	}
	for _, c := range got {
		if c.Err != nil {
			t.Fatal(c.Err)
		}
	}
	mu.Unlock()
	for i := range bufs {
		if r := read(t, v, int64(i)*8*kib, 8*kib); !bytes.Equal(r, bufs[i]) {
			t.Fatalf("write %d not there", i)
		}
	}
	q2, err := v.OpenQueue(2, func([]blockdev.Completion) { t.Error("completion after the pool closed") })
	if err != nil {
		t.Fatal(err)
	}
	defer q2.Close()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q2.ReadAt(0, [][]byte{make([]byte, 512)}, 0); err == nil {
		t.Fatal("read of a closed pool started")
	}
	if err := q2.WriteAt(1, [][]byte{make([]byte, 512)}, 0); err == nil {
		t.Fatal("write to a closed pool started")
	}
}
