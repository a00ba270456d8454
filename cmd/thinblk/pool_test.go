package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/thin"
	"github.com/thinblk/thinblk/vhostuser/frontend"
)

func statusJSON(t *testing.T, dir string) thin.Status {
	t.Helper()
	var st thin.Status
	if err := json.Unmarshal([]byte(mustThinblk(t, "status", dir, "--json")), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestPoolLifecycleOffline(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "64M", "--block-size", "64K", "--low-water", "5%")
	if _, errOut, code := thinblk(t, "pool", "create", dir, "--size", "64M"); code == 0 {
		t.Fatal("creating a pool over an existing one succeeded")
	} else if !strings.Contains(errOut, "already exists") {
		t.Errorf("unclear error for an existing pool: %q", errOut)
	}
	mustThinblk(t, "volume", "create", dir, "vm1", "--size", "1G")
	mustThinblk(t, "volume", "create", dir, "vm2", "--size", "2G")
	if _, errOut, code := thinblk(t, "volume", "create", dir, "a/b", "--size", "1G"); code == 0 || errOut == "" {
		t.Fatal("a volume name with / was accepted")
	}
	mustThinblk(t, "volume", "resize", dir, "vm1", "--size", "3G")
	mustThinblk(t, "volume", "delete", dir, "vm2")
	if out := mustThinblk(t, "volume", "list", dir); out != "vm1\t3221225472\n" {
		t.Errorf("volume list = %q", out)
	}
	mustThinblk(t, "pool", "grow", dir, "--size", "128M")
	st := statusJSON(t, dir)
	if st.Pool.SizeBytes != 128<<20 || st.Pool.FreeBytes+st.Pool.AllocatedBytes+st.Pool.ReservedBytes != st.Pool.SizeBytes {
		t.Errorf("pool status after grow: %+v", st.Pool)
	}
	if len(st.Volumes) != 1 || st.Volumes[0].Name != "vm1" || st.Volumes[0].SizeBytes != 3<<30 {
		t.Errorf("volumes: %+v", st.Volumes)
	}
	if out := mustThinblk(t, "check", dir, "--quiet"); !strings.Contains(out, "clean") {
		t.Errorf("check: %q", out)
	}
	if out := mustThinblk(t, "status", dir); !strings.Contains(out, "vm1") || !strings.Contains(out, "128.0 MiB") {
		t.Errorf("status table: %q", out)
	}
}

func TestPoolBadInput(t *testing.T) {
	notPool := t.TempDir()
	for _, args := range [][]string{
		{"status", notPool},
		{"check", notPool},
		{"volume", "create", notPool, "v", "--size", "1G"},
		{"serve", notPool},
	} {
		_, errOut, code := thinblk(t, args...)
		if code == 0 || !strings.Contains(errOut, "not a thinblk pool") {
			t.Errorf("%v on a plain directory: exit %d, %q", args, code, errOut)
		}
	}
	for _, args := range [][]string{
		{"pool", "create", filepath.Join(notPool, "p"), "--size", "10Q"},
		{"pool", "create", filepath.Join(notPool, "p"), "--size", "64M", "--no-space", "maybe"},
		{"pool", "create", filepath.Join(notPool, "p"), "--size", "64M", "--low-water", "150%"},
		{"pool", "create", filepath.Join(notPool, "p")},
	} {
		if _, _, code := thinblk(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
	if _, err := os.Stat(filepath.Join(notPool, "p")); !os.IsNotExist(err) {
		t.Error("a rejected pool create left a directory behind")
	}
}

func TestServePoolDataPath(t *testing.T) {
	bin := buildThinblk(t)
	s := serveNewPool(t, bin, []string{"--size", "32M"}, 1<<30, "--queues", "2")
	dir, sock, logs := s.dir, s.sock, s.logs

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatalf("dial: %v\n%s", err, logs)
	}
	if disk.Capacity() != 1<<30 {
		t.Errorf("capacity %d, want 1 GiB", disk.Capacity())
	}
	if id, _ := disk.GetID(); id != "disk0" {
		t.Errorf("serial %q, want disk0", id)
	}
	data := bytes.Repeat([]byte{0xA5}, 128<<10)
	if _, err := disk.WriteAt(data, 512<<20); err != nil {
		t.Fatal(err)
	}
	if err := disk.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := disk.ReadAt(got, 512<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v, equal=%v", err, bytes.Equal(got, data))
	}
	disk.Close()
	s.stop(t)
	// After a clean stop the pool is consistent and holds the data.
	if out := mustThinblk(t, "check", dir, "--quiet"); !strings.Contains(out, "clean") {
		t.Errorf("check: %q", out)
	}
	st := statusJSON(t, dir)
	if st.Volumes[0].MappedBytes != 128<<10 {
		t.Errorf("mapped %d bytes, want %d", st.Volumes[0].MappedBytes, 128<<10)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Error("volume socket left behind")
	}
}

func TestServePoolOnlineManagement(t *testing.T) {
	bin := buildThinblk(t)
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "16M", "--block-size", "64K")
	mustThinblk(t, "volume", "create", dir, "first", "--size", "64M")
	cmd, logs := startServe(t, bin, dir)
	waitForSocket(t, filepath.Join(dir, "first.sock"))
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))

	// Management commands reach the running serve through its control socket.
	mustThinblk(t, "volume", "create", dir, "second", "--size", "32M")
	waitForSocket(t, filepath.Join(dir, "second.sock"))
	st := statusJSON(t, dir)
	if len(st.Volumes) != 2 {
		t.Fatalf("status while serving lists %d volumes, want 2", len(st.Volumes))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, filepath.Join(dir, "second.sock"), frontend.Options{})
	if err != nil {
		t.Fatalf("dial: %v\n%s", err, logs)
	}
	if _, err := disk.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	// Grow online: the front-end hears of it through the config-change
	// message and sees the new capacity.
	mustThinblk(t, "volume", "resize", dir, "second", "--size", "48M")
	deadline := time.Now().Add(10 * time.Second)
	for {
		cfg, err := disk.RefreshConfig()
		if err == nil && cfg.Capacity*512 == 48<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("capacity after resize: %+v, %v\n%s", cfg, err, logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	disk.Close()

	mustThinblk(t, "pool", "grow", dir, "--size", "32M")
	if st := statusJSON(t, dir); st.Pool.SizeBytes != 32<<20 || st.Volumes[1].MappedBytes != 64<<10 {
		t.Errorf("status after grow and write: %+v", st)
	}
	mustThinblk(t, "volume", "delete", dir, "second")
	deadline = time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(dir, "second.sock")); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("socket of a deleted volume is still there")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// check needs the pool to itself.
	if _, errOut, code := thinblk(t, "check", dir); code == 0 || !strings.Contains(errOut, "stop 'thinblk serve'") {
		t.Errorf("check while serving: exit %d, %q", code, errOut)
	}
	stopServe(t, cmd, logs)
	if _, err := os.Stat(filepath.Join(dir, "control")); !os.IsNotExist(err) {
		t.Error("control record left behind after exit")
	}
	if out := mustThinblk(t, "check", dir, "--quiet"); !strings.Contains(out, "clean") {
		t.Errorf("check: %q", out)
	}
}

func TestServePoolSnapshots(t *testing.T) {
	bin := buildThinblk(t)
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "32M")
	mustThinblk(t, "volume", "create", dir, "vm", "--size", "64M")
	cmd, logs := startServe(t, bin, dir)
	waitForSocket(t, filepath.Join(dir, "vm.sock"))
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dial := func(name string) *frontend.Disk {
		t.Helper()
		d, err := frontend.Dial(ctx, filepath.Join(dir, name+".sock"), frontend.Options{})
		if err != nil {
			t.Fatalf("dial %s: %v\n%s", name, err, logs)
		}
		return d
	}
	read := func(d *frontend.Disk, off int64) []byte {
		t.Helper()
		b := make([]byte, 64<<10)
		if _, err := d.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		return b
	}
	old, young := bytes.Repeat([]byte{'o'}, 64<<10), bytes.Repeat([]byte{'y'}, 64<<10)
	vm := dial("vm")
	if _, err := vm.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	vm.Flush()

	mustThinblk(t, "snapshot", "create", dir, "vm", "snap1")
	mustThinblk(t, "snapshot", "create", dir, "vm", "clone1", "--writable")
	waitForSocket(t, filepath.Join(dir, "snap1.sock"))
	waitForSocket(t, filepath.Join(dir, "clone1.sock"))
	if _, err := vm.WriteAt(young, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(vm, 0), young) {
		t.Fatal("origin does not read its new data")
	}
	vm.Close()

	snap := dial("snap1")
	if !bytes.Equal(read(snap, 0), old) {
		t.Error("snapshot does not read the data as it was when taken")
	}
	if !snap.Has(5) { // VIRTIO_BLK_F_RO
		t.Error("snapshot exported without the read-only feature")
	}
	if _, err := snap.WriteAt(young, 0); err == nil {
		t.Error("write to a read-only snapshot succeeded")
	}
	snap.Close()
	clone := dial("clone1")
	if !bytes.Equal(read(clone, 0), old) {
		t.Error("clone does not start from the data as it was")
	}
	if _, err := clone.WriteAt(young, 64<<10); err != nil {
		t.Fatalf("write to a clone: %v", err)
	}
	clone.Close()

	if out := mustThinblk(t, "snapshot", "list", dir); out != "clone1\tclone\tvm\nsnap1\tsnapshot\tvm\n" {
		t.Errorf("snapshot list = %q", out)
	}
	if _, errOut, code := thinblk(t, "snapshot", "delete", dir, "vm"); code == 0 || !strings.Contains(errOut, "not a snapshot") {
		t.Errorf("snapshot delete of a volume: exit %d, %q", code, errOut)
	}
	mustThinblk(t, "snapshot", "delete", dir, "snap1")
	mustThinblk(t, "snapshot", "delete", dir, "clone1")
	stopServe(t, cmd, logs)
	if out := mustThinblk(t, "check", dir, "--quiet"); !strings.Contains(out, "clean") {
		t.Errorf("check: %q", out)
	}
	// Only the origin's two blocks remain: everything the snapshot and
	// clone held alone went back to the pool.
	st := statusJSON(t, dir)
	if len(st.Volumes) != 1 || st.Pool.AllocatedBytes != st.Volumes[0].MappedBytes {
		t.Errorf("after deleting snapshot and clone: %+v", st)
	}
}

// TestCommandWaitsForBusyPool: a management command that finds the pool held by another
// opener and no control socket answering (a serve still starting: it holds the pool before
// its control socket listens; another command) waits for it instead of failing at once, and
// fails with a clear error only after lockedWait.
func TestCommandWaitsForBusyPool(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "64M")
	mustThinblk(t, "volume", "create", dir, "a", "--size", "16M")
	p, err := thin.Open(dir, thin.OpenOptions{FlushInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		out, errOut string
		code        int
	}
	done := make(chan result, 1)
	go func() {
		out, errOut, code := thinblk(t, "volume", "list", dir)
		done <- result{out, errOut, code}
	}()
	select {
	case r := <-done:
		p.Close()
		t.Fatalf("volume list returned while the pool was held (exit %d): %s", r.code, r.errOut)
	case <-time.After(time.Second):
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.code != 0 || !strings.Contains(r.out, "a\t") {
			t.Fatalf("volume list after the pool was let go: exit %d, %q, %q", r.code, r.out, r.errOut)
		}
	case <-time.After(lockedWait + 5*time.Second):
		t.Fatal("volume list still waits after the pool was let go")
	}
}
