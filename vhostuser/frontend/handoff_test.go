package frontend

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/handover"
	"github.com/thinblk/thinblk/rawdisk"
	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio/blk"
	"golang.org/x/sys/unix"
)

// handOffProc is one "process" of a hand-over test: a raw image, its blk
// device and the vhost-user server, as `thinblk serve --raw` has them.
type handOffProc struct {
	disk   *rawdisk.Disk
	dev    *blk.Device
	srv    *vhostuser.Server
	served chan error
}

func handOffLogger(name string) *slog.Logger {
	var out io.Writer = io.Discard
	if os.Getenv("THINBLK_TEST_LOG") == "1" {
		out = os.Stderr
	}
	return slog.New(slog.NewTextHandler(out, nil)).With("proc", name)
}

func openHandOffDevice(t *testing.T, img string, queues int, name string) (*rawdisk.Disk, *blk.Device) {
	t.Helper()
	disk, err := rawdisk.Open(img, rawdisk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dev, err := blk.New(disk, blk.Options{NumQueues: queues, Serial: "handoff", Logger: handOffLogger(name)})
	if err != nil {
		disk.Close()
		t.Fatal(err)
	}
	return disk, dev
}

func (p *handOffProc) serve() {
	p.served = make(chan error, 1)
	go func() { p.served <- p.srv.Serve(context.Background()) }()
}

// close stops the process's server and closes its device and disk.
func (p *handOffProc) close(t *testing.T) {
	t.Helper()
	p.srv.Close()
	if err := <-p.served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	p.dev.Close()
	p.disk.Close()
}

// handOffPair is a connected pair of hand-over sockets (the old process's
// end and the new one's).
func handOffPair(t *testing.T) (old, new *handover.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *handover.Conn {
		f := os.NewFile(uintptr(fd), "handover")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return handover.NewConn(c.(*net.UnixConn))
	}
	old, new = conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { old.Close(); new.Close() })
	return old, new
}

// ioLoad keeps every queue of d busy until stop: batches of writes of
// fresh data to blocks of the queue's own region, then reads of them
// checked against the model. It records the longest time between two
// completions (the stall the driver saw).
type ioLoad struct {
	d       *Disk
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	errs    []error
	rounds  []int
	last    time.Time
	longest time.Duration
}

func startIOLoad(d *Disk) *ioLoad {
	l := &ioLoad{d: d, stop: make(chan struct{}), rounds: make([]int, len(d.Queues())), last: time.Now()}
	for _, q := range d.Queues() {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			if err := l.run(q); err != nil {
				l.mu.Lock()
				l.errs = append(l.errs, err)
				l.mu.Unlock()
			}
		}()
	}
	return l
}

func (l *ioLoad) completed() {
	l.mu.Lock()
	now := time.Now()
	l.longest = max(l.longest, now.Sub(l.last))
	l.last = now
	l.mu.Unlock()
}

func (l *ioLoad) roundsDone() (min int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	min = l.rounds[0]
	for _, n := range l.rounds {
		min = minInt(min, n)
	}
	return min
}

func minInt(a, b int) int {
	if a < b {
		return a
	}
	return b
}

const loadBatch = 16

func (l *ioLoad) run(q *Queue) error {
	rng := rand.New(rand.NewPCG(uint64(q.Index()), 77))
	base := int64(q.Index()) * 16 << 20
	reqs := make([]*Req, loadBatch)
	want := make([][]byte, loadBatch)
	for i := range reqs {
		r, err := q.NewReq(1)
		if err != nil {
			return err
		}
		buf, err := l.d.Memory().Alloc(4096, 4096)
		if err != nil {
			return err
		}
		r.Data, r.User = []Buffer{buf}, int64(i)
		reqs[i] = r
	}
	do := func(what string) error {
		if err := q.Submit(reqs...); err != nil {
			return fmt.Errorf("queue %d: submit %s: %w", q.Index(), what, err)
		}
		var done []*Req
		for len(done) < len(reqs) {
			n := len(done)
			var err error
			if done, err = q.Wait(done, 30*time.Second); err != nil {
				return fmt.Errorf("queue %d: %s: %d of %d completed: %w", q.Index(), what, len(done), len(reqs), err)
			}
			for range len(done) - n {
				l.completed()
			}
		}
		for _, r := range done {
			if r.Status != blk.StatusOK {
				return fmt.Errorf("queue %d: %s: request %d status %d", q.Index(), what, r.User, r.Status)
			}
		}
		return nil
	}
	for round := 0; ; round++ {
		select {
		case <-l.stop:
			return nil
		default:
		}
		for i, r := range reqs {
			want[i] = randomBytes(rng, 4096)
			copy(r.Data[0].Bytes, want[i])
			r.Type, r.Sector = blk.TypeOut, uint64(base/512)+uint64(rng.IntN(4096/loadBatch)*loadBatch+i)*8
		}
		if err := do("writes"); err != nil {
			return err
		}
		for _, r := range reqs {
			clear(r.Data[0].Bytes)
			r.Type = blk.TypeIn
		}
		if err := do("reads"); err != nil {
			return err
		}
		for i, r := range reqs {
			if !bytes.Equal(r.Data[0].Bytes, want[i]) {
				return fmt.Errorf("queue %d round %d: request %d read back other data", q.Index(), round, i)
			}
		}
		l.mu.Lock()
		l.rounds[q.Index()]++
		l.mu.Unlock()
	}
}

func (l *ioLoad) finish(t *testing.T) time.Duration {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	for _, err := range l.errs {
		t.Error(err)
	}
	return l.longest
}

// waitRounds waits until every queue finished n more rounds.
func (l *ioLoad) waitRounds(t *testing.T, n int) {
	t.Helper()
	target := l.roundsDone() + n
	deadline := time.Now().Add(time.Minute)
	for l.roundsDone() < target {
		l.mu.Lock()
		errs := len(l.errs)
		l.mu.Unlock()
		if errs > 0 || time.Now().After(deadline) {
			l.finish(t)
			t.Fatalf("I/O did not go on (%d errors)", errs)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestHandOffKeepsConnection: a server hands its listener and session to
// another (as a new serve process would receive them: over a unix socket,
// descriptors with SCM_RIGHTS, the session rebuilt from replayed
// requests) while the driver keeps two queues busy. The driver never
// reconnects, every request completes exactly once (the driver fails on a
// completion of a request not in flight) with the right data, control
// messages on the same connection are answered by the new server, and new
// connections reach it through the handed-over listener. Without the
// in-flight area (NoInflight) the rings resume from the bases handed over.
func TestHandOffKeepsConnection(t *testing.T) {
	for _, noInflight := range []bool{false, true} {
		t.Run(fmt.Sprintf("noinflight=%v", noInflight), func(t *testing.T) { testHandOff(t, noInflight) })
	}
}

func testHandOff(t *testing.T, noInflight bool) {
	img := newImage(t, 64<<20)
	sock := filepath.Join(t.TempDir(), "disk.sock")
	const queues = 2
	a := &handOffProc{}
	a.disk, a.dev = openHandOffDevice(t, img, queues, "old")
	var err error
	if a.srv, err = vhostuser.Listen(vhostuser.ServerOptions{SocketPath: sock, Logger: handOffLogger("old"), Name: "disk", NoInflight: noInflight}, a.dev); err != nil {
		t.Fatal(err)
	}
	a.serve()
	b := a
	t.Cleanup(func() { b.close(t) }) // after the drivers' (cleanups run last first)
	d := dial(t, sock, Options{NumQueues: queues})
	if inflight := d.ProtocolFeatures()&(1<<vhostuser.ProtoInflightShmfd) != 0; inflight == noInflight {
		t.Fatalf("in-flight area negotiated: %v", inflight)
	}
	load := startIOLoad(d)
	load.waitRounds(t, 3)

	var stalls []time.Duration
	for round := range 3 {
		began := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		ho, err := b.srv.HandOff(ctx)
		cancel()
		if err != nil {
			load.finish(t)
			t.Fatalf("hand-over %d: %v", round, err)
		}
		// The old process lets go of its storage before the new one opens
		// it (a pool is open in one process at a time).
		b.dev.Close()
		b.disk.Close()
		oldEnd, newEnd := handOffPair(t)
		sent := make(chan error, 1)
		go func() {
			err := oldEnd.SendState(&handover.State{Servers: []handover.Server{ho.State}})
			if err == nil {
				err = oldEnd.ReadAnswer()
			}
			sent <- err
		}()
		st, err := handover.ReadState(newEnd)
		if err != nil {
			t.Fatalf("receive: %v", err)
		}
		if len(st.Servers) != 1 || len(st.Servers[0].Sessions) != 1 {
			t.Fatalf("handed over %d servers", len(st.Servers))
		}
		next := &handOffProc{}
		next.disk, next.dev = openHandOffDevice(t, img, queues, fmt.Sprintf("new%d", round))
		if next.srv, err = vhostuser.Resume(vhostuser.ServerOptions{SocketPath: sock, Logger: handOffLogger("new"), Name: "disk", NoInflight: noInflight}, next.dev, st.Servers[0]); err != nil {
			t.Fatalf("resume: %v", err)
		}
		stalls = append(stalls, time.Since(began))
		next.serve()
		if err := newEnd.Answer(nil); err != nil {
			t.Fatal(err)
		}
		if err := <-sent; err != nil {
			t.Fatalf("old end: %v", err)
		}
		ho.Commit()
		if err := <-b.served; err != nil {
			t.Errorf("old Serve: %v", err)
		}
		if _, err := os.Stat(sock); err != nil {
			t.Fatalf("the old server removed the handed-over socket: %v", err)
		}
		b = next
		load.waitRounds(t, 3)
		// The same connection's control messages reach the new server.
		if err := d.readConfig(); err != nil {
			t.Fatalf("config read over the handed-over connection: %v", err)
		}
	}
	longest := load.finish(t)
	if d.reconnects != 0 {
		t.Fatalf("the driver reconnected %d times", d.reconnects)
	}
	// The handed-over listener takes new connections.
	mustWrite(t, d, bytes.Repeat([]byte{7}, 4096), 60<<20)
	d.Close()
	d2 := dial(t, sock, Options{NumQueues: queues})
	if got := mustRead(t, d2, 4096, 60<<20); !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
		t.Fatal("a new connection after the hand-overs does not read back the first one's write")
	}
	t.Logf("3 hand-overs under I/O on %d queues: pause to rings served by the new server %v; longest gap between completions %v",
		queues, stalls, longest.Round(time.Microsecond))
}

// TestHandOffAbortServesOn: a hand-over that is refused (the driver logs
// dirty pages: a live migration) or aborted leaves the server serving the
// same connection.
func TestHandOffAbortServesOn(t *testing.T) {
	img := newImage(t, 64<<20)
	sock := filepath.Join(t.TempDir(), "disk.sock")
	a := &handOffProc{}
	a.disk, a.dev = openHandOffDevice(t, img, 1, "old")
	var err error
	if a.srv, err = vhostuser.Listen(vhostuser.ServerOptions{SocketPath: sock, Logger: handOffLogger("old"), Name: "disk"}, a.dev); err != nil {
		t.Fatal(err)
	}
	a.serve()
	t.Cleanup(func() { a.close(t) })
	d := dial(t, sock, Options{NumQueues: 1})
	load := startIOLoad(d)
	load.waitRounds(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ho, err := a.srv.HandOff(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ho.Abort()
	load.waitRounds(t, 2)
	load.finish(t)

	if _, err := d.StartDirtyLog(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.srv.HandOff(ctx); err == nil || !strings.Contains(err.Error(), "live migration") {
		t.Fatalf("hand-over during dirty logging: %v", err)
	}
	mustWrite(t, d, bytes.Repeat([]byte{3}, 4096), 0)
	if err := d.StopDirtyLog(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, d, 4096, 0); !bytes.Equal(got, bytes.Repeat([]byte{3}, 4096)) {
		t.Fatal("data written after a refused hand-over not read back")
	}
	if d.reconnects != 0 {
		t.Fatalf("the driver reconnected %d times", d.reconnects)
	}
}
