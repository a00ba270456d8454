package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/handover"
	"github.com/thinblk/thinblk/internal/testenv"
	"github.com/thinblk/thinblk/vhostuser/frontend"
	"github.com/thinblk/thinblk/virtio/blk"
)

// TestServeHandOver: `thinblk serve POOL --handover-from POOL/thinblk.handover`
// takes the running serve's connections while the Go front-end keeps
// issuing I/O, and the old process exits: the front-end never reconnects
// (the driver has no automatic reconnection: a dropped connection would
// fail its requests), every request completes exactly once with the right
// data, and a write that waited for space in the old process (withdrawn
// into the in-flight area by the hand-over) completes in the new one once
// the pool grows. Done twice, so that the new process hands over in turn.
func TestServeHandOver(t *testing.T) {
	bin := buildThinblk(t)
	const block = 64 << 10
	dir, pool, sock, args := newPausedPool(t)
	p := startServeEnv(t, bin, nil, args...)
	waitForSocket(t, sock)
	waitForSocket(t, filepath.Join(pool, handoverSocketName))
	disk := dialDisk(t, sock)
	defer disk.Close()
	for i := range 16 {
		if _, err := disk.WriteAt(bytes.Repeat([]byte{byte(i)}, block), int64(i*block)); err != nil {
			t.Fatal(err)
		}
	}
	// A write that waits for space on queue 0.
	q := disk.Queue(0)
	w, err := q.NewReq(1)
	if err != nil {
		t.Fatal(err)
	}
	buf, err := disk.Memory().Alloc(block, 4096)
	if err != nil {
		t.Fatal(err)
	}
	copy(buf.Bytes, bytes.Repeat([]byte{0xee}, block))
	w.Type, w.Sector, w.Data = blk.TypeOut, 20*block/blk.SectorSize, []frontend.Buffer{buf}
	if err := q.Submit(w); err != nil {
		t.Fatal(err)
	}
	p.logs.WaitContains(t, "request waits for space")

	// Queue 1 rewrites the mapped blocks and reads them back, without a
	// pause, across the hand-overs.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var loadErr error
	var longest time.Duration
	rounds := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		q1 := disk.Queue(1)
		r, err := q1.NewReq(1)
		b, err2 := disk.Memory().Alloc(4096, 4096)
		if err != nil || err2 != nil {
			mu.Lock()
			loadErr = fmt.Errorf("set-up: %v %v", err, err2)
			mu.Unlock()
			return
		}
		last := time.Now()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			blockNo := i % 16
			want := bytes.Repeat([]byte(fmt.Sprintf("%02d%06d", blockNo, i)), 4096/8)
			copy(b.Bytes, want)
			r.Type, r.Sector, r.Data = blk.TypeOut, uint64(blockNo*block/blk.SectorSize), []frontend.Buffer{b}
			for _, typ := range []uint32{blk.TypeOut, blk.TypeIn} {
				if typ == blk.TypeIn {
					clear(b.Bytes)
				}
				r.Type = typ
				if err := q1.Do(r); err != nil || r.Status != blk.StatusOK {
					mu.Lock()
					loadErr = fmt.Errorf("round %d: %v status %d", i, err, r.Status)
					mu.Unlock()
					return
				}
				mu.Lock()
				longest = max(longest, time.Since(last))
				last = time.Now()
				mu.Unlock()
			}
			if !bytes.Equal(b.Bytes, want) {
				mu.Lock()
				loadErr = fmt.Errorf("round %d: read back other data", i)
				mu.Unlock()
				return
			}
			mu.Lock()
			rounds++
			mu.Unlock()
		}
	}()
	waitRounds := func(n int) {
		t.Helper()
		mu.Lock()
		target := rounds + n
		mu.Unlock()
		deadline := time.Now().Add(time.Minute)
		for {
			mu.Lock()
			r, err := rounds, loadErr
			mu.Unlock()
			if err != nil {
				t.Fatalf("I/O on queue 1: %v", err)
			}
			if r >= target {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("I/O on queue 1 stopped at round %d\n%s", r, p.logs)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitRounds(20)
	// A new process that cannot open the pool (here: it is given another
	// directory) aborts; the old one opens the pool again and serves on
	// from the state it had sent, without a reconnect.
	bad := startServeEnv(t, bin, nil, filepath.Join(dir, "nopool"), "--socket-dir", dir, "--queues", "2",
		"--handover-from", filepath.Join(pool, handoverSocketName))
	select {
	case <-bad.exited:
	case <-time.After(time.Minute):
		t.Fatalf("the failing new serve did not exit\n%s", bad.logs)
	}
	if bad.cmd.ProcessState.Success() {
		t.Fatalf("serve of a missing pool with --handover-from succeeded\n%s", bad.logs)
	}
	p.logs.WaitContains(t, "hand-over failed; serving on")
	waitForSocket(t, filepath.Join(pool, handoverSocketName))
	waitRounds(20)
	took := regexp.MustCompile(`handed over to the new serve process.* paused_ms=(\d+) pool_released_ms=(\d+) taken_ms=(\d+)`)
	for round := range 2 {
		next := startServeEnv(t, bin, nil, append(args, "--handover-from", filepath.Join(pool, handoverSocketName))...)
		select {
		case <-p.exited:
		case <-time.After(time.Minute):
			t.Fatalf("hand-over %d: the old serve did not exit\nold:\n%s\nnew:\n%s", round, p.logs, next.logs)
		}
		if !p.cmd.ProcessState.Success() {
			t.Fatalf("hand-over %d: old serve: %v\n%s", round, p.cmd.ProcessState, p.logs)
		}
		m := took.FindStringSubmatch(p.logs.String())
		if m == nil {
			t.Fatalf("hand-over %d: the old serve did not log a hand-over\n%s", round, p.logs)
		}
		if strings.Contains(next.logs.String(), "front-end connected") {
			t.Fatalf("hand-over %d: the front-end connected anew\n%s", round, next.logs)
		}
		t.Logf("hand-over %d: sessions paused after %s ms, pool released after %s ms, taken by the new process after %s ms", round, m[1], m[2], m[3])
		p = next
		waitForSocket(t, filepath.Join(pool, handoverSocketName))
		waitRounds(20)
		if w.Done() {
			t.Fatal("the waiting write completed although the pool is full")
		}
	}
	mu.Lock()
	t.Logf("longest time between two completions on queue 1 across the hand-overs: %v", longest.Round(time.Millisecond))
	mu.Unlock()
	// The write the first process withdrew completes in the third.
	mustThinblk(t, "pool", "grow", pool, "--size", "2M")
	done, err := q.Wait(nil, 30*time.Second)
	if err != nil {
		t.Fatalf("the waiting write: %v\n%s", err, p.logs)
	}
	if len(done) != 1 || done[0] != w || w.Status != blk.StatusOK {
		t.Fatalf("completions on queue 0: %d (write status %d)", len(done), w.Status)
	}
	if _, err := q.Wait(done[:0], time.Second); err == nil {
		t.Fatal("a request completed twice")
	}
	close(stop)
	wg.Wait()
	if loadErr != nil {
		t.Fatal(loadErr)
	}
	stopAfterWaitingWrite(t, disk, p, 20*block, block)
	if !p.cmd.ProcessState.Success() {
		t.Fatalf("serve: %v\n%s", p.cmd.ProcessState, p.logs)
	}
	if out := mustThinblk(t, "check", pool, "--quiet"); !strings.Contains(out, "clean") {
		t.Errorf("check: %q", out)
	}
}

// TestServeHandOverKillsSilentTaker: a process that takes the state and
// hangs up without answering may be running the rings with it, so the old
// serve kills it (by pidfd) before serving on from the same state; the
// front-end's connection survives.
func TestServeHandOverKillsSilentTaker(t *testing.T) {
	bin := buildThinblk(t)
	dir := t.TempDir()
	pool := filepath.Join(dir, "pool")
	mustThinblk(t, "pool", "create", pool, "--size", "16M")
	mustThinblk(t, "volume", "create", pool, "disk0", "--size", "4M")
	sock := filepath.Join(dir, "disk0.sock")
	p := startServeEnv(t, bin, nil, pool, "--socket-dir", dir, "--queues", "2")
	waitForSocket(t, sock)
	waitForSocket(t, filepath.Join(pool, handoverSocketName))
	disk := dialDisk(t, sock)
	defer disk.Close()
	want := bytes.Repeat([]byte("taker"), 4096/5+1)[:4096]
	if _, err := disk.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	taker := exec.Command(os.Args[0], "-test.run=^TestHandOverSilentTakerProcess$")
	taker.Env = append(os.Environ(), "THINBLK_SILENT_TAKER="+filepath.Join(pool, handoverSocketName))
	var out testenv.Buffer
	taker.Stdout, taker.Stderr = &out, &out
	if err := taker.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- taker.Wait() }()
	select {
	case <-waited:
	case <-time.After(time.Minute):
		taker.Process.Kill()
		t.Fatalf("the silent taker was not killed\n%s\nserve:\n%s", &out, p.logs)
	}
	if ws, ok := taker.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the silent taker ended with %v, not SIGKILL\n%s", taker.ProcessState, &out)
	}
	if !strings.Contains(out.String(), "took the state") {
		t.Fatalf("the silent taker did not get the state:\n%s", &out)
	}
	p.logs.WaitContains(t, "hand-over failed; serving on")
	got := make([]byte, 4096)
	if _, err := disk.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read after the failed hand-over: %v", err)
	}
	if _, err := disk.WriteAt(bytes.Repeat([]byte{9}, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	disk.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
	if !p.cmd.ProcessState.Success() {
		t.Fatalf("serve: %v\n%s", p.cmd.ProcessState, p.logs)
	}
}

// TestHandOverSilentTakerProcess is the process TestServeHandOverKillsSilentTaker
// starts: it reads a serve's state, hangs up without answering and waits.
func TestHandOverSilentTakerProcess(t *testing.T) {
	path := os.Getenv("THINBLK_SILENT_TAKER")
	if path == "" {
		t.Skip("a helper process of TestServeHandOverKillsSilentTaker")
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := handover.ReadState(handover.NewConn(c.(*net.UnixConn)))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("took the state:", len(st.Servers), "sockets")
	c.Close()
	time.Sleep(10 * time.Minute)
	t.Fatal("not killed")
}
