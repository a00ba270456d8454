package pebblemeta

import (
	"errors"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// A commit whose log cannot be synced (the disk refused it) makes Pebble
// call Fatalf; the commit returns ErrStoreFailed instead of the process
// going down, and the store on the disk still opens with what the last
// good commit wrote.
func TestCommitLogSyncFailure(t *testing.T) {
	mem := vfs.NewCrashableMem()
	var failSync atomic.Bool
	fs := errorfs.Wrap(mem, errorfs.InjectorFunc(func(op errorfs.Op) error {
		if failSync.Load() && strings.HasSuffix(op.Path, ".log") &&
			(op.Kind == errorfs.OpFileSync || op.Kind == errorfs.OpFileSyncData || op.Kind == errorfs.OpFileSyncTo) {
			return syscall.EIO
		}
		return nil
	}))
	s, err := Create("meta", PoolRecord{BlockSize: 4096, SizeBlocks: 10}, Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	b.SetPool(PoolRecord{BlockSize: 4096, SizeBlocks: 20})
	if err := b.Commit(true); err != nil {
		t.Fatal(err)
	}
	failSync.Store(true)
	b = s.NewBatch()
	b.SetPool(PoolRecord{BlockSize: 4096, SizeBlocks: 30})
	err = b.Commit(true)
	if !errors.Is(err, ErrStoreFailed) {
		t.Fatalf("commit with a failing log sync: %v, want ErrStoreFailed", err)
	}
	failSync.Store(false)
	crashed := mem.CrashClone(vfs.CrashCloneCfg{UnsyncedDataPercent: 0})
	s2, err := Open("meta", Options{FS: crashed})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if p, err := s2.Pool(); err != nil || p.SizeBlocks != 20 {
		t.Fatalf("after the failure the store holds %+v (%v), want the last good commit's 20 blocks", p, err)
	}
}
