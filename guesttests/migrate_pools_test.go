package guesttests

import (
	"context"
	"fmt"
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

// TestGuestMigrateWhileWaitingForSpace (issue 14): a same-host migration (two QEMUs on one
// thinblk socket) starts while the guest's writes wait for space in a full pool (--no-space
// pause). QEMU's switch-over stops the rings, which waits for those requests; the pool then
// grows. The migration must complete (or fail and leave the source running), and the data the
// guest wrote, checksummed before, reads back whole wherever the guest runs at the end.
func TestGuestMigrateWhileWaitingForSpace(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: same-host migration needs two front-ends on one socket")
	}
	ctx := context.Background()
	dir := workDir(t)
	pool, socks, b := startPool(t, e, filepath.Join(dir, "p"), []string{"--size", "16M", "--no-space", "pause"}, [2]string{"data", "64M"})
	sock := filepath.Join(socks, "data.sock")
	vmOpts := func(n int, incoming string) QMPVMOptions {
		o := QMPVMOptions{VMOptions: VMOptions{
			Dir: filepath.Join(dir, fmt.Sprintf("vm%d", n)), Images: e.images,
			Disks: []DiskSpec{{Socket: sock}}, Logf: t.Logf,
		}}
		if incoming != "" {
			o.ExtraArgs = []string{"-incoming", incoming}
			o.BootTimeout = 5 * time.Minute
		}
		return o
	}
	vm, qs, err := StartVMWithQMP(ctx, vmOpts(0, ""))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	mon, err := vmsDialQMP(ctx, qs.QMP)
	if err != nil {
		t.Fatal(err)
	}
	defer mon.Close()
	w := migrationWatch{t: t, ctx: ctx, b: b}
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	// 24 MiB of random data into a 16 MiB pool: the writes past the pool's end wait.
	w.sh(vm, 3*time.Minute, "dd if=/dev/urandom of=/tmp/r bs=1M count=24 2>/dev/null && sha256sum < /tmp/r > /tmp/r.sum")
	w.sh(vm, time.Minute, "(dd if=/tmp/r of="+dev+" bs=1M oflag=direct 2>/tmp/dd.err; echo $? > /tmp/dd.done) >/dev/null 2>&1 &")
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(time.Second) {
		st, err := ThinblkStatus(ctx, e.thinblk, pool)
		if err != nil {
			t.Fatal(err)
		}
		if st.Pool.FreeBytes == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pool did not fill: %d bytes free", st.Pool.FreeBytes)
		}
	}
	if out := w.sh(vm, time.Minute, "cat /tmp/dd.done 2>/dev/null; true"); out != "" {
		t.Fatalf("dd ended with the pool full: %s", out)
	}

	migSock := filepath.Join(dir, "mig.sock")
	type started struct {
		vm  *VM
		err error
	}
	next := make(chan started, 1)
	go func() {
		v, _, err := StartVMWithQMP(ctx, vmOpts(1, "unix:"+migSock))
		next <- started{v, err}
	}()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(migSock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the destination QEMU did not listen")
		}
	}
	if err := mon.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(4) << 30}, nil); err != nil {
		t.Fatal(err)
	}
	if err := mon.Execute(ctx, "migrate", map[string]any{"uri": "unix:" + migSock}, nil); err != nil {
		t.Fatal(err)
	}
	// Wait until the migration reaches its switch-over: QEMU's monitor then blocks while the
	// rings stop, which waits for the guest's requests. A migration that completed here would
	// have moved the guest with its writes still waiting.
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		var st migrationStatus
		qctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := mon.Execute(qctx, "query-migrate", nil, &st)
		cancel()
		if err != nil {
			t.Logf("QEMU's monitor does not answer: the switch-over waits for the rings (%v)", err)
			break
		}
		if st.Status == "completed" {
			t.Fatal("the migration completed while the guest's writes waited for space")
		}
		if (st.Status != "setup" && st.Status != "active") || time.Now().After(deadline) {
			t.Logf("before the pool grows: migration %q", st.Status)
			break
		}
	}
	start := time.Now()
	if out, err := ThinblkCmd(ctx, e.thinblk, "pool", "grow", pool, "--size", "64M"); err != nil {
		t.Fatalf("pool grow: %v\n%s", err, out)
	}
	var st migrationStatus
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := mon.Execute(qctx, "query-migrate", nil, &st)
		cancel()
		if err == nil && (st.Status == "completed" || st.Status == "failed" || st.Status == "cancelled") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the migration did not end after the pool grew: %q %v", st.Status, err)
		}
	}
	t.Logf("migration %s %v after the pool grew: downtime %d ms, total %d ms %s", st.Status, time.Since(start).Round(time.Millisecond), st.Downtime, st.TotalTime, st.ErrorDesc)
	if st.Status == "completed" {
		n := <-next
		if n.err != nil {
			t.Fatalf("destination: %v", n.err)
		}
		t.Cleanup(n.vm.Kill)
		mon.Execute(ctx, "quit", nil, nil)
		vm = n.vm
	} else {
		t.Logf("the source runs on")
	}
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(time.Second) {
		out := strings.TrimSpace(w.sh(vm, time.Minute, "cat /tmp/dd.done 2>/dev/null; true"))
		if out == "0" {
			break
		}
		if out != "" {
			t.Fatalf("dd failed (%s): %s", out, w.sh(vm, time.Minute, "cat /tmp/dd.err"))
		}
		if time.Now().After(deadline) {
			t.Fatal("dd did not finish after the pool grew")
		}
	}
	if out := w.sh(vm, 2*time.Minute, "echo 3 > /proc/sys/vm/drop_caches; dd if="+dev+" bs=1M count=24 iflag=direct 2>/dev/null | sha256sum | cmp - /tmp/r.sum && echo same"); strings.TrimSpace(out) != "same" {
		t.Fatalf("the data read back differs from what the guest wrote: %s", out)
	}
	w.checkDmesg(vm, "at the end")
	if log := b.LogTail(400); strings.Contains(log, "refused") {
		t.Errorf("serve refused a front-end during the migration:\n%s", log)
	}
}
