package migrate

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/thinblk/thinblk/thin"

	"github.com/thinblk/thinblk/internal/testenv"
)

// qemuMigrate migrates src to uri through its monitor and returns QEMU's downtime.
func qemuMigrate(t *testing.T, src *testVM, uri string) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := src.watch.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(4) << 30}, nil); err != nil {
		t.Fatal(err)
	}
	if err := src.watch.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		t.Fatal(err)
	}
	for {
		var st migrateStatus
		if err := src.watch.Execute(ctx, "query-migrate", nil, &st); err != nil {
			t.Fatal(err)
		}
		switch st.Status {
		case "completed":
			return time.Duration(st.Downtime) * time.Millisecond
		case "failed", "cancelled":
			t.Fatalf("migration %s: %s\n%s", st.Status, st.ErrorDesc, src.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSameHostDowntimeAgainstQSD (issue 14) measures QEMU's downtime of same-host live
// migrations, alternating hop by hop: thinblk, where the destination QEMU connects to the
// same socket as the source (one serve, two front-ends), against qemu-storage-daemon the
// way shared-storage migration works with it (it refuses a second client on an export): a
// second daemon exporting the same image file (locking off, O_DIRECT on both), the
// destination QEMU on that one. The VMs run their firmware only, so this compares what the
// back-ends add to the switch-over (stopping and starting the rings), not a guest's I/O.
// Every migration must complete and the destination run.
func TestSameHostDowntimeAgainstQSD(t *testing.T) {
	testenv.NeedQEMU(t)
	if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
		t.Fatalf("qemu-storage-daemon not found (install qemu-system-x86): %v", err)
	}
	dir := testenv.ShortDir(t, "mig-")
	pool := newPool(t, filepath.Join(dir, "tb"), "128M", func(p *thin.Pool) { mustOK(t, p.CreateVolume("v", volSize)) })
	tbSock := filepath.Join(pool.socks, "v.sock")
	testenv.WaitDial(t, tbSock)
	img := filepath.Join(dir, "img.raw")
	mustOK(t, os.WriteFile(img, nil, 0o644))
	mustOK(t, os.Truncate(img, volSize))
	qsdN := 0
	startQSD := func() string {
		qsdN++
		sock := filepath.Join(dir, fmt.Sprintf("qsd%d.sock", qsdN))
		log := &bytes.Buffer{}
		cmd := startProc(t, log, "qemu-storage-daemon",
			"--blockdev", "driver=file,node-name=f0,filename="+img+",locking=off,cache.direct=on",
			"--blockdev", "driver=raw,node-name=d0,file=f0",
			"--export", "type=vhost-user-blk,id=e0,addr.type=unix,addr.path="+sock+",node-name=d0,writable=on")
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		if err := waitSocketFile(sock, 20*time.Second); err != nil {
			t.Fatalf("%v\n%s", err, log)
		}
		return sock
	}
	vmN := 0
	start := func(sock, incoming string) *testVM {
		vmN++
		d := filepath.Join(dir, fmt.Sprintf("vm%d", vmN))
		mustOK(t, os.MkdirAll(d, 0o755))
		vm, err := startQEMU(t, d, incoming, sock)
		if err != nil {
			t.Fatal(err)
		}
		return vm
	}
	// hop migrates src to a new QEMU on sock and returns it, src gone, and the downtime.
	hop := func(src *testVM, sock string) (*testVM, time.Duration) {
		uri := "unix:" + filepath.Join(dir, fmt.Sprintf("mig%d.sock", vmN+1))
		dst := start(sock, uri)
		d := qemuMigrate(t, src, uri)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := waitRunning(ctx, dst.watch); err != nil {
			t.Fatalf("destination: %v\n%s", err, dst.log)
		}
		src.cmd.Process.Kill()
		<-src.exit
		return dst, d
	}
	tbVM := start(tbSock, "")
	qsdVM := start(startQSD(), "")
	var tbDown, qsdDown []time.Duration
	for range 3 {
		var d time.Duration
		tbVM, d = hop(tbVM, tbSock)
		tbDown = append(tbDown, d)
		qsdVM, d = hop(qsdVM, startQSD())
		qsdDown = append(qsdDown, d)
	}
	med := func(ds []time.Duration) time.Duration {
		s := slices.Clone(ds)
		slices.Sort(s)
		return s[len(s)/2]
	}
	t.Logf("same-host migration downtime, firmware-only VM, 3 hops each alternating: thinblk (one socket, two front-ends) %v, median %v; "+
		"qemu-storage-daemon (a second daemon on the same image) %v, median %v", tbDown, med(tbDown), qsdDown, med(qsdDown))
}
