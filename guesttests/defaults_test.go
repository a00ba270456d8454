package guesttests

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/qmp"
)

// TestGuestQEMUDefaultQueues: QEMU's vhost-user-blk-pci without num-queues asks for one queue
// per vCPU and refuses to start when the back-end offers fewer. A 4-vCPU guest with no
// num-queues boots on `thinblk serve POOL` and `thinblk serve --raw FILE --socket S`, both
// with no other flag, sees 4 queues on each disk and reads back what it wrote through them; the
// pool serve's statistics count exactly the bytes the guest wrote.
func TestGuestQEMUDefaultQueues(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the defaults are thinblk's own")
	}
	const vcpus = 4
	ctx := context.Background()
	dir := workDir(t)
	pool := filepath.Join(dir, "pool")
	for _, args := range [][]string{
		{"pool", "create", pool, "--size", "256M"},
		{"volume", "create", pool, "vol", "--size", "1G"},
	} {
		if _, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
			t.Fatal(err)
		}
	}
	img := sparseFile(t, filepath.Join(dir, "raw.img"), 64<<20)
	var disks []DiskSpec
	for _, o := range []BackendOptions{
		{Kind: ThinPool, Image: pool, Socket: filepath.Join(pool, "vol.sock")},
		{Kind: Thinblk, Image: img, Socket: filepath.Join(dir, "raw.sock")},
	} {
		o.Bare, o.ThinblkBin = true, e.thinblk
		o.LogPath = filepath.Join(dir, string(o.Kind)+".log")
		b, err := StartBackend(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := b.Stop(15 * time.Second); err != nil {
				t.Errorf("stop %s: %v\n%s", o.Kind, err, b.LogTail(20))
			}
		})
		disks = append(disks, DiskSpec{Socket: o.Socket, QEMUQueues: true})
	}
	vm, err := StartVM(ctx, VMOptions{Dir: filepath.Join(dir, "vm"), Images: e.images, CPUs: vcpus, MemoryMB: 512, Disks: disks, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	for i, name := range []string{"pool volume", "raw image"} {
		dev, err := vm.DiskDevice(ctx, i)
		if err != nil {
			t.Fatal(err)
		}
		queues := strings.TrimSpace(g.sh(t, 20*time.Second, "ls /sys/block/"+filepath.Base(dev)+"/mq | wc -l"))
		if queues != fmt.Sprint(vcpus) {
			t.Errorf("%s: the guest has %s queues on %s, want %d (one per vCPU)", name, queues, dev, vcpus)
		}
		// Write 4 MiB from every vCPU's queue (taskset pins each writer) and read it back.
		out := g.sh(t, 2*time.Minute, fmt.Sprintf(`set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
for c in 0 1 2 3; do taskset -c $c dd if=/tmp/data of=%[1]s bs=1M count=1 skip=$c seek=$c oflag=direct conv=notrunc 2>/dev/null & done
wait
dd if=%[1]s of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null
sha256sum /tmp/data /tmp/back | cut -d' ' -f1`, dev))
		sums := strings.Fields(out)
		if len(sums) != 2 || sums[0] != sums[1] {
			t.Errorf("%s: data read back differs from what was written: %q", name, out)
		}
	}
	// The pool serve's counters (QMP query-volume-stats, the numbers --metrics exports) agree
	// with what the guest wrote: its only writes were those 4 MiB, with O_DIRECT.
	c, err := qmp.Dial(ctx, filepath.Join(pool, "qmp.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var stats struct {
		Volumes []struct {
			Name string `json:"name"`
			Ops  map[string]struct {
				Completed uint64 `json:"completed"`
				Bytes     uint64 `json:"bytes"`
				IOErrors  uint64 `json:"io_errors"`
			} `json:"ops"`
			Connected bool `json:"connected"`
		}
	}
	if err := c.Execute(ctx, "query-volume-stats", map[string]any{"names": []string{"vol"}}, &stats); err != nil {
		t.Fatal(err)
	}
	if len(stats.Volumes) != 1 {
		t.Fatalf("query-volume-stats: %+v", stats)
	}
	v := stats.Volumes[0]
	w, r := v.Ops["write"], v.Ops["read"]
	t.Logf("pool volume as the guest used it: %+v", v)
	if w.Bytes != 4<<20 || w.IOErrors != 0 || r.Bytes < 4<<20 || !v.Connected {
		t.Errorf("query-volume-stats: %d bytes written (want %d), %d write errors, %d bytes read (want at least %d), connected %v",
			w.Bytes, 4<<20, w.IOErrors, r.Bytes, 4<<20, v.Connected)
	}
	if err := g.shutdown(t, ctx); err != nil {
		t.Logf("shutdown: %v", err)
	}
}
