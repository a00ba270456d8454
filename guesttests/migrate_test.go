package guesttests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/qmp"
)

// migrationStatus is what query-migrate reports.
type migrationStatus struct {
	Status    string `json:"status"`
	Downtime  int64  `json:"downtime"`   // ms the guest was stopped
	TotalTime int64  `json:"total-time"` // ms
	ErrorDesc string `json:"error-desc"`
	RAM       struct {
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
}

// migrate migrates the VM behind mon to uri and waits until the migration has completed.
func migrate(t *testing.T, mon *qmp.Client, uri string) migrationStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// QEMU 7.2's default bandwidth (32 MiB/s) would make a 1 GiB guest take half a minute.
	if err := mon.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(4) << 30}, nil); err != nil {
		t.Fatalf("migrate-set-parameters: %v", err)
	}
	if err := mon.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		t.Fatalf("migrate to %s: %v", uri, err)
	}
	for {
		var st migrationStatus
		if err := mon.Execute(ctx, "query-migrate", nil, &st); err != nil {
			t.Fatalf("query-migrate: %v", err)
		}
		switch st.Status {
		case "completed":
			return st
		case "failed", "cancelled":
			t.Fatalf("migration to %s %s: %s", uri, st.Status, st.ErrorDesc)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// migrationWriter is fioWriter in rounds of 8 MiB: each hop waits for a round to finish on
// the destination, and a TCG guest takes long over 24 MiB.
var migrationWriter = strings.Replace(fioWriter, "--size=24M", "--size=8M", 1)

// migrationReader checks, in rounds, that four 8 MiB files of random data read back with the
// checksums they were written with. Each round drops the page cache, reads one file into it
// (the back-end writes those guest pages), waits two seconds and only then checksums the file
// from the page cache. A migration that switches over in between and loses the back-end's
// writes (no dirty log) leaves the destination with stale pages, which hold another file's
// data (pages are recycled round to round): the checksum differs.
const migrationReader = `(for f in 0 1 2 3; do dd if=/dev/urandom of=/mnt/d/r$f bs=1M count=8 conv=fsync 2>/dev/null
		sha256sum < /mnt/d/r$f > /tmp/r$f.sum; done
	i=0; while [ ! -e /tmp/stop ]; do
		f=$((i % 4)); echo 3 > /proc/sys/vm/drop_caches; cat /mnt/d/r$f > /dev/null; sleep 2
		sha256sum < /mnt/d/r$f | cmp -s - /tmp/r$f.sum || { echo "read round $i: r$f differs" >> /tmp/fail; break; }
		i=$((i+1)); echo $i > /tmp/read.rounds.new; mv /tmp/read.rounds.new /tmp/read.rounds
	done; echo reads >> /tmp/finished) >/dev/null 2>&1 &`

// guestIOErrors are the guest kernel's complaints about its disk that do not taint it: a
// driver that saw a completion of a head it did not submit, failed requests, hung tasks.
var guestIOErrors = regexp.MustCompile(`(?m)^.*(is not a head|I/O error|blk_update_request|blocked for more than|virtio_blk.*(error|fail)).*$`)

// TestGuestLiveMigration: a guest with a thin volume on two queues runs verified writes (fio
// with crc32c read-back, rounds without end) and checksummed reads through the page cache
// (migrationReader) on XFS while it migrates between QEMUs on this
// host through the same thinblk socket: the destination QEMU (-incoming) connects while the
// source still runs, and serve hands the rings over when the source stops its own. A snapshot
// and a clone of the volume exist. Three hops, each to a new QEMU; after each the guest keeps
// going on the destination (fio and reader rounds advance), no verification fails, the guest kernel
// reports no I/O trouble; at the end xfs_repair -n is clean. Before the hops, a migration to
// `exec:cat > /dev/null` (QEMU refused it before dirty logging) completes and the source
// continues. The downtimes are logged.
func TestGuestLiveMigration(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: same-host migration needs two front-ends on one socket")
	}
	if migrationWriter == fioWriter {
		t.Fatal("migrationWriter did not shrink fioWriter's rounds")
	}
	ctx := context.Background()
	dir := workDir(t)
	pool := filepath.Join(dir, "pool")
	socks := filepath.Join(dir, "socks")
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "512M"},
		{"volume", "create", pool, "data", "--size", "128M"},
	} {
		if out, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatalf("thinblk %v: %v\n%s", args, err, out)
		}
	}
	b, err := StartBackend(ctx, BackendOptions{
		Kind: ThinPool, Image: pool, Socket: filepath.Join(socks, "data.sock"), Queues: 2,
		LogPath: filepath.Join(dir, "pool-backend.log"), ThinblkBin: e.thinblk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(15 * time.Second) })
	sock := filepath.Join(socks, "data.sock")

	vmOpts := func(n int, incoming string) QMPVMOptions {
		o := QMPVMOptions{VMOptions: VMOptions{
			Dir: filepath.Join(dir, fmt.Sprintf("vm%d", n)), Images: e.images,
			Disks: []DiskSpec{{Socket: sock, Queues: 2}},
			Logf:  t.Logf,
			// The kernel zeroes pages it allocates (Debian's default): a page read from
			// disk into the page cache would then be written by the CPU just before the
			// device fills it, and migrated again for that. Without, the device alone
			// writes it, and only the dirty log tells QEMU to send it again.
			KernelArgs: "init_on_alloc=0",
		}}
		if incoming != "" {
			o.ExtraArgs = []string{"-incoming", incoming}
			// StartVM waits for the agent through the whole migration.
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
	w := migrationWatch{t: t, ctx: ctx, b: b}
	advances, checkDmesg := w.advances, w.checkDmesg
	dev, err := vm.DiskDevice(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.startWorkload(vm, dev)
	for _, args := range [][]string{{"snapshot", "create", pool, "data", "snap"}, {"snapshot", "create", pool, "data", "clone", "--writable"}} {
		if out, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatalf("thinblk %v: %v\n%s", args, err, out)
		}
	}
	advances(vm, "before migrating")

	// Migrating to a file-like sink used to be refused (no LOG_SHMFD); the source continues.
	st := migrate(t, mon, "exec:cat > /dev/null")
	t.Logf("migration to exec:cat: downtime %d ms, total %d ms, %d MiB", st.Downtime, st.TotalTime, st.RAM.Transferred>>20)
	if err := mon.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatalf("cont after the migration to exec: %v", err)
	}
	advances(vm, "after the migration to exec:cat")

	const hops = 3
	for hop := 1; hop <= hops; hop++ {
		migSock := filepath.Join(dir, fmt.Sprintf("mig%d.sock", hop))
		type started struct {
			vm  *VM
			qs  QMPSockets
			err error
		}
		next := make(chan started, 1)
		go func() {
			// StartVM returns once the agent answers: after the migration.
			v, q, err := StartVMWithQMP(ctx, vmOpts(hop, "unix:"+migSock))
			next <- started{v, q, err}
		}()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if _, err := os.Stat(migSock); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("hop %d: the destination QEMU did not listen on %s", hop, migSock)
			}
		}
		start := time.Now()
		st := migrate(t, mon, "unix:"+migSock)
		t.Logf("hop %d: downtime %d ms, total %d ms (%v as seen here), %d MiB", hop, st.Downtime, st.TotalTime,
			time.Since(start).Round(time.Millisecond), st.RAM.Transferred>>20)
		n := <-next
		if n.err != nil {
			t.Fatalf("hop %d: destination: %v", hop, n.err)
		}
		t.Cleanup(n.vm.Kill)
		// The source, paused after the migration, goes away: its session ends.
		if err := mon.Execute(ctx, "quit", nil, nil); err != nil {
			t.Logf("hop %d: quit the source: %v", hop, err)
		}
		mon.Close()
		select {
		case <-vm.Exited():
		case <-time.After(30 * time.Second):
			t.Fatalf("hop %d: the source QEMU did not quit", hop)
		}
		vm, qs = n.vm, n.qs
		if mon, err = vmsDialQMP(ctx, qs.QMP); err != nil {
			t.Fatal(err)
		}
		advances(vm, fmt.Sprintf("hop %d", hop))
		checkDmesg(vm, fmt.Sprintf("hop %d", hop))
	}
	defer mon.Close()

	w.finish(vm, dev)
	if log := b.LogTail(400); strings.Contains(log, "refused") || strings.Contains(log, "ring not started") {
		t.Errorf("serve refused a front-end or a ring during the migrations:\n%s", log)
	}
}

// migrationWatch runs and watches the migration tests' guest workload: fio
// with verification and migrationReader on XFS, in rounds.
type migrationWatch struct {
	t   *testing.T
	ctx context.Context
	b   *Backend // whose log a failure shows
}

func (w migrationWatch) sh(vm *VM, timeout time.Duration, script string) string {
	w.t.Helper()
	res, err := vm.Run(w.ctx, timeout, script)
	if err != nil || res.TimedOut || res.ExitCode != 0 {
		w.t.Fatalf("guest script %q: %v (exit %v):\n%s%s\n%s", script, err, res.ExitCode, res.Stdout, res.Stderr, tail(vm.Diagnostics(), 20))
	}
	return string(res.Stdout)
}

// startWorkload makes XFS on dev and starts fio and the reader.
func (w migrationWatch) startWorkload(vm *VM, dev string) {
	w.t.Helper()
	w.sh(vm, 3*time.Minute, mkfsSmallXFS+" "+dev+" && mkdir -p /mnt/d && mount "+dev+" /mnt/d && rm -f /tmp/stop /tmp/fail /tmp/finished")
	w.sh(vm, time.Minute, migrationWriter)
	w.sh(vm, time.Minute, migrationReader)
}

// rounds returns how many rounds fio and the reader have finished (generous time limits:
// a TCG guest on a loaded host is slow to answer).
func (w migrationWatch) rounds(vm *VM) (fio, reads int) {
	w.t.Helper()
	out := strings.TrimSpace(w.sh(vm, time.Minute, "cat /tmp/fail 2>/dev/null; echo $(cat /tmp/fio.rounds 2>/dev/null || echo 0) $(cat /tmp/read.rounds 2>/dev/null || echo 0)"))
	if _, err := fmt.Sscanf(out, "%d %d", &fio, &reads); err != nil {
		w.t.Fatalf("guest workload: %s", out)
	}
	return fio, reads
}

// advances waits until fio and the reader each finish another round on vm, so the guest
// demonstrably does verified I/O where it runs now.
func (w migrationWatch) advances(vm *VM, what string) {
	w.t.Helper()
	f0, r0 := w.rounds(vm)
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		if f, r := w.rounds(vm); f > f0 && r > r0 {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: fio or the reader did not finish a round in 2 minutes (at %d and %d)\n%s", what, f0, r0, w.b.LogTail(20))
		}
	}
}

func (w migrationWatch) checkDmesg(vm *VM, what string) {
	w.t.Helper()
	if m := guestIOErrors.FindAllString(w.sh(vm, time.Minute, "dmesg"), 10); len(m) > 0 {
		w.t.Fatalf("%s: guest kernel reports disk trouble:\n%s", what, strings.Join(m, "\n"))
	}
}

// finish stops the workload, requires every round verified, xfs_repair -n clean, no
// disk trouble in the guest kernel's log, and shuts the guest down.
func (w migrationWatch) finish(vm *VM, dev string) {
	t := w.t
	t.Helper()
	g := newGuest(t, vm)
	g.sh(t, time.Minute, "touch /tmp/stop")
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		fin := g.sh(t, time.Minute, "cat /tmp/finished 2>/dev/null; true")
		if strings.Contains(fin, "fio") && strings.Contains(fin, "reads") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workload did not stop (finished: %q)", fin)
		}
	}
	if fail := g.sh(t, time.Minute, "cat /tmp/fail 2>/dev/null; true"); fail != "" {
		t.Fatalf("guest workload failed: %s", fail)
	}
	f, r := w.rounds(vm)
	t.Logf("rounds, all verified: fio %d, reads %d", f, r)
	g.sh(t, 2*time.Minute, "umount /mnt/d")
	g.repairClean(t, dev)
	w.checkDmesg(vm, "at the end")
	if err := g.shutdown(t, w.ctx); err != nil {
		t.Fatal(err)
	}
}
