package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/eventfd"
	"github.com/thinblk/thinblk/virtio"

	"github.com/thinblk/thinblk/internal/testenv"
)

// fakeDevice records what the server asks of it. Its queues touch every
// ring area they are given, so a bad translation (or memory unmapped under
// a running queue) crashes the test instead of passing silently.
type fakeDevice struct {
	features  uint64
	numQueues int
	maxSize   int

	mu       sync.Mutex
	config   [MaxConfigSize]byte
	running  map[int]virtio.QueueSetup
	starts   []virtio.QueueSetup
	stops    []int
	notify   func() error
	progress uint16 // added to LastAvail on stop, as if requests were served
	startErr error
	stopErr  error // StopQueue fails (the queue keeps running)
	// stopGate, when set, holds StopQueue until it is closed (requests
	// still being served when the ring stops).
	stopGate chan struct{}
	events   []string

	configReads int
}

func newFakeDevice() *fakeDevice {
	d := &fakeDevice{
		features:  1<<virtio.FeatureVersion1 | 1<<virtio.FeatureEventIdx | 1<<virtio.FeatureIndirectDesc,
		numQueues: 2,
		maxSize:   256,
		running:   map[int]virtio.QueueSetup{},
		progress:  7,
	}
	for i := range d.config {
		d.config[i] = byte(i)
	}
	return d
}

func (d *fakeDevice) Features() uint64  { return d.features }
func (d *fakeDevice) NumQueues() int    { return d.numQueues }
func (d *fakeDevice) MaxQueueSize() int { return d.maxSize }

func (d *fakeDevice) ReadConfig(p []byte, offset uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.configReads++
	copy(p, d.config[offset:])
}

func (d *fakeDevice) WriteConfig(p []byte, offset uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if offset < 16 {
		return errors.New("read-only field")
	}
	copy(d.config[offset:], p)
	return nil
}

func touch(b []byte) byte {
	var x byte
	for i := 0; i < len(b); i += 512 {
		x ^= b[i]
	}
	if len(b) > 0 {
		x ^= b[len(b)-1]
	}
	return x
}

func (d *fakeDevice) StartQueue(q virtio.QueueSetup) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.startErr != nil {
		return d.startErr
	}
	if _, ok := d.running[q.Index]; ok {
		panic(fmt.Sprintf("queue %d started twice", q.Index))
	}
	if uint64(len(q.Desc)) != virtio.DescTableSize(q.Size) {
		panic("descriptor table of wrong size")
	}
	touch(q.Desc)
	touch(q.Avail)
	touch(q.Used)
	d.running[q.Index] = q
	d.starts = append(d.starts, q)
	d.events = append(d.events, fmt.Sprintf("start %d", q.Index))
	return nil
}

func (d *fakeDevice) StopQueue(idx int) (uint16, error) {
	d.mu.Lock()
	gate := d.stopGate
	d.mu.Unlock()
	if gate != nil {
		<-gate
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	q, ok := d.running[idx]
	if !ok {
		panic(fmt.Sprintf("queue %d stopped while not running", idx))
	}
	// The memory must still be mapped when a queue stops.
	touch(q.Desc)
	touch(q.Used)
	if d.stopErr != nil {
		d.events = append(d.events, fmt.Sprintf("stop %d failed", idx))
		return 0, d.stopErr
	}
	delete(d.running, idx)
	d.stops = append(d.stops, idx)
	d.events = append(d.events, fmt.Sprintf("stop %d", idx))
	return q.LastAvail + d.progress, nil
}

func (d *fakeDevice) SetQueueCall(idx int, call *eventfd.FD) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	q, ok := d.running[idx]
	if !ok {
		panic(fmt.Sprintf("call fd of queue %d set while not running", idx))
	}
	q.Call = call
	d.running[idx] = q
	d.events = append(d.events, fmt.Sprintf("call %d", idx))
	return nil
}

func (d *fakeDevice) SetConfigChangeNotifier(notify func() error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.notify = notify
	if notify == nil {
		d.events = append(d.events, "notifier nil")
	} else {
		d.events = append(d.events, "notifier set")
	}
}

func (d *fakeDevice) runningQueue(idx int) (virtio.QueueSetup, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	q, ok := d.running[idx]
	return q, ok
}

func (d *fakeDevice) numRunning() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.running)
}

func (d *fakeDevice) eventLog() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.events...)
}

func (d *fakeDevice) notifier() func() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.notify
}

type testServer struct {
	srv  *Server
	dev  *fakeDevice
	path string
	log  *testenv.Buffer
	done chan error
}

func startServer(t testing.TB, dev *fakeDevice) *testServer {
	t.Helper()
	dir, err := os.MkdirTemp("", "vhu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ts := &testServer{dev: dev, path: filepath.Join(dir, "blk.sock"), log: &testenv.Buffer{}, done: make(chan error, 1)}
	ts.srv, err = Listen(ServerOptions{
		SocketPath: ts.path,
		Logger:     slog.New(slog.NewTextHandler(ts.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Name:       "test",
	}, dev)
	if err != nil {
		t.Fatal(err)
	}
	go func() { ts.done <- ts.srv.Serve(context.Background()) }()
	t.Cleanup(func() {
		ts.srv.Close()
		select {
		case err := <-ts.done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
		if strings.Contains(ts.log.String(), "panic while serving") {
			t.Errorf("the server recovered from a panic")
		}
		if t.Failed() {
			t.Logf("server log:\n%s", ts.log.String())
		}
	})
	return ts
}

// client is a test front-end speaking raw messages.
type client struct {
	t    *testing.T
	conn *Conn
	ack  bool // REPLY_ACK negotiated: ask for acknowledgements
}

func dial(t *testing.T, path string) *client {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{t: t, conn: NewConn(c)}
}

func (c *client) write(req Request, flags uint32, payload []byte, files ...*os.File) {
	c.t.Helper()
	if err := c.conn.Write(Header{Request: req, Flags: flags}, payload, files...); err != nil {
		c.t.Fatalf("write %v: %v", req, err)
	}
}

func (c *client) read(req Request) Message {
	c.t.Helper()
	m, err := c.conn.Read()
	if err != nil {
		c.t.Fatalf("read reply to %v: %v", req, err)
	}
	if m.Header.Request != req || !m.Header.IsReply() {
		c.t.Fatalf("got %v flags %#x, want reply to %v", m.Header.Request, m.Header.Flags, req)
	}
	return m
}

// send sends a request without a reply of its own; with REPLY_ACK it
// asks for an acknowledgement and returns whether it reported success.
func (c *client) send(req Request, payload []byte, files ...*os.File) error {
	c.t.Helper()
	var flags uint32
	if c.ack {
		flags = FlagNeedReply
	}
	c.write(req, flags, payload, files...)
	if !c.ack {
		return nil
	}
	m := c.read(req)
	v, err := DecodeU64(m.Payload)
	if err != nil {
		c.t.Fatalf("ack for %v: %v", req, err)
	}
	if v != 0 {
		return fmt.Errorf("%v failed (%d)", req, v)
	}
	return nil
}

func (c *client) mustSend(req Request, payload []byte, files ...*os.File) {
	c.t.Helper()
	if err := c.send(req, payload, files...); err != nil {
		c.t.Fatal(err)
	}
}

func (c *client) getU64(req Request) uint64 {
	c.t.Helper()
	c.write(req, 0, nil)
	v, err := DecodeU64(c.read(req).Payload)
	if err != nil {
		c.t.Fatal(err)
	}
	return v
}

// expectClosed checks the server closed the connection.
func (c *client) expectClosed() {
	c.t.Helper()
	m, err := c.conn.Read()
	if err == nil {
		c.t.Fatalf("connection still open: got %v", m.Header.Request)
	}
	if !isClosed(err) {
		c.t.Fatalf("want closed connection, got %v", err)
	}
}

// negotiate runs the usual start of a session. With protocol it
// negotiates PROTOCOL_FEATURES and REPLY_ACK among the protocol features.
func (c *client) negotiate(dev *fakeDevice, protocol bool) {
	c.t.Helper()
	feat := c.getU64(ReqGetFeatures)
	if protocol {
		c.getU64(ReqGetProtocolFeatures)
		c.mustSend(ReqSetProtocolFeatures, EncodeU64(OfferedProtocolFeatures))
		c.ack = true
	} else {
		feat &^= 1 << FeatureProtocolFeatures
	}
	c.mustSend(ReqSetOwner, nil)
	c.mustSend(ReqSetFeatures, EncodeU64(feat))
}

// guestRAM is memfd-backed guest memory, mapped in the test too.
type guestRAM struct {
	file *os.File
	mem  []byte
}

func newGuestRAM(t testing.TB, size int) *guestRAM {
	t.Helper()
	fd, err := unix.MemfdCreate("guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "guest-ram")
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m); f.Close() })
	return &guestRAM{file: f, mem: m}
}

func eventFd(t testing.TB) *os.File {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "eventfd")
	t.Cleanup(func() { f.Close() })
	return f
}

// Test memory layout: one region of 1 MiB at guest address 0 and user
// address userBase; ring i lives at offset ringOff(i).
const (
	ramSize  = 1 << 20
	userBase = 0x7f0000000000
)

func ringOff(i int) uint64 { return 0x10000 + uint64(i)*0x10000 }

func ringAddr(i int, base uint64) VringAddr {
	off := base + ringOff(i)
	return VringAddr{Index: uint32(i), DescUser: off, AvailUser: off + 0x4000, UsedUser: off + 0x8000}
}

// setupRing sends what QEMU sends for one ring before enabling it.
func (c *client) setupRing(t *testing.T, i int, size uint32) {
	t.Helper()
	c.mustSend(ReqSetVringNum, VringState{Index: uint32(i), Num: size}.Encode())
	c.mustSend(ReqSetVringBase, VringState{Index: uint32(i), Num: 3}.Encode())
	c.mustSend(ReqSetVringAddr, ringAddr(i, userBase).Encode())
	c.mustSend(ReqSetVringKick, EncodeU64(uint64(i)), eventFd(t))
	c.mustSend(ReqSetVringCall, EncodeU64(uint64(i)), eventFd(t))
}

// startRing sets ring i up as QEMU does and enables it.
func (c *client) startRing(t *testing.T, i int, size uint32) {
	t.Helper()
	c.setupRing(t, i, size)
	c.mustSend(ReqSetVringEnable, VringState{Index: uint32(i), Num: 1}.Encode())
}

// negotiated starts a server for a new fake device and connects a
// front-end that has negotiated its features, protocol features included.
func negotiated(t *testing.T) (*fakeDevice, *testServer, *client) {
	t.Helper()
	dev := newFakeDevice()
	ts := startServer(t, dev)
	c := dial(t, ts.path)
	c.negotiate(dev, true)
	return dev, ts, c
}

// guestRange reads guest memory through running queue idx's Memory, under
// the device lock: the server unmaps only after StopQueue, which takes the
// same lock, so the read is ordered before any unmap.
func (d *fakeDevice) guestRange(idx int, addr, size uint64) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	q, ok := d.running[idx]
	if !ok {
		return "", fmt.Errorf("queue %d not running", idx)
	}
	b, err := q.Mem.Range(addr, size)
	return string(b), err
}

// ringPrefixes returns the first n bytes of queue idx's descriptor table
// and used ring, under the device lock.
func (d *fakeDevice) ringPrefixes(idx, n int) (desc, used string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	q := d.running[idx]
	return string(q.Desc[:n]), string(q.Used[:n])
}
