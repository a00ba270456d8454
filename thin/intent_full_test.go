package thin

import (
	"bytes"
	"sync/atomic"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"
)

// fullIntentFS is a file system on which the intent log's writes fail
// with ENOSPC while full is set, as on a full host.
type fullIntentFS struct {
	vfs.FS
	full *atomic.Bool
}

func (fs fullIntentFS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	if fs.full.Load() {
		return nil, unix.ENOSPC
	}
	f, err := fs.FS.Create(name, c)
	if err != nil {
		return nil, err
	}
	return fullIntentFile{f, fs.full}, nil
}

type fullIntentFile struct {
	vfs.File
	full *atomic.Bool
}

func (f fullIntentFile) Write(b []byte) (int, error) {
	if f.full.Load() {
		return 0, unix.ENOSPC
	}
	return f.File.Write(b)
}

// A request whose map changes the intent log cannot take (the host is
// full) commits before it completes: a kill right after loses nothing
// acknowledged, and the log starts again once it can.
func TestKilledProcessKeepsWritesTheIntentLogRefused(t *testing.T) {
	const bs = 4 * kib
	m := newMachine()
	var full atomic.Bool
	e := m.env()
	e.intentFS = fullIntentFS{m.fs, &full}
	if err := create("/pool", CreateOptions{Size: 256 * bs, BlockSize: bs}, e); err != nil {
		t.Fatal(err)
	}
	p, err := open("/pool", quietOpts(), e)
	if err != nil {
		t.Fatal(err)
	}
	v := mustVolume(t, p, "v", 100*bs)
	write(t, v, 0, pattern(bs, 1))
	full.Store(true)
	for vb := 1; vb < 20; vb++ {
		write(t, v, int64(vb)*bs, pattern(bs, byte(vb+1)))
	}
	if err := v.WriteZeroes(50*bs, 10*bs, false); err != nil { // reservations
		t.Fatal(err)
	}
	p.abandon() // kill -9, the log still full
	if p, err = open("/pool", quietOpts(), e); err != nil {
		t.Fatalf("open with the intent log's host full: %v", err)
	}
	if v, err = p.Volume("v"); err != nil {
		t.Fatal(err)
	}
	for vb := range 20 {
		if got := read(t, v, int64(vb)*bs, bs); !bytes.Equal(got, pattern(bs, byte(vb+1))) {
			t.Fatalf("block %d: an acknowledged write the intent log could not take was lost by the kill", vb)
		}
	}
	if err := p.Check(nil); err != nil {
		t.Fatal(err)
	}
	// Space again: the next commit restarts the log, and a kill keeps
	// what completed after it without a commit of its own.
	full.Store(false)
	write(t, v, 20*bs, pattern(bs, 21))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	commits := p.unloggedDurable.Load()
	write(t, v, 21*bs, pattern(bs, 22))
	if p.intent == nil || p.intent.failed != nil {
		t.Fatal("the intent log did not start again once it could")
	}
	if p.unloggedSeq.Load() != commits {
		t.Fatal("a write the intent log took still counts as unlogged")
	}
	p.abandon()
	if p, err = open("/pool", quietOpts(), e); err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if v, err = p.Volume("v"); err != nil {
		t.Fatal(err)
	}
	if got := read(t, v, 21*bs, bs); !bytes.Equal(got, pattern(bs, 22)) {
		t.Fatal("a write logged after the log restarted was lost by the kill")
	}
	if err := p.Check(nil); err != nil {
		t.Fatal(err)
	}
}
