package blk_test

import (
	"sync"
	"testing"

	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// recordingLog is a virtio.DirtyLog that records what it is told (the
// real bitmap, and these same writes through vhost-user, are checked in
// vhostuser/frontend's TestDirtyLogMatchesModel).
type recordingLog struct {
	mu     sync.Mutex
	writes map[uint64]uint64 // guest address -> length
	used   int               // used-ring writes
}

func (l *recordingLog) Logging() bool { return true }
func (l *recordingLog) LogWrite(addr, size uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.writes[addr] = size
}
func (l *recordingLog) LogUsed(off, size uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.used++
}

// A migration stops the rings (GET_VRING_BASE) and then reads the dirty
// log one last time: a stop must return only after the requests in flight
// completed and their buffers and used elements were logged.
func TestStopLogsInFlightFirst(t *testing.T) {
	s, dev, d := newHeldDevice(t)
	log := &recordingLog{writes: map[uint64]uint64{}}
	setup := d.Setup(0)
	setup.DirtyLog = log
	if err := dev.StartQueue(setup); err != nil {
		t.Fatal(err)
	}
	var want []virtiotest.Buf
	for range 3 {
		data, status := d.AllocBuf(512, true, nil), d.AllocBuf(1, true, nil)
		d.AddChain(d.AllocBuf(16, false, header(blk.TypeIn, 0)), data, status)
		want = append(want, data, status)
	}
	d.KickNow()
	for dev.InFlight() != 3 {
		d.WaitCall(1)
	}
	done := make(chan struct{})
	go func() {
		if _, err := dev.StopQueue(0); err != nil {
			t.Error(err)
		}
		close(done)
	}()
	close(s.gate)
	<-done
	log.mu.Lock()
	defer log.mu.Unlock()
	for _, b := range want {
		if log.writes[b.Addr] != uint64(b.Len) {
			t.Errorf("buffer at %#x (%d bytes) not logged before the stop returned: %v", b.Addr, b.Len, log.writes)
		}
	}
	if len(log.writes) != len(want) {
		t.Errorf("%d buffers logged, want %d (the headers are read, not written)", len(log.writes), len(want))
	}
	if log.used < 6 { // an element and the index per completion
		t.Errorf("%d used-ring writes logged, want at least 6", log.used)
	}
}
