package vhostuser

import (
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// logFile is a memfd of size bytes for a dirty log, mapped in the test.
func logFile(t *testing.T, size int) (*os.File, []byte) {
	t.Helper()
	ram := newGuestRAM(t, size)
	return ram.file, ram.mem
}

// A migration's sequence on running rings: SET_LOG_BASE (answered),
// LOG_ALL on, SET_VRING_ADDR with the log flag; then off again. No ring
// is stopped or restarted, and the running queue's log marks the bits of
// the pages it is told about, the used ring at log_guest_addr.
func TestDirtyLogOnRunningRings(t *testing.T) {
	dev, ts, c := negotiated(t)
	setupMem(t, c)
	c.startRing(t, 0, 128)
	q, ok := dev.runningQueue(0)
	if !ok || q.DirtyLog == nil {
		t.Fatal("ring not running with a dirty log")
	}
	if q.DirtyLog.Logging() {
		t.Fatal("logging before LOG_ALL")
	}
	events := len(dev.eventLog())

	f, bits := logFile(t, 4096)
	c.write(ReqSetLogBase, 0, LogBase{MmapSize: 32}.Encode(), f) // 1 MiB of RAM: 256 pages
	if m := c.read(ReqSetLogBase); len(m.Payload) != 8 {
		t.Fatalf("SET_LOG_BASE reply of %d bytes", len(m.Payload))
	}
	feat := c.getU64(ReqGetFeatures) &^ (1 << FeatureLogAll)
	c.mustSend(ReqSetFeatures, EncodeU64(feat|1<<FeatureLogAll))
	a := ringAddr(0, userBase)
	a.Flags, a.LogGuest = VringFlagLog, 0x18000
	c.mustSend(ReqSetVringAddr, a.Encode())
	if !q.DirtyLog.Logging() {
		t.Fatal("not logging after LOG_ALL")
	}
	// SET_LOG_FD: an eventfd signalled after marks.
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	logCall := os.NewFile(uintptr(efd), "log-call")
	defer logCall.Close()
	c.mustSend(ReqSetLogFd, nil, logCall)
	q.DirtyLog.LogWrite(0x5000, 0x2001) // pages 5, 6, 7
	q.DirtyLog.LogWrite(0xfffff, 1)     // page 255, the last
	q.DirtyLog.LogUsed(4, 8)            // page 0x18
	var cnt [8]byte
	if n, err := unix.Read(efd, cnt[:]); n != 8 || err != nil || cnt[0] == 0 {
		t.Errorf("log fd not signalled after marks: %d bytes, %v", n, err)
	}
	want := map[int]bool{5: true, 6: true, 7: true, 255: true, 0x18: true}
	for p := 0; p < 32*8; p++ {
		if got := bits[p/8]&(1<<(p%8)) != 0; got != want[p] {
			t.Errorf("page %d marked %v, want %v", p, got, want[p])
		}
	}
	// A log address that is not the used ring's is used, with a warning.
	odd := a
	odd.LogGuest = 0x20000
	c.mustSend(ReqSetVringAddr, odd.Encode())
	ts.log.WaitContains(t, "is not the used ring's guest address")
	q.DirtyLog.LogUsed(0, 2)
	if bits[0x20/8]&(1<<(0x20%8)) == 0 {
		t.Error("used ring write not logged at log_guest_addr")
	}
	c.mustSend(ReqSetVringAddr, a.Encode())
	// Another address while running is still refused.
	moved := a
	moved.UsedUser += 0x1000
	if err := c.send(ReqSetVringAddr, moved.Encode()); err == nil {
		t.Error("ring moved while running")
	}

	// Off again: nothing is marked any more.
	c.mustSend(ReqSetFeatures, EncodeU64(feat))
	a.Flags = 0
	c.mustSend(ReqSetVringAddr, a.Encode())
	if q.DirtyLog.Logging() {
		t.Fatal("logging after LOG_ALL was turned off")
	}
	clear(bits)
	q.DirtyLog.LogWrite(0x5000, 1)
	q.DirtyLog.LogUsed(0, 2)
	if i := slices.IndexFunc(bits, func(b byte) bool { return b != 0 }); i >= 0 {
		t.Errorf("log byte %d written with logging off", i)
	}
	if ev := dev.eventLog()[events:]; len(ev) != 0 {
		t.Errorf("device events while logging was turned on and off: %v (rings must keep running)", ev)
	}
}

// SET_LOG_BASE is hostile input: every bad log closes the connection (the
// front-end waits for the reply, and a migration must not go on without a
// usable log), with a log line; the server serves the next front-end.
func TestSetLogBaseValidation(t *testing.T) {
	eventfd := func(t *testing.T) *os.File { return eventFd(t) }
	memfd := func(size int) func(t *testing.T) *os.File {
		return func(t *testing.T) *os.File { f, _ := logFile(t, size); return f }
	}
	for _, tc := range []struct {
		name string
		lb   LogBase
		file func(t *testing.T) *os.File
		want string
	}{
		{"empty", LogBase{}, memfd(4096), "empty dirty log"},
		{"smaller than memory", LogBase{MmapSize: 16}, memfd(4096), "does not cover guest memory"},
		{"beyond the file", LogBase{MmapSize: 64, MmapOffset: 4096}, memfd(4096), "exceeds the file"},
		{"offset misaligned", LogBase{MmapSize: 32, MmapOffset: 4}, memfd(4096), "not 8-byte aligned"},
		{"huge", LogBase{MmapSize: 1 << 60}, memfd(4096), "exceeds"},
		{"offset huge", LogBase{MmapSize: 32, MmapOffset: 1 << 62}, memfd(4096), "too large"},
		{"not a file", LogBase{MmapSize: 32}, eventfd, "exceeds the file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newFakeDevice()
			ts := startServer(t, dev)
			c := dial(t, ts.path)
			c.negotiate(dev, true)
			setupMem(t, c)
			c.write(ReqSetLogBase, 0, tc.lb.Encode(), tc.file(t))
			c.expectClosed()
			ts.log.WaitContains(t, tc.want)
			c2 := dial(t, ts.path)
			c2.getU64(ReqGetFeatures)
		})
	}
}

// A log too small for a memory table that grows under it is reported.
func TestMemoryBeyondDirtyLog(t *testing.T) {
	_, ts, c := negotiated(t)
	setupMem(t, c)
	f, _ := logFile(t, 4096)
	c.write(ReqSetLogBase, 0, LogBase{MmapSize: 32}.Encode(), f)
	c.read(ReqSetLogBase)
	c.mustSend(ReqSetFeatures, EncodeU64(c.getU64(ReqGetFeatures)))
	ram := newGuestRAM(t, 2*ramSize)
	c.mustSend(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: 2 * ramSize, UserAddr: userBase}}), ram.file)
	ts.log.WaitContains(t, "memory table reaches beyond the dirty log")
}
