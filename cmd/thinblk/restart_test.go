package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/vhostuser/frontend"
	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"

	"github.com/thinblk/thinblk/internal/testenv"
)

// serveProc is one `thinblk serve` process, optionally armed to kill
// itself at a crash point.
type serveProc struct {
	cmd    *exec.Cmd
	logs   *testenv.Buffer
	exited chan struct{}
}

// newPausedPool makes what the restart and hand-over tests serve: a pool
// of 16 blocks of 64 KiB with the pause policy and a 4 MiB volume disk0,
// in a new directory that also holds the sockets. args are serve's.
func newPausedPool(t *testing.T) (dir, pool, sock string, args []string) {
	t.Helper()
	dir = t.TempDir()
	pool = filepath.Join(dir, "pool")
	mustThinblk(t, "pool", "create", pool, "--size", "1M", "--no-space", "pause")
	mustThinblk(t, "volume", "create", pool, "disk0", "--size", "4M")
	return dir, pool, filepath.Join(dir, "disk0.sock"), []string{pool, "--socket-dir", dir, "--queues", "2"}
}

func startServeEnv(t *testing.T, bin string, env []string, args ...string) *serveProc {
	t.Helper()
	p := &serveProc{logs: &testenv.Buffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"serve"}, args...)...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.exited
	})
	return p
}

// killedBySIGKILL waits for the process to die and reports whether a
// SIGKILL ended it.
func (p *serveProc) killedBySIGKILL(timeout time.Duration) bool {
	select {
	case <-p.exited:
	case <-time.After(timeout):
		return false
	}
	ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// crashLoad is a set of requests in flight on every queue: writes of a
// pattern that names their sector and generation, reads of sectors whose
// content is known, and flushes.
type crashLoad struct {
	reqs   [][]*frontend.Req
	expect map[*frontend.Req][]byte // reads: the data they must return
}

const crashBlock = 4096

func crashPattern(block uint64, gen byte) []byte {
	b := make([]byte, crashBlock)
	for i := 0; i < crashBlock; i += 16 {
		binary.LittleEndian.PutUint64(b[i:], block)
		b[i+8] = gen
	}
	return b
}

// submitCrashLoad fills each queue with perQueue requests. Writes go to
// blocks [0, writes); reads read blocks [readBase, ...) written (with
// generation 1) before.
func submitCrashLoad(t *testing.T, disk *frontend.Disk, perQueue int, gen byte, readBase uint64) *crashLoad {
	t.Helper()
	l := &crashLoad{expect: map[*frontend.Req][]byte{}}
	mem := disk.Memory()
	block := uint64(0)
	for qi, q := range disk.Queues() {
		var reqs []*frontend.Req
		for i := range perQueue {
			r, err := q.NewReq(2)
			if err != nil {
				t.Fatal(err)
			}
			buf, err := mem.Alloc(crashBlock, 512)
			if err != nil {
				t.Fatal(err)
			}
			switch i % 4 {
			case 0, 1: // write
				r.Type, r.Sector = blk.TypeOut, block*crashBlock/blk.SectorSize
				copy(buf.Bytes, crashPattern(block, gen))
				block++
			case 2: // read of a known block
				rb := readBase + uint64(qi*perQueue+i)
				r.Type, r.Sector = blk.TypeIn, rb*crashBlock/blk.SectorSize
				clear(buf.Bytes)
				l.expect[r] = crashPattern(rb, 1)
			case 3:
				r.Type = blk.TypeFlush
			}
			if r.Type != blk.TypeFlush {
				r.Data = []frontend.Buffer{buf}
			}
			r.Indirect = true // one descriptor each: the whole load fits the ring
			reqs = append(reqs, r)
		}
		if err := q.Submit(reqs...); err != nil {
			t.Fatal(err)
		}
		l.reqs = append(l.reqs, reqs)
	}
	return l
}

// waitAll reaps every request of the load on each queue and checks each
// completed exactly once, successfully, with the right data.
func (l *crashLoad) waitAll(disk *frontend.Disk, timeout time.Duration) error {
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for qi, q := range disk.Queues() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			seen := map[*frontend.Req]int{}
			deadline := time.Now().Add(timeout)
			var done []*frontend.Req
			for len(seen) < len(l.reqs[qi]) {
				var err error
				done, err = q.Wait(done[:0], time.Until(deadline))
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("queue %d: %d of %d completed: %w", qi, len(seen), len(l.reqs[qi]), err))
					mu.Unlock()
					return
				}
				for _, r := range done {
					seen[r]++
					var err error
					switch {
					case seen[r] > 1:
						err = fmt.Errorf("request type %d sector %d completed twice", r.Type, r.Sector)
					case r.Status != blk.StatusOK:
						err = fmt.Errorf("request type %d sector %d: status %d", r.Type, r.Sector, r.Status)
					case l.expect[r] != nil && !bytes.Equal(r.Data[0].Bytes, l.expect[r]):
						err = fmt.Errorf("read of sector %d returned wrong data", r.Sector)
					}
					if err != nil {
						mu.Lock()
						errs = append(errs, fmt.Errorf("queue %d: %w", qi, err))
						mu.Unlock()
					}
				}
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// checkWrites reads back every block the load wrote: a killed process
// (not a power loss) keeps every completed write, on a raw image (the page
// cache) and on a thin pool (its intent log keeps the new blocks' mappings
// there too), FLUSH or not.
func checkWrites(t *testing.T, disk *frontend.Disk, perQueue int, gen byte) {
	t.Helper()
	writes := uint64(0)
	for range disk.Queues() {
		writes += uint64((perQueue + 2) / 4 * 2)
	}
	buf := make([]byte, crashBlock)
	for b := range writes {
		if _, err := disk.ReadAt(buf, int64(b*crashBlock)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, crashPattern(b, gen)) {
			t.Fatalf("block %d: not the completed write of generation %d (zeros: %v)", b, gen, bytes.Equal(buf, make([]byte, crashBlock)))
		}
	}
}

// A `thinblk serve` killed with SIGKILL at a chosen point of the request
// path, with requests in flight on two queues, and started again: the
// driver reconnects as QEMU does (same in-flight area, rings resumed at
// their used index), and every request completes exactly once with the
// right data. Kill points: a request fetched but not started; one done
// with its used element written but not its used index; one whose used
// index is published but not yet cleared from the in-flight area. The
// second restart dies again while finishing the resubmitted requests.
func TestServeSurvivesKillWithRequestsInFlight(t *testing.T) {
	bin := buildThinblk(t)
	const perQueue = 48
	const readBase = 1024 // blocks of known content, for the reads
	points := []string{
		virtio.CrashFetched + ":20",
		virtio.CrashUsedElement + ":9",
		virtio.CrashUsedIndex + ":13",
	}
	for _, kind := range []string{"raw", "pool"} {
		for _, point := range points {
			t.Run(kind+"/"+point, func(t *testing.T) {
				dir := t.TempDir()
				var args []string
				var sock string
				switch kind {
				case "raw":
					img := filepath.Join(dir, "disk.img")
					f, err := os.Create(img)
					if err != nil {
						t.Fatal(err)
					}
					for b := uint64(readBase); b < readBase+2*perQueue; b++ {
						f.WriteAt(crashPattern(b, 1), int64(b*crashBlock))
					}
					f.Truncate(16 << 20)
					f.Close()
					sock = filepath.Join(dir, "disk.sock")
					args = []string{"--raw", img, "--socket", sock, "--queues", "2"}
				case "pool":
					pool := filepath.Join(dir, "pool")
					mustThinblk(t, "pool", "create", pool, "--size", "32M", "--block-size", "64K")
					mustThinblk(t, "volume", "create", pool, "disk0", "--size", "16M")
					args = []string{pool, "--queues", "2", "--socket-dir", dir}
					sock = filepath.Join(dir, "disk0.sock")
					// The reads' blocks are written through a first serve.
					p := startServeEnv(t, bin, nil, args...)
					waitForSocket(t, sock)
					d := dialDisk(t, sock)
					for b := uint64(readBase); b < readBase+2*perQueue; b++ {
						if _, err := d.WriteAt(crashPattern(b, 1), int64(b*crashBlock)); err != nil {
							t.Fatal(err)
						}
					}
					d.Close()
					p.cmd.Process.Signal(syscall.SIGTERM)
					<-p.exited
				}
				p := startServeEnv(t, bin, []string{crashEnv + "=" + point}, args...)
				waitForSocket(t, sock)
				disk := dialDisk(t, sock)
				defer disk.Close()
				if disk.ProtocolFeatures()&(1<<vhostuser.ProtoInflightShmfd) == 0 {
					t.Fatal("INFLIGHT_SHMFD not negotiated")
				}
				load := submitCrashLoad(t, disk, perQueue, 2, readBase)
				waited := make(chan error, 1)
				go func() { waited <- load.waitAll(disk, 60*time.Second) }()
				if !p.killedBySIGKILL(20 * time.Second) {
					t.Fatalf("serve did not die at %s\n%s", point, p.logs)
				}
				logs := p.logs.String()
				// Restarted, it dies once more if it completes two more
				// (maybe while the driver reconnects), then runs on.
				var err error
				for _, arm := range []string{virtio.CrashUsedIndex + ":2", ""} {
					var env []string
					if arm != "" {
						env = []string{crashEnv + "=" + arm}
					}
					p = startServeEnv(t, bin, env, args...)
					if !reconnect(t, disk, sock, p) {
						logs += p.logs.String()
						continue
					}
					select {
					case err = <-waited:
					case <-p.exited:
						if !p.killedBySIGKILL(time.Second) {
							t.Fatalf("serve exited: %v\n%s", p.cmd.ProcessState, p.logs)
						}
						logs += p.logs.String()
						continue
					}
					break
				}
				if err != nil {
					t.Fatalf("%v\nlogs:\n%s%s", err, logs, p.logs)
				}
				checkWrites(t, disk, perQueue, 2)
				if !strings.Contains(logs+p.logs.String(), "resubmitting request left in flight") {
					t.Errorf("no request was resubmitted: the kill did not catch one in flight\n%s", logs)
				}
				disk.Close()
				p.cmd.Process.Signal(syscall.SIGTERM)
				<-p.exited
				if kind == "pool" {
					if out := mustThinblk(t, "check", filepath.Join(dir, "pool"), "--quiet"); !strings.Contains(out, "clean") {
						t.Errorf("check: %q", out)
					}
				}
			})
		}
	}
}

func dialDisk(t *testing.T, sock string) *frontend.Disk {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2, Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return disk
}

// reconnect waits for the restarted serve's socket and reconnects. It
// returns false if serve died (killed at its crash point) meanwhile.
func reconnect(t *testing.T, disk *frontend.Disk, sock string, p *serveProc) bool {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := disk.Reconnect(ctx, sock)
		cancel()
		if err == nil {
			return true
		}
		select {
		case <-p.exited:
			if !p.killedBySIGKILL(time.Second) {
				t.Fatalf("serve exited: %v\n%s", p.cmd.ProcessState, p.logs)
			}
			return false
		default:
		}
		if time.Now().After(deadline) {
			p.cmd.Process.Signal(syscall.SIGQUIT) // its goroutines, in the log
			<-p.exited
			t.Fatalf("reconnect: %v\nserve's log:\n%s", err, p.logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A guest write waiting for space (pause policy) while later requests on
// its queue complete: the ring can be stopped at once (GET_VRING_BASE, as
// QEMU's `stop` sends it), serve can be stopped (SIGTERM) or killed
// (SIGKILL) and the pool grown offline; when the ring starts again the
// write runs again and completes exactly once, its data on the volume.
func TestWriteWaitingForSpaceSurvivesStopAndRestart(t *testing.T) {
	bin := buildThinblk(t)
	const block = 64 << 10
	for _, how := range []string{"stop", "sigterm", "kill"} {
		t.Run(how, func(t *testing.T) {
			_, pool, sock, args := newPausedPool(t)
			p := startServeEnv(t, bin, nil, args...)
			waitForSocket(t, sock)
			disk := dialDisk(t, sock)
			defer disk.Close()
			for i := range 16 {
				if _, err := disk.WriteAt(bytes.Repeat([]byte{byte(i)}, block), int64(i*block)); err != nil {
					t.Fatal(err)
				}
			}
			// The waiting write, then reads of mapped blocks behind it.
			q := disk.Queue(0)
			mem := disk.Memory()
			newReq := func(typ uint32, b uint64, fill byte) *frontend.Req {
				r, err := q.NewReq(2)
				if err != nil {
					t.Fatal(err)
				}
				buf, err := mem.Alloc(block, 4096)
				if err != nil {
					t.Fatal(err)
				}
				for i := range buf.Bytes {
					buf.Bytes[i] = fill
				}
				r.Type, r.Sector, r.Data, r.Indirect = typ, b*block/blk.SectorSize, []frontend.Buffer{buf}, true
				return r
			}
			w := newReq(blk.TypeOut, 20, 0xee)
			reads := []*frontend.Req{newReq(blk.TypeIn, 3, 0), newReq(blk.TypeIn, 7, 0), newReq(blk.TypeIn, 11, 0)}
			if err := q.Submit(w); err != nil {
				t.Fatal(err)
			}
			p.logs.WaitContains(t, "request waits for space")
			if err := q.Submit(reads...); err != nil {
				t.Fatal(err)
			}
			got := map[*frontend.Req]int{}
			var done []*frontend.Req
			for len(got) < len(reads) {
				var err error
				if done, err = q.Wait(done[:0], 20*time.Second); err != nil {
					t.Fatal(err)
				}
				for _, r := range done {
					got[r]++
				}
			}
			if got[w] != 0 {
				t.Fatal("the write completed although the pool is full")
			}
			for i, r := range reads {
				if r.Status != blk.StatusOK || r.Data[0].Bytes[0] != byte([]int{3, 7, 11}[i]) {
					t.Fatalf("read %d: status %d data %#x", i, r.Status, r.Data[0].Bytes[0])
				}
			}
			switch how {
			case "stop":
				start := time.Now()
				last, err := disk.StopQueue(0)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("GET_VRING_BASE answered in %v with a write waiting for space (avail %d)", time.Since(start).Round(time.Millisecond), last)
				if want := q.AvailIdx(); last != want {
					t.Errorf("GET_VRING_BASE = %d, want %d (the withdrawn write counts as taken)", last, want)
				}
				p.logs.WaitContains(t, "request withdrawn")
				mustThinblk(t, "pool", "grow", pool, "--size", "2M")
			case "sigterm":
				p.cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-p.exited:
				case <-time.After(20 * time.Second):
					t.Fatalf("serve did not exit after SIGTERM with a write waiting for space\n%s", p.logs)
				}
				if !p.cmd.ProcessState.Success() {
					t.Fatalf("serve: %v\n%s", p.cmd.ProcessState, p.logs)
				}
				mustThinblk(t, "pool", "grow", pool, "--size", "2M")
				p = startServeEnv(t, bin, nil, args...)
			case "kill":
				p.cmd.Process.Kill()
				<-p.exited
				mustThinblk(t, "pool", "grow", pool, "--size", "2M")
				p = startServeEnv(t, bin, nil, args...)
			}
			reconnect(t, disk, sock, p)
			var err error
			if done, err = q.Wait(done[:0], 20*time.Second); err != nil {
				t.Fatalf("the waiting write: %v\n%s", err, p.logs)
			}
			if len(done) != 1 || done[0] != w || w.Status != blk.StatusOK {
				t.Fatalf("completions after restart: %d (write status %d)", len(done), w.Status)
			}
			if _, err := q.Wait(done[:0], time.Second); err == nil {
				t.Fatal("a request completed twice")
			}
			stopAfterWaitingWrite(t, disk, p, 20*block, block)
			if out := mustThinblk(t, "check", pool, "--quiet"); !strings.Contains(out, "clean") {
				t.Errorf("check: %q", out)
			}
		})
	}
}

// stopAfterWaitingWrite checks that the write that waited for space (0xee bytes at off) is on
// the volume, flushes and closes the disk, and stops serve with SIGTERM.
func stopAfterWaitingWrite(t *testing.T, disk *frontend.Disk, p *serveProc, off int64, n int) {
	t.Helper()
	buf := make([]byte, n)
	if _, err := disk.ReadAt(buf, off); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{0xee}, n)) {
		t.Fatalf("the waiting write's data is not on the volume (%v)", err)
	}
	if err := disk.Flush(); err != nil {
		t.Fatal(err)
	}
	disk.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
}
