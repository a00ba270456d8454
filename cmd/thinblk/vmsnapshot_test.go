package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/testenv"
)

// vm-snapshot as a user runs it: against a real `thinblk serve` and a real
// QEMU (TCG, firmware only) whose disk is the pool's volume. The
// orchestration's failure paths are tested in package vmsnap.
func TestVMSnapshotCLI(t *testing.T) {
	testenv.NeedQEMU(t)
	bin := buildThinblk(t)
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "64M")
	mustThinblk(t, "volume", "create", dir, "vm", "--size", "64M")
	_, logs := startServe(t, bin, dir)
	waitForSocket(t, filepath.Join(dir, "vm.sock"))
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))

	qmpSock, watchSock := filepath.Join(tmp, "q.sock"), filepath.Join(tmp, "w.sock")
	startQEMU(t, filepath.Join(dir, "vm.sock"), qmpSock, watchSock)
	watch := vmsDial(t, watchSock)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	running := func() bool {
		var st struct{ Running bool }
		if err := watch.Execute(ctx, "query-status", nil, &st); err != nil {
			t.Fatal(err)
		}
		return st.Running
	}

	// --thinblk takes the pool directory (its serve's recorded socket).
	out, errOut, code := thinblk(t, "vm-snapshot", "--qemu", "unix:"+qmpSock, "--thinblk", dir, "--volume", "vm", "--name", "monday", "-v")
	if code != 0 {
		t.Fatalf("vm-snapshot: exit %d\n%s%s\n%s", code, out, errOut, logs)
	}
	if !strings.Contains(out, "monday: snapshot of vm") || !strings.Contains(out, "VM paused for") {
		t.Errorf("output %q", out)
	}
	if !strings.Contains(errOut, "VM stopped") || !strings.Contains(errOut, "VM resumed") {
		t.Errorf("-v steps %q", errOut)
	}
	if !running() {
		t.Error("VM not running after vm-snapshot")
	}
	if got := mustThinblk(t, "snapshot", "list", dir); got != "monday\tsnapshot\tvm\n" {
		t.Errorf("snapshot list %q", got)
	}

	// --writable makes a clone, served read-write.
	out, errOut, code = thinblk(t, "vm-snapshot", "--qemu", qmpSock, "--thinblk", dir, "--volume", "vm", "--name", "test", "--writable")
	if code != 0 || !strings.Contains(out, "test: clone of vm") {
		t.Errorf("vm-snapshot --writable: exit %d, %q %q", code, out, errOut)
	}
	if got := mustThinblk(t, "snapshot", "list", dir); got != "monday\tsnapshot\tvm\ntest\tclone\tvm\n" {
		t.Errorf("snapshot list %q", got)
	}
	mustThinblk(t, "snapshot", "delete", dir, "test")

	// A missing volume: exit 1, a message naming it, VM running, nothing new.
	_, errOut, code = thinblk(t, "vm-snapshot", "--qemu", qmpSock, "--thinblk", "unix:"+filepath.Join(dir, "qmp.sock"),
		"--volume", "vm", "--volume", "gone", "--name", "tuesday")
	if code != 1 || !strings.Contains(errOut, "gone") {
		t.Errorf("missing volume: exit %d, %q", code, errOut)
	}
	if !running() {
		t.Error("VM not running after a failed vm-snapshot")
	}
	if got := mustThinblk(t, "snapshot", "list", dir); got != "monday\tsnapshot\tvm\n" {
		t.Errorf("snapshot list after the failure %q", got)
	}

	for _, args := range [][]string{
		{"--qemu", qmpSock, "--thinblk", dir, "--volume", "vm"},                                    // no --name
		{"--qemu", qmpSock, "--thinblk", dir, "--name", "x"},                                       // no --volume
		{"--qemu", qmpSock, "--thinblk", dir, "--volume", "vm", "--name", "x", "--freeze"},         // no --qga
		{"--qemu", "tcp:localhost:4444", "--thinblk", dir, "--volume", "vm", "--name", "x"},        // not unix
		{"--qemu", qmpSock, "--thinblk", dir, "--volume", "vm", "--name", "x", "--timeout", "-1s"}, // bad timeout
	} {
		if _, errOut, code := thinblk(t, append([]string{"vm-snapshot"}, args...)...); code != 2 {
			t.Errorf("vm-snapshot %v: exit %d (%q), want 2", args, code, errOut)
		}
	}
	// A pool directory without a running serve.
	other := filepath.Join(tmp, "other")
	mustThinblk(t, "pool", "create", other, "--size", "16M")
	if _, errOut, code := thinblk(t, "vm-snapshot", "--qemu", qmpSock, "--thinblk", other, "--volume", "vm", "--name", "x"); code != 2 || !strings.Contains(errOut, "no running") {
		t.Errorf("pool without serve: exit %d, %q", code, errOut)
	}
}
