package guesttests

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vmmigrate "github.com/thinblk/thinblk/migrate"
)

// controlSocket is the control socket a pool's serve recorded.
func controlSocket(t *testing.T, pool string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(pool, "control"))
	if err != nil {
		t.Fatalf("no control socket recorded in %s: %v", pool, err)
	}
	return strings.TrimSpace(string(b))
}

// TestGuestMigrateBetweenPools (issue 15): a guest on a volume of pool A
// runs verified writes (fio with crc32c read-back) and checksummed reads
// through the page cache on XFS while `thinblk migrate`'s orchestration
// (package migrate) moves it to pool B: two serves, two QEMUs, the volume
// streamed while the guest writes, QEMU's migration paused before
// switchover for the last delta. On B the guest keeps going, every round
// verified, xfs_repair -n clean, no disk trouble in the guest kernel's log.
// The downtime is logged.
func TestGuestMigrateBetweenPools(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: pools need thinblk serve")
	}
	ctx := context.Background()
	dir := workDir(t)
	poolA, poolB := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	socksA, socksB := filepath.Join(dir, "sa"), filepath.Join(dir, "sb")
	for _, args := range [][]string{
		{"pool", "create", poolA, "--size", "512M"},
		{"volume", "create", poolA, "data", "--size", "128M"},
		{"pool", "create", poolB, "--size", "512M"},
		// serve on B is started when a volume's socket exists.
		{"volume", "create", poolB, "spare", "--size", "1M"},
	} {
		if out, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatalf("thinblk %v: %v\n%s", args, err, out)
		}
	}
	var backs [2]*Backend
	for i, p := range []struct{ pool, sock string }{{poolA, filepath.Join(socksA, "data.sock")}, {poolB, filepath.Join(socksB, "spare.sock")}} {
		b, err := StartBackend(ctx, BackendOptions{
			Kind: ThinPool, Image: p.pool, Socket: p.sock, Queues: 1,
			LogPath: p.pool + "-backend.log", ThinblkBin: e.thinblk,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Stop(15 * time.Second) })
		backs[i] = b
	}
	vmOpts := func(name, sock, incoming string) QMPVMOptions {
		o := QMPVMOptions{VMOptions: VMOptions{
			Dir: filepath.Join(dir, name), Images: e.images,
			Disks: []DiskSpec{{Socket: sock, Queues: 1}},
			Logf:  t.Logf,
		}}
		if incoming != "" {
			o.ExtraArgs = []string{"-incoming", incoming}
			o.BootTimeout = 5 * time.Minute // StartVM waits for the agent through the migration
		}
		return o
	}
	vm, qs, err := StartVMWithQMP(ctx, vmOpts("vma", filepath.Join(socksA, "data.sock"), ""))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	w := migrationWatch{t: t, ctx: ctx, b: backs[0]}
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.startWorkload(vm, dev)
	w.advances(vm, "before migrating")

	type started struct {
		vm  *VM
		err error
	}
	next := make(chan started, 1)
	migSock := filepath.Join(dir, "mig.sock")
	dstDir := filepath.Join(dir, "vmb")
	o := vmmigrate.Options{
		Source:      vmmigrate.Endpoint{Thinblk: controlSocket(t, poolA), QEMU: qs.QMP},
		Destination: vmmigrate.Endpoint{Thinblk: controlSocket(t, poolB), QEMU: filepath.Join(dstDir, "qmp.sock")},
		Volumes:     []string{"data"},
		URI:         "unix:" + migSock,
		StartDestination: func(ctx context.Context) error {
			go func() {
				// StartVM returns once the agent answers: after the migration.
				v, _, err := StartVMWithQMP(context.Background(), vmOpts("vmb", filepath.Join(socksB, "data.sock"), "unix:"+migSock))
				next <- started{v, err}
			}()
			for {
				if _, err := os.Stat(migSock); err == nil {
					return nil
				}
				select {
				case n := <-next:
					next <- n
					return n.err
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(50 * time.Millisecond):
				}
			}
		},
		Timeout: 3 * time.Minute,
		Logf:    t.Logf,
	}
	res, err := vmmigrate.Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("migrated from pool A to pool B: full %d MiB, %d rounds, last delta %d KiB in %v, downtime %v, total %v",
		res.FullBytes>>20, res.Rounds, res.LastDeltaBytes>>10, res.LastDelta.Round(time.Millisecond), res.Downtime, res.Total.Round(time.Millisecond))
	n := <-next
	if n.err != nil {
		t.Fatalf("destination: %v", n.err)
	}
	t.Cleanup(n.vm.Kill)
	vm.Kill() // the source, paused after the migration
	vm = n.vm
	w.b = backs[1]
	w.advances(vm, "on pool B")
	w.checkDmesg(vm, "on pool B")
	w.finish(vm, dev)
}
