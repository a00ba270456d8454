package thin

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"syscall"
	"testing"
)

// faultyPool creates a pool on a simulated machine whose disk faults
// come from the returned injector (disarmed).
func faultyPool(t *testing.T, blocks uint64) (*machine, *injector, *Pool) {
	t.Helper()
	m := newMachine()
	m.inj = &injector{}
	if err := create("/pool", CreateOptions{Size: blocks * mBlock, BlockSize: mBlock}, m.env()); err != nil {
		t.Fatal(err)
	}
	p, err := open("/pool", quietOpts(), m.env())
	if err != nil {
		t.Fatal(err)
	}
	return m, m.inj, p
}

// A grow whose fdatasync fails fails the pool: the failed sync may have
// dropped other writes' dirty pages, and the next sync would succeed
// regardless, so committing on would point metadata at lost data.
func TestGrowSyncFailureFailsPool(t *testing.T) {
	m, in, p := faultyPool(t, 16)
	v := mustVolume(t, p, "v", 8*mBlock)
	write(t, v, 0, pattern(mBlock, 1))
	in.arm([]faultOp{dataSync}, 0, false, syscall.EIO)
	if err := p.Grow(32 * mBlock); err == nil {
		t.Fatal("grow succeeded although the data sync failed")
	}
	in.disarm()
	if err := v.WriteAt([][]byte{make([]byte, mSector)}, 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("write after a failed sync: %v, want ErrFailed", err)
	}
	if st := p.Status(); st.Pool.Failed == "" {
		t.Fatalf("status does not show the failure: %+v", st.Pool)
	}
	p.abandon()
	m2 := m.crash(rand.New(rand.NewPCG(1, 2)))
	p2, err := open("/pool", quietOpts(), m2.env())
	if err != nil {
		t.Fatal(err)
	}
	defer p2.abandon()
	if err := p2.Check(nil); err != nil {
		t.Fatal(err)
	}
}

// A write that fails after part of it landed in place leaves that part
// readable; a FLUSH after it must still sync the data file, or what a
// read returned before a completed FLUSH is gone after a crash.
func TestFlushAfterFailedWriteSyncs(t *testing.T) {
	m, in, p := faultyPool(t, 16)
	a := mustVolume(t, p, "a", 8*mBlock)
	b := mustVolume(t, p, "b", 8*mBlock)
	// a's blocks 0 and 1 land on physical blocks apart: a two-block write
	// is two data file writes.
	write(t, a, 0, pattern(mBlock, 1))
	write(t, b, 0, pattern(mBlock, 2))
	write(t, a, mBlock, pattern(mBlock, 3))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	in.arm([]faultOp{dataWrite}, 1, false, syscall.EIO)
	if err := a.WriteAt([][]byte{pattern(2*mBlock, 4)}, 0); err == nil {
		t.Fatal("write succeeded although its second piece failed")
	}
	in.disarm()
	landed := read(t, a, 0, mBlock)
	if !bytes.Equal(landed, pattern(2*mBlock, 4)[:mBlock]) {
		t.Fatal("the first piece did not land (the test's premise)")
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	p.abandon()
	for seed := range uint64(8) {
		m2 := m.crash(rand.New(rand.NewPCG(seed, 3)))
		p2, err := open("/pool", quietOpts(), m2.env())
		if err != nil {
			t.Fatal(err)
		}
		a2, _ := p2.Volume("a")
		if got := read(t, a2, 0, mBlock); !bytes.Equal(got, landed) {
			t.Fatalf("crash %d: data read before a completed FLUSH is gone", seed)
		}
		p2.abandon()
	}
}
