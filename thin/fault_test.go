package thin

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// A front-end that shrinks its guest memory file under running I/O makes
// thin fault while filling or copying the guest's buffers. The device
// abandons that request; the pool must not be left with its I/O gate or a
// block fill held: the faulted connection stops, the other volumes keep
// serving, snapshots and commits work, and Check is clean.
//
// The device serves a volume through its asynchronous queue when it can
// (as thinblk serve does); the synchronous path faults on the same
// buffers, and both must let go of the gate and the fills.
func TestGuestMemoryShrunkUnderIO(t *testing.T) {
	t.Run("async", func(t *testing.T) { testGuestMemoryShrunkUnderIO(t, false) })
	t.Run("sync", func(t *testing.T) { testGuestMemoryShrunkUnderIO(t, true) })
}

func testGuestMemoryShrunkUnderIO(t *testing.T, syncOnly bool) {
	p, _ := newPool(t, 256, CreateOptions{})
	va := mustVolume(t, p, "a", 64*mBlock)
	vb := mustVolume(t, p, "b", 64*mBlock)
	// Blocks 0-62 of a are shared with a snapshot: a partial write there
	// copies the rest of the block and the guest's bytes into a new one.
	for b := range int64(63) {
		write(t, va, b*mBlock, pattern(mBlock, 1))
	}
	if err := p.CreateSnapshot("a", "a-base", false); err != nil {
		t.Fatal(err)
	}

	// The rings and the request headers sit in the first half of the
	// memory, every data buffer in the second: truncating the memfd to
	// half keeps the queue running and makes thin itself fault.
	const memBase, memSize = 0x40000000, 2 << 20
	mem, memfd, unmap, err := virtiotest.NewMemfdMemory(memBase, memSize)
	if err != nil {
		t.Fatal(err)
	}
	defer unmap()
	d := virtiotest.NewDriver(mem, 16, 1<<virtio.FeatureVersion1)
	if err := d.WithEventfds(); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var logs syncLog
	dev, err := blk.New(va, blk.Options{SyncOnly: syncOnly, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.StartQueue(d.Setup(0)); err != nil {
		t.Fatal(err)
	}
	hdr := d.AllocBuf(blk.RequestHeaderSize, false, nil)
	status := d.AllocBuf(1, true, nil)
	d.Alloc(memSize/2 - (d.Alloc(0) - memBase))
	data := d.AllocBuf(mBlock, false, nil)
	if data.Addr-memBase < memSize/2 {
		t.Fatalf("data buffer at %#x is not in the half that goes", data.Addr)
	}

	// Volume b is busy on another connection the whole time.
	stopB := make(chan struct{})
	var bWrites atomic.Int64
	var bErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := pattern(mBlock, 7)
		for i := int64(0); ; i++ {
			select {
			case <-stopB:
				return
			default:
			}
			off := i % 64 * mBlock
			if err := vb.WriteAt([][]byte{buf[:512]}, off+512); err != nil {
				bErr = err
				return
			}
			got := make([]byte, 512)
			if err := vb.ReadAt([][]byte{got}, off+512); err != nil || !bytes.Equal(got, buf[:512]) {
				bErr = errors.Join(err, errors.New("volume b read back wrong data"))
				return
			}
			bWrites.Add(1)
		}
	}()
	stopWriter := sync.OnceFunc(func() { close(stopB); wg.Wait() })
	defer stopWriter()

	// One request at a time on volume a: partial writes to shared blocks
	// (thin copies the guest's bytes into a new block) alternating
	// with reads of unmapped blocks (thin clears the guest's buffer).
	serve := func(i int) bool {
		typ, sector := uint32(blk.TypeOut), uint64(1+i%62)*mPerBlk+1
		buf := virtiotest.Buf{Addr: data.Addr, Len: 512}
		if i%2 == 1 {
			typ, sector, buf.Write = blk.TypeIn, uint64(63)*mPerBlk, true
		}
		h := mem.Bytes(hdr.Addr, blk.RequestHeaderSize)
		binary.LittleEndian.PutUint32(h[0:], typ)
		binary.LittleEndian.PutUint64(h[8:], sector)
		d.AddChain(hdr, buf, status)
		d.KickNow()
		for start := time.Now(); time.Since(start) < 2*time.Second; {
			if _, ok := d.PopUsed(); ok {
				return true
			}
			d.WaitCall(10)
		}
		return false
	}
	for i := range 20 {
		if !serve(i) {
			t.Fatalf("request %d not served before the memory shrank", i)
		}
	}
	if err := memfd.Truncate(memSize / 2); err != nil {
		t.Fatal(err)
	}
	served := 0
	for i := 20; serve(i); i++ {
		served++
		if served > 100 {
			t.Fatal("the device kept serving requests on memory that is gone")
		}
	}
	if !strings.Contains(logs.String(), "guest memory fault") {
		t.Fatalf("no guest memory fault logged:\n%s", logs.String())
	}

	within(t, "StopQueue", func() error { _, err := dev.StopQueue(0); return err })
	before := bWrites.Load()
	within(t, "snapshot of b", func() error { return p.CreateSnapshot("b", "b-snap", false) })
	within(t, "snapshot of a", func() error { return p.CreateSnapshot("a", "a-snap", false) })
	within(t, "flush", p.Flush)
	// A write to the block whose fill was abandoned does not wait for it.
	within(t, "write to a", func() error { return va.WriteAt([][]byte{pattern(mBlock, 3)}, 21*mBlock) })
	within(t, "delete a snapshot", func() error { return p.DeleteVolume("a-snap") })
	for start := time.Now(); bWrites.Load() < before+10; time.Sleep(time.Millisecond) {
		if bErr != nil {
			t.Fatalf("volume b: %v", bErr)
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("volume b stopped serving after the fault (%d writes)", bWrites.Load())
		}
	}
	if got := read(t, va, 0, mBlock); !bytes.Equal(got, pattern(mBlock, 1)) {
		t.Fatal("volume a's data changed")
	}
	stopWriter()
	if bErr != nil {
		t.Fatalf("volume b: %v", bErr)
	}
	within(t, "check", func() error { return p.Check(nil) })
}

// The asynchronous queue faults the same way (clearing unmapped blocks of
// a read, copying a partial write into a new block) on the submitter's
// goroutine, which virtio/blk recovers: the gate and the fill must be
// released there too.
func TestGuestMemoryFaultAsyncQueue(t *testing.T) {
	p, _ := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "a", 16*mBlock)
	// Shared with a snapshot: a partial write copies it, with the guest's
	// bytes, into a new block.
	write(t, v, 0, pattern(8*mBlock, 1))
	if err := p.CreateSnapshot("a", "base", false); err != nil {
		t.Fatal(err)
	}
	q, err := v.OpenQueue(4, func([]blockdev.Completion) {})
	if err != nil {
		t.Skipf("no asynchronous queue here: %v", err)
	}
	defer q.Close()
	gone := shrunkBuffer(t)
	for _, c := range []struct {
		name string
		do   func() error
	}{
		{"read of an unmapped block", func() error { return q.ReadAt(0, [][]byte{gone[:512]}, 12*mBlock) }},
		{"partial write to a shared block", func() error { return q.WriteAt(1, [][]byte{gone[:512]}, 2*mBlock+512) }},
		{"synchronous read", func() error { return v.ReadAt([][]byte{gone[:512]}, 12*mBlock) }},
		{"synchronous partial write", func() error { return v.WriteAt([][]byte{gone[:512]}, 3*mBlock) }},
	} {
		if err := faulting(c.do); err == nil {
			t.Fatalf("%s: no fault", c.name)
		}
		within(t, "snapshot after a faulted "+c.name, func() error {
			if err := p.CreateSnapshot("a", "s", false); err != nil {
				return err
			}
			return p.DeleteVolume("s")
		})
	}
	if got := read(t, v, 2*mBlock, mBlock); !bytes.Equal(got, pattern(8*mBlock, 1)[2*mBlock:3*mBlock]) {
		t.Fatal("the faulted write changed its block")
	}
	within(t, "write to the abandoned fill's block", func() error {
		return v.WriteAt([][]byte{pattern(mBlock, 2)}, 2*mBlock)
	})
	within(t, "check", func() error { return p.Check(nil) })
}

// shrunkBuffer returns a mapping of a memfd truncated to nothing: every
// access faults, as guest memory does after the front-end shrank it.
func shrunkBuffer(t *testing.T) []byte {
	fd, err := unix.MemfdCreate("shrunk-guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 1<<16); err != nil {
		t.Fatal(err)
	}
	b, err := unix.Mmap(fd, 0, 1<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// faulting runs fn as virtio/blk runs storage calls: a memory fault
// becomes an error (it recovers it), anything else is fn's result.
func faulting(fn func() error) (fault error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if err := virtio.RecoverFault(recover()); err != nil {
			fault = err
		}
	}()
	fn()
	return nil
}

// within fails the test if fn does not return within 10 s (a pool whose
// gate was left held waits forever), or returns an error.
func within(t *testing.T, what string, fn func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s hung: a fault or a panic left the pool's I/O gate, its lock or a block fill held", what)
	}
}

type syncLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncLog) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncLog) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A management operation that panics while it holds the pool exclusively
// (a bug) is recovered by the QMP server, which answers with an error and
// keeps serving; the pool must not be left locked: the next commands and
// every volume's I/O go on.
func TestQMPPanicReleasesPool(t *testing.T) {
	p, _ := newPool(t, 64, CreateOptions{})
	v := mustVolume(t, p, "a", 16*mBlock)
	mustVolume(t, p, "b", 16*mBlock)
	write(t, v, 0, pattern(mBlock, 1))
	var panicIn atomic.Value // the operation to panic in, once
	panicIn.Store("")
	testHookHeld = func(op string) {
		if panicIn.CompareAndSwap(op, "") {
			panic("injected bug in " + op)
		}
	}
	defer func() { testHookHeld = nil }()
	srv := qmp.NewServer(qmp.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	srv.Register("snapshot-create", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Volume string `json:"volume"`
			Name   string `json:"name"`
		}
		if err := qmp.DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return nil, p.CreateSnapshot(a.Volume, a.Name, false)
	})
	srv.Register("volume-delete", func(_ context.Context, raw json.RawMessage) (any, error) {
		var a struct {
			Name string `json:"name"`
		}
		if err := qmp.DecodeArgs(raw, &a); err != nil {
			return nil, err
		}
		return nil, p.DeleteVolume(a.Name)
	})
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := srv.ListenUnix(sock, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), ln)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	exec := func(cmd string, args any) error {
		return c.Execute(ctx, cmd, args, nil)
	}
	for _, step := range []struct {
		op, cmd string
		args    any
	}{
		{"snapshot", "snapshot-create", map[string]string{"volume": "a", "name": "s1"}},
		{"delete", "volume-delete", map[string]string{"name": "b"}},
	} {
		panicIn.Store(step.op)
		if err := exec(step.cmd, step.args); err == nil || !strings.Contains(err.Error(), "internal error") {
			t.Fatalf("%s with a panic: %v, want an internal error", step.cmd, err)
		}
		within(t, "write after the panic in "+step.op, func() error { return v.WriteAt([][]byte{pattern(mBlock, 2)}, mBlock) })
		within(t, step.cmd+" after the panic", func() error { return exec(step.cmd, step.args) })
	}
	within(t, "flush", p.Flush)
	if got := read(t, v, 0, mBlock); !bytes.Equal(got, pattern(mBlock, 1)) {
		t.Fatal("volume a's data changed")
	}
	within(t, "check", func() error { return p.Check(nil) })
}
