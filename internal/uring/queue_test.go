package uring

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/vio"
	"golang.org/x/sys/unix"
)

// queueHarness is a Queue on a real file, through the kernel ring or
// (fd < 0) through Sync on the reaper, collecting completions by tag.
type queueHarness struct {
	f        *os.File
	q        *Queue
	mu       sync.Mutex
	got      map[uint16]error
	syncs    []string // Sync calls
	finished []uint16 // Finish calls
}

func newQueueHarness(t *testing.T, kernel bool, size int64) *queueHarness {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	h := &queueHarness{f: f, got: map[uint16]error{}}
	fd := -1
	if kernel {
		fd = int(f.Fd())
	}
	h.q, err = NewQueue(QueueOptions{
		Depth: 8, Entries: 32, Fd: fd,
		Sync: func(op uint8, bufs [][]byte, off int64) error {
			h.mu.Lock()
			h.syncs = append(h.syncs, fmt.Sprintf("%d@%d", op, off))
			h.mu.Unlock()
			call := unix.Pwritev
			if op == OpReadv {
				call = unix.Preadv
			} else if op == OpFsync {
				return unix.Fdatasync(int(f.Fd()))
			}
			return vio.Vectored(bufs, off, func(iov [][]byte, off int64) (int, error) {
				return call(int(f.Fd()), iov, off)
			}, op == OpReadv)
		},
		Finish: func(tag uint16, err error) error {
			h.mu.Lock()
			h.finished = append(h.finished, tag)
			h.mu.Unlock()
			if err != nil {
				return fmt.Errorf("tag %d: %w", tag, err)
			}
			return nil
		},
		Done: func(cs []blockdev.Completion) {
			h.mu.Lock()
			defer h.mu.Unlock()
			for _, c := range cs {
				if _, dup := h.got[c.Tag]; dup {
					t.Errorf("tag %d completed twice", c.Tag)
				}
				h.got[c.Tag] = c.Err
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *queueHarness) wait(t *testing.T, tags ...uint16) map[uint16]error {
	t.Helper()
	for start := time.Now(); ; time.Sleep(time.Millisecond) {
		h.mu.Lock()
		all := true
		for _, tag := range tags {
			if _, ok := h.got[tag]; !ok {
				all = false
			}
		}
		if all {
			got := h.got
			h.got = map[uint16]error{}
			h.mu.Unlock()
			return got
		}
		h.mu.Unlock()
		if time.Since(start) > 10*time.Second {
			t.Fatalf("tags %v not all completed", tags)
		}
	}
}

// TestQueue runs requests of several submissions, inline completions,
// fdatasync and short transfers through both rings, and checks the bytes,
// the completions and the hooks.
func TestQueue(t *testing.T) {
	for _, kernel := range []bool{true, false} {
		t.Run(fmt.Sprintf("kernel=%v", kernel), func(t *testing.T) {
			h := newQueueHarness(t, kernel, 64<<10)
			q := h.q
			// Tag 1 writes three pieces: two contiguous ones that make one
			// submission, and one elsewhere.
			a, b, c := bytes.Repeat([]byte{1}, 512), bytes.Repeat([]byte{2}, 1024), bytes.Repeat([]byte{3}, 512)
			if !q.Begin(1) {
				t.Fatal("Begin(1)")
			}
			q.Add(OpWritev, 4096, a)
			q.Add(OpWritev, 4096+512, b)
			q.Add(OpWritev, 32768, c)
			if n := q.reqs[1].n; n != 2 {
				t.Fatalf("%d submissions, want 2 (contiguous pieces merge)", n)
			}
			if !q.Start() {
				t.Fatal("Start(1)")
			}
			// Tag 2 finished on the submitter; tag 3 an fdatasync.
			if !q.Begin(2) || !q.Room(1, 0) {
				t.Fatal("Begin(2)")
			}
			q.Complete(2, io.ErrNoProgress)
			if !q.Begin(3) {
				t.Fatal("Begin(3)")
			}
			q.AddFdatasync()
			if !q.Start() {
				t.Fatal("Start(3)")
			}
			q.Submit()
			got := h.wait(t, 1, 2, 3)
			if got[1] != nil || got[3] != nil || !errors.Is(got[2], io.ErrNoProgress) {
				t.Fatalf("completions %v", got)
			}
			want := make([]byte, 64<<10)
			copy(want[4096:], a)
			copy(want[4096+512:], b)
			copy(want[32768:], c)
			file := make([]byte, 64<<10)
			if _, err := h.f.ReadAt(file, 0); err != nil || !bytes.Equal(file, want) {
				t.Fatalf("file contents wrong (%v)", err)
			}

			// A read across the end of the file is short: the rest goes
			// through Sync, which fails, and Finish adds its context.
			h.syncs = nil
			into := make([]byte, 8192)
			if !q.Begin(4) {
				t.Fatal("Begin(4)")
			}
			q.Add(OpReadv, 64<<10-4096, into)
			if !q.Start() {
				t.Fatal("Start(4)")
			}
			q.Submit()
			got = h.wait(t, 4)
			if err := got[4]; !errors.Is(err, io.ErrUnexpectedEOF) || err.Error() != "tag 4: "+io.ErrUnexpectedEOF.Error() {
				t.Fatalf("short read: %v", err)
			}
			if kernel && (len(h.syncs) != 1 || h.syncs[0] != fmt.Sprintf("%d@%d", OpReadv, 64<<10)) {
				t.Fatalf("short read's rest: Sync calls %v", h.syncs)
			}
			if !bytes.Equal(into[:4096], want[64<<10-4096:]) {
				t.Fatal("the transferred part of the short read is wrong")
			}

			// Nothing is started for an empty request, a tag out of range
			// or more buffers than one request may have.
			if q.Begin(8) {
				t.Fatal("tag 8 of depth 8 begun")
			}
			q.Begin(5)
			if q.Start() {
				t.Fatal("empty request started")
			}
			q.Begin(5)
			for i := range vio.MaxIOV + 1 {
				q.Add(OpReadv, int64(i)*2, into[:1])
			}
			if q.Start() {
				t.Fatal("request of too many buffers started")
			}
			if len(q.reqs[5].subs[0].bufs) != 0 {
				t.Fatal("a request not started keeps its buffers")
			}
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			if len(h.finished) != 3 {
				t.Fatalf("Finish ran for tags %v, want the three with submissions", h.finished)
			}
		})
	}
}

// TestQueueCloseWaits: Close returns once every request has completed,
// also with a slow consumer, and an idle queue closes at once.
func TestQueueCloseWaits(t *testing.T) {
	for _, kernel := range []bool{true, false} {
		h := newQueueHarness(t, kernel, 1<<20)
		buf := make([]byte, 64<<10)
		for tag := range uint16(8) {
			h.q.Begin(tag)
			h.q.Add(OpWritev, int64(tag)*int64(len(buf)), buf)
			if !h.q.Start() {
				t.Fatalf("tag %d not started", tag)
			}
		}
		h.q.Submit()
		if err := h.q.Close(); err != nil {
			t.Fatal(err)
		}
		h.mu.Lock()
		if len(h.got) != 8 {
			t.Fatalf("kernel=%v: Close returned with %d of 8 completed", kernel, len(h.got))
		}
		h.mu.Unlock()
		idle := newQueueHarness(t, kernel, 4096)
		done := make(chan error)
		go func() { done <- idle.q.Close() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("kernel=%v: Close of an idle queue hangs", kernel)
		}
	}
}

// TestQueueInline: an inline queue has no goroutine of its own. Requests
// complete on the submitter, inside Submit, Wait and Settle; Wait sleeps
// until one of its eventfds fires, completing requests meanwhile, and
// reports which fired.
func TestQueueInline(t *testing.T) {
	// The ring has one issuing thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if h := newQueueHarness(t, false, 4096); h.q.Inline() {
		t.Fatal("a queue without a kernel ring went inline")
	}
	reaped := newQueueHarness(t, true, 4096)
	reaped.q.Submit()
	if reaped.q.Inline() {
		t.Fatal("a queue whose reaper runs went inline")
	}
	h := newQueueHarness(t, true, 1<<20)
	q := h.q
	if !q.Inline() {
		t.Fatal("Inline: false on a kernel ring")
	}
	// Completions must come from inside the submitter's calls: a reaper
	// would deliver them while inCall is false (and race on it).
	inCall := false
	var onDone func([]blockdev.Completion)
	done := q.opts.Done
	q.opts.Done = func(cs []blockdev.Completion) {
		if !inCall {
			t.Error("completion outside Submit, Wait and Settle")
		}
		done(cs)
		if onDone != nil {
			onDone(cs)
		}
	}
	call := func(f func()) {
		inCall = true
		f()
		inCall = false
	}
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i / 512)
	}
	for tag := range uint16(8) {
		q.Begin(tag)
		q.Add(OpWritev, int64(tag)*int64(len(buf)), buf)
		if !q.Start() {
			t.Fatalf("tag %d not started", tag)
		}
	}
	call(q.Submit)
	call(q.Settle)
	if got := h.wait(t, 0, 1, 2, 3, 4, 5, 6, 7); len(got) != 8 {
		t.Fatalf("completions %v", got)
	}

	efd := func() int32 {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return int32(fd)
	}
	kick, wake := efd(), efd()
	fds, ev := []int32{kick, wake}, make([]int16, 2)
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	// A read whose completion (delivered inside Wait) signals wake: Wait
	// returns then, with wake's events only.
	into := make([]byte, len(buf))
	q.Begin(3)
	q.Add(OpReadv, 3*int64(len(buf)), into)
	if !q.Start() {
		t.Fatal("read not started")
	}
	onDone = func(cs []blockdev.Completion) {
		if _, err := unix.Write(int(wake), one); err != nil {
			t.Error(err)
		}
	}
	var err error
	call(func() { err = q.Wait(fds, ev) })
	if err != nil || ev[0] != 0 || ev[1]&unix.POLLIN == 0 {
		t.Fatalf("Wait: %v, events %v; want wake's POLLIN only", err, ev)
	}
	if got := h.wait(t, 3); got[3] != nil || !bytes.Equal(into, buf) {
		t.Fatalf("read: %v, data equal %v", got[3], bytes.Equal(into, buf))
	}
	onDone = nil
	// Reset wake; the kick comes from another goroutine while Wait
	// sleeps (its poll is still armed from the first Wait).
	var cnt [8]byte
	if _, err := unix.Read(int(wake), cnt[:]); err != nil {
		t.Fatal(err)
	}
	go unix.Write(int(kick), one)
	call(func() { err = q.Wait(fds, ev) })
	if err != nil || ev[0]&unix.POLLIN == 0 || ev[1] != 0 {
		t.Fatalf("Wait: %v, events %v; want the kick's POLLIN only", err, ev)
	}
	// More eventfds than it watches: an error, and the queue starts
	// nothing more.
	if err := q.Wait([]int32{kick, wake, efd()}, make([]int16, 3)); err == nil {
		t.Fatal("Wait for 3 eventfds: no error")
	}
	if q.Room(1, 1) {
		t.Fatal("Room after a failed Wait")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}
