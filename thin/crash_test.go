package thin

import (
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"sync"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// crashData is a data file that forgets what was not synced: writes land
// in cur and are logged; Sync makes cur durable; crash returns a file
// holding the durable bytes plus a random subset of the unsynced writes,
// sector by sector (a real disk may persist any of them, in any order).
type crashData struct {
	mu      sync.Mutex
	cur     []byte
	durable []byte
	ops     []dataOp
	syncErr error // injected
}

type dataOp struct {
	off   int64
	data  []byte
	trunc int64 // >= 0: a truncate to this size
}

func (d *crashData) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off >= int64(len(d.cur)) {
		return 0, io.EOF
	}
	n := copy(p, d.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (d *crashData) writeLocked(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(d.cur)) {
		d.cur = append(d.cur, make([]byte, end-int64(len(d.cur)))...)
	}
	copy(d.cur[off:], p)
	d.ops = append(d.ops, dataOp{off: off, data: append([]byte(nil), p...), trunc: -1})
}

func (d *crashData) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.writeLocked(p, off)
	return len(p), nil
}

// WriteVAt logs one write per buffer: the crash model persists any subset
// of sectors anyway, so a vectored write is no more atomic than its parts.
func (d *crashData) WriteVAt(bufs [][]byte, off int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bufs {
		d.writeLocked(b, off)
		off += int64(len(b))
	}
	return nil
}

func (d *crashData) ZeroRange(off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off+n > int64(len(d.cur)) {
		return fmt.Errorf("zero range %d+%d beyond file size %d", off, n, len(d.cur))
	}
	d.writeLocked(make([]byte, n), off)
	return nil
}

// PunchHole zeros the range: after a crash each sector may still hold
// its old bytes until a Sync, as with any unsynced write.
func (d *crashData) PunchHole(off, n int64) error { return d.ZeroRange(off, n) }

// Allocate changes nothing: the crash model has no host space to run out
// of (hostLimitData adds that).
func (d *crashData) Allocate(off, n int64) error { return nil }

func (d *crashData) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.syncErr != nil {
		return d.syncErr
	}
	d.durable = append(d.durable[:0], d.cur...)
	d.ops = nil
	return nil
}

func (d *crashData) Truncate(size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if size <= int64(len(d.cur)) {
		d.cur = d.cur[:size]
	} else {
		d.cur = append(d.cur, make([]byte, size-int64(len(d.cur)))...)
	}
	d.ops = append(d.ops, dataOp{trunc: size})
	return nil
}

func (d *crashData) Size() (int64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return int64(len(d.cur)), nil
}

func (d *crashData) Close() error { return nil }

func (d *crashData) crash(rng *rand.Rand) *crashData {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := append([]byte(nil), d.durable...)
	for _, op := range d.ops {
		if op.trunc >= 0 {
			if rng.IntN(2) == 0 {
				if op.trunc <= int64(len(b)) {
					b = b[:op.trunc]
				} else {
					b = append(b, make([]byte, op.trunc-int64(len(b)))...)
				}
			}
			continue
		}
		for s := int64(0); s < int64(len(op.data)); s += 512 {
			if rng.IntN(2) == 0 {
				continue
			}
			e := min(s+512, int64(len(op.data)))
			if end := op.off + e; end > int64(len(b)) {
				b = append(b, make([]byte, end-int64(len(b)))...)
			}
			copy(b[op.off+s:], op.data[s:e])
		}
	}
	return &crashData{cur: b, durable: append([]byte(nil), b...)}
}

// machine is a simulated host: a crashable file system for Pebble and
// crashable data files.
type machine struct {
	fs    *vfs.MemFS
	files map[string]*crashData
	inj   *injector  // if set, the pools opened on it see its faults
	host  *hostSpace // nil: the data file's host has no limit
	boot  int        // which boot: a power cut starts the next one
}

func newMachine() *machine {
	return &machine{fs: vfs.NewCrashableMem(), files: map[string]*crashData{}}
}

func (m *machine) env() *env {
	e := m.plainEnv()
	if m.inj != nil {
		open := e.openData
		e.fs = m.inj.metaFS(m.fs)
		e.intentFS = m.fs
		e.openData = func(path string, create bool) (dataFile, error) {
			d, err := open(path, create)
			if err != nil {
				return nil, err
			}
			return faultData{d, m.inj}, nil
		}
	}
	return e
}

func (m *machine) plainEnv() *env {
	boot := fmt.Sprintf("boot-%d", m.boot)
	return &env{fs: m.fs, bootID: func() string { return boot }, openData: func(path string, create bool) (dataFile, error) {
		f, ok := m.files[path]
		switch {
		case create && ok:
			return nil, fs.ErrExist
		case create:
			f = &crashData{}
			m.files[path] = f
			// The name itself lives in the crashable fs.
			if nf, err := m.fs.Create(path, vfs.WriteCategoryUnspecified); err == nil {
				nf.Sync()
				nf.Close()
			}
		case !ok:
			return nil, fs.ErrNotExist
		}
		if m.host != nil {
			return &hostLimitData{dataFile: f, h: m.host}, nil
		}
		return f, nil
	}}
}

// crash returns the machine as it could be after a power cut now.
func (m *machine) crash(rng *rand.Rand) *machine {
	n := &machine{
		fs:    m.fs.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 30, RNG: rand.New(rand.NewPCG(rng.Uint64(), rng.Uint64()))}),
		files: map[string]*crashData{},
		inj:   m.inj,
		host:  m.host.crash(rng),
		boot:  m.boot + 1,
	}
	for k, f := range m.files {
		n.files[k] = f.crash(rng)
	}
	return n
}

// abandon drops an open pool without committing anything, as a crash
// would (its files are left to the old machine).
func (p *Pool) abandon() {
	close(p.closing)
	<-p.bgDone
	p.flushMu.Lock()
	// A crash can cut a release phase anywhere; letting it finish first
	// loses nothing of that: its punches are unsynced writes the crash
	// may drop.
	p.awaitReleaseLocked()
	p.mu.Lock()
	p.closed = true
	close(p.spaceCh)
	p.spaceCh = make(chan struct{})
	p.mu.Unlock()
	p.flushMu.Unlock()
	p.ioGate.Lock()
	p.store.Close()
	p.lock.Close()
	p.ioGate.Unlock()
}
