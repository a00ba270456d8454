package thin

import (
	"sync/atomic"
	"testing"
	"time"
)

// countingSync counts the data file's syncs.
type countingSync struct {
	dataFile
	syncs atomic.Int64
}

func (d *countingSync) Sync() error {
	d.syncs.Add(1)
	return d.dataFile.Sync()
}

// TestBackgroundCommitLeavesDataAlone: with only overwrites in place
// pending, background commits do not sync the data file (the guest's
// FLUSH does, as on a raw disk); with metadata pending they commit it,
// data first.
func TestBackgroundCommitLeavesDataAlone(t *testing.T) {
	m := newMachine()
	e := m.env()
	var cs *countingSync
	openData := e.openData
	e.openData = func(path string, create bool) (dataFile, error) {
		d, err := openData(path, create)
		if err == nil && !create {
			cs = &countingSync{dataFile: d}
			d = cs
		}
		return d, err
	}
	if err := create("/pool", CreateOptions{Size: 16 * 4 * kib, BlockSize: 4 * kib}, e); err != nil {
		t.Fatal(err)
	}
	o := quietOpts()
	o.FlushInterval = 10 * time.Millisecond
	p, err := open("/pool", o, e)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	v := mustVolume(t, p, "v", 8*4*kib)
	write(t, v, 0, pattern(4*kib, 1))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	before := cs.syncs.Load()
	write(t, v, 0, pattern(4*kib, 2)) // in place: data only
	time.Sleep(200 * time.Millisecond)
	if n := cs.syncs.Load() - before; n != 0 {
		t.Fatalf("%d data syncs in the background with only data pending", n)
	}
	write(t, v, 4*kib, pattern(4*kib, 3)) // a new block: metadata pending
	deadline := time.Now().Add(10 * time.Second)
	for cs.syncs.Load() == before {
		if time.Now().After(deadline) {
			t.Fatal("no background commit with a new mapping pending")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
