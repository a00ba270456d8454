package thin

import (
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// Fault injection for the model tests: one injector decides for the
// metadata store's file system (through pebble's errorfs, the interface
// the real disk is used through) and for the data file (a wrapper on
// dataFile) which operation fails, and takes crash clones of the machine
// at chosen points.

// faultOp is a kind of operation that can fail.
type faultOp int

const (
	metaWrite faultOp = iota
	metaSync
	metaCreate
	metaRename
	dataWrite
	dataSync
	dataPunch
	dataZero
	numFaultOps
)

var faultOpNames = [numFaultOps]string{"meta-write", "meta-sync", "meta-create", "meta-rename",
	"data-write", "data-sync", "data-punch", "data-zero"}

func (o faultOp) String() string { return faultOpNames[o] }

// injector fails the n-th operation of the armed kinds after arm (and,
// if sticky, every later one of those kinds until disarm: a disk that
// stays full or broken), and calls onPoint before every sync and punch
// (crash points inside a commit and a release phase).
type injector struct {
	mu      sync.Mutex
	kinds   [numFaultOps]bool
	left    int // matching operations to let pass before failing
	sticky  bool
	errno   syscall.Errno
	fired   int
	firedOp []string
	onPoint func(op faultOp)
}

func (in *injector) arm(kinds []faultOp, nth int, sticky bool, errno syscall.Errno) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.kinds = [numFaultOps]bool{}
	for _, k := range kinds {
		in.kinds[k] = true
	}
	in.left, in.sticky, in.errno, in.fired, in.firedOp = nth, sticky, errno, 0, nil
}

func (in *injector) disarm() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.kinds = [numFaultOps]bool{}
	in.fired, in.firedOp = 0, nil
}

// firedOps reports the injected failures since arm.
func (in *injector) firedOps() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]string(nil), in.firedOp...)
}

func (in *injector) setPoint(fn func(op faultOp)) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.onPoint = fn
}

// maybe returns the error op fails with, or nil.
func (in *injector) maybe(op faultOp, what string) error {
	in.mu.Lock()
	point := in.onPoint
	var err error
	if in.kinds[op] {
		if in.left > 0 {
			in.left--
		} else if in.fired == 0 || in.sticky {
			in.fired++
			in.firedOp = append(in.firedOp, op.String()+" "+what)
			err = &os.PathError{Op: "injected " + op.String(), Path: what, Err: in.errno}
		}
	}
	in.mu.Unlock()
	if point != nil && err == nil && (op == metaSync || op == dataSync || op == dataPunch) {
		point(op)
	}
	return err
}

// metaFS wraps the pebble file system with the injector.
func (in *injector) metaFS(fs vfs.FS) vfs.FS {
	return errorfs.Wrap(fs, errorfs.InjectorFunc(func(op errorfs.Op) error {
		switch op.Kind {
		case errorfs.OpFileWrite, errorfs.OpFileWriteAt, errorfs.OpFilePreallocate:
			return in.maybe(metaWrite, op.Path)
		case errorfs.OpFileSync, errorfs.OpFileSyncData, errorfs.OpFileSyncTo, errorfs.OpFileFlush:
			return in.maybe(metaSync, op.Path)
		case errorfs.OpCreate, errorfs.OpReuseForWrite, errorfs.OpMkdirAll:
			return in.maybe(metaCreate, op.Path)
		case errorfs.OpRename, errorfs.OpLink:
			return in.maybe(metaRename, op.Path)
		}
		return nil
	}))
}

// faultData is a data file whose writes, syncs, punches and zeroing go
// through the injector first (a failed one changes nothing).
type faultData struct {
	dataFile
	in *injector
}

func (d faultData) WriteAt(p []byte, off int64) (int, error) {
	if err := d.in.maybe(dataWrite, fmt.Sprintf("data %d+%d", off, len(p))); err != nil {
		return 0, err
	}
	return d.dataFile.WriteAt(p, off)
}

func (d faultData) WriteVAt(bufs [][]byte, off int64) error {
	if err := d.in.maybe(dataWrite, fmt.Sprintf("data %d (%d buffers)", off, len(bufs))); err != nil {
		return err
	}
	return d.dataFile.WriteVAt(bufs, off)
}

func (d faultData) Sync() error {
	if err := d.in.maybe(dataSync, "data"); err != nil {
		return err
	}
	return d.dataFile.Sync()
}

func (d faultData) PunchHole(off, n int64) error {
	if err := d.in.maybe(dataPunch, fmt.Sprintf("data %d+%d", off, n)); err != nil {
		return err
	}
	return d.dataFile.PunchHole(off, n)
}

func (d faultData) ZeroRange(off, n int64) error {
	if err := d.in.maybe(dataZero, fmt.Sprintf("data %d+%d", off, n)); err != nil {
		return err
	}
	return d.dataFile.ZeroRange(off, n)
}

// randomFault arms in with a random fault: one or a few kinds, the n-th
// such operation, EIO or ENOSPC, once or until disarmed.
func randomFault(in *injector, rng *rand.Rand) string {
	var kinds []faultOp
	switch rng.IntN(3) {
	case 0: // one kind
		kinds = []faultOp{faultOp(rng.IntN(int(numFaultOps)))}
	case 1: // the syncs of a commit
		kinds = []faultOp{metaSync, dataSync}
	default:
		for k := range numFaultOps {
			if rng.IntN(3) == 0 {
				kinds = append(kinds, k)
			}
		}
	}
	nth := rng.IntN(4)
	sticky := rng.IntN(3) == 0
	errno := []syscall.Errno{syscall.EIO, syscall.ENOSPC}[rng.IntN(2)]
	in.arm(kinds, nth, sticky, errno)
	return fmt.Sprintf("fault %v #%d sticky=%v %v", kinds, nth, sticky, errno)
}
