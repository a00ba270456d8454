package vmsnap

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/qmp"

	"github.com/thinblk/thinblk/internal/testenv"
)

func TestSnapshotNames(t *testing.T) {
	one, err := SnapshotNames([]string{"vm1"}, "monday")
	if err != nil || len(one) != 1 || one[0] != (Snapshot{"vm1", "monday"}) {
		t.Errorf("one volume: %v %v", one, err)
	}
	two, err := SnapshotNames([]string{"root", "data"}, "monday")
	if err != nil || !slices.Equal(two, []Snapshot{{"root", "root@monday"}, {"data", "data@monday"}}) {
		t.Errorf("two volumes: %v %v", two, err)
	}
	for _, tc := range []struct {
		vols []string
		name string
		want string
	}{
		{nil, "x", "no volume"},
		{[]string{"a", "a"}, "x", "given twice"},
		{[]string{"a"}, "", "empty"},
		{[]string{"a", "b"}, "x/y", "'/'"},
		{[]string{"a b"}, "x", "contains"},
	} {
		if _, err := SnapshotNames(tc.vols, tc.name); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SnapshotNames(%q, %q) = %v, want an error with %q", tc.vols, tc.name, err, tc.want)
		}
	}
}

// A running VM with two disks: paused, drained, both snapshotted at once,
// resumed; QEMU reports STOP then RESUME and runs again.
func TestTakeRunningVM(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "root", "data")
	vm := startVM(t, dir, p, vmOpts{}, "root", "data")
	if st := vm.status(t); st.Status != "running" {
		t.Fatalf("VM is %s before the test", st.Status)
	}
	ctl := p.client(t) // watches thinblk's events

	var steps []string
	res, err := Take(context.Background(), Options{
		QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"root", "data"}, Name: "s1",
		Timeout: time.Minute, Logf: func(f string, a ...any) { steps = append(steps, f) },
	})
	if err != nil {
		t.Fatalf("Take: %v\n%s\n%s", err, vm.log, p.log)
	}
	t.Logf("paused %v, drain %v", res.Paused, res.Drain)
	if !res.WasRunning || res.Paused <= 0 || len(res.Snapshots) != 2 {
		t.Errorf("result %+v", res)
	}
	if st := vm.status(t); !st.Running {
		t.Errorf("VM is %s after Take", st.Status)
	}
	if ev := events(vm.monitor, 2*time.Second); !slices.Equal(ev, []string{"STOP", "RESUME"}) {
		t.Errorf("QEMU events %v, want [STOP RESUME]", ev)
	}
	vols := p.volumes(t)
	for _, s := range []Snapshot{{"root", "root@s1"}, {"data", "data@s1"}} {
		if v := vols[s.Name]; v.Kind != "snapshot" || v.Origin != s.Volume {
			t.Errorf("%s: %+v, want a snapshot of %s", s.Name, v, s.Volume)
		}
	}
	// One event for the group, naming both.
	created := eventData(ctl, "SNAPSHOT_CREATED", 2*time.Second)
	if len(created) != 1 || !strings.Contains(string(created[0]), `"root@s1"`) || !strings.Contains(string(created[0]), `"data@s1"`) {
		t.Errorf("SNAPSHOT_CREATED events: %s", created)
	}

	// The same name again: thinblk refuses, the VM runs again, nothing new.
	_, err = Take(context.Background(), Options{QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"root", "data"}, Name: "s1", Timeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("second Take with the same name: %v", err)
	}
	if st := vm.status(t); !st.Running {
		t.Errorf("VM is %s after a failed Take", st.Status)
	}
	if n := len(p.volumes(t)); n != 4 {
		t.Errorf("%d volumes after a failed Take, want 4", n)
	}
}

// A VM that was paused before stays paused: no stop, no cont.
func TestTakePausedVM(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{prelaunch: true}, "vm1")
	res, err := Take(context.Background(), Options{QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "snap", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("Take: %v", err)
	}
	if res.WasRunning || res.Paused != 0 {
		t.Errorf("result %+v", res)
	}
	if st := vm.status(t); st.Running || st.Status != "prelaunch" {
		t.Errorf("VM is %s after Take, want prelaunch", st.Status)
	}
	if ev := events(vm.monitor, time.Second); len(ev) != 0 {
		t.Errorf("QEMU events %v, want none", ev)
	}
	if v := p.volumes(t)["snap"]; v.Kind != "snapshot" || v.Origin != "vm1" {
		t.Errorf("snap: %+v", v)
	}
}

// A volume that does not exist fails the group after the VM was stopped:
// the VM is resumed and no snapshot of the other volume is left.
func TestTakeMissingVolume(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{}, "vm1")
	_, err := Take(context.Background(), Options{QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1", "nosuch"}, Name: "x", Timeout: time.Minute})
	if err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Fatalf("Take: %v, want an error naming nosuch", err)
	}
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		t.Errorf("error %v does not carry thinblk's QMP error", err)
	}
	expectNothingDone(t, vm, p, 2*time.Second, "STOP", "RESUME")
}

// --freeze with no agent in the guest: a clear error within the timeout,
// the VM never stopped, nothing created.
func TestTakeFreezeWithoutAgent(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{qga: true}, "vm1")
	start := time.Now()
	_, err := Take(context.Background(), Options{
		QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "x",
		Freeze: true, QGA: vm.qga, Timeout: 3 * time.Second,
	})
	took := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "qemu-ga") || !strings.Contains(err.Error(), "the VM runs on") {
		t.Fatalf("Take: %v", err)
	}
	t.Logf("error after %v: %v", took.Round(time.Millisecond), err)
	if took > 15*time.Second {
		t.Errorf("Take took %v with a 3s timeout", took)
	}
	expectNothingDone(t, vm, p, time.Second)
	// The agent socket itself missing is an error too, not a hang.
	_, err = Take(context.Background(), Options{
		QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "x",
		Freeze: true, QGA: vm.qga + ".missing", Timeout: 3 * time.Second,
	})
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing agent socket: %v", err)
	}
}

// QEMU serves one client per QMP socket: while another holds it, Take
// gives up at its timeout with an error that says so.
func TestTakeQEMUMonitorBusy(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{}, "vm1")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	holder, err := qmp.Dial(ctx, vm.qmp)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	start := time.Now()
	_, err = Take(context.Background(), Options{QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "x", Timeout: 2 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "another client") {
		t.Fatalf("Take: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("Take took %v with a 2s timeout", took)
	}
	if st := vm.status(t); !st.Running {
		t.Errorf("VM is %s", st.Status)
	}
	if vols := p.volumes(t); len(vols) != 1 {
		t.Errorf("volumes: %v", vols)
	}
	// Stop, too, gives up without having sent anything.
	sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
	stopped, err := Stop(sctx, vm.qmp)
	scancel()
	if err == nil || stopped {
		t.Errorf("Stop on a held monitor: stopped %v, %v", stopped, err)
	}
	// Once the other client leaves, it works.
	holder.Close()
	if _, err := Take(context.Background(), Options{QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "x", Timeout: time.Minute}); err != nil {
		t.Errorf("Take after the other client left: %v", err)
	}
}

// Cancelling (what Ctrl-C does in the CLI) ends a wait at once, with the
// VM as it was.
func TestTakeCancelled(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{qga: true}, "vm1")
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(time.Second, cancel)
	start := time.Now()
	_, err := Take(ctx, Options{
		QEMU: vm.qmp, Thinblk: p.qmp, Volumes: []string{"vm1"}, Name: "x",
		Freeze: true, QGA: vm.qga, Timeout: 5 * time.Minute,
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Take: %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("cancelled Take returned after %v", took)
	}
	expectNothingDone(t, vm, p, time.Second)
}

// Stop stops a running VM and leaves a paused one alone; Cont resumes.
func TestStopCont(t *testing.T) {
	testenv.NeedQEMU(t)
	dir := testenv.ShortDir(t, "vmsnap-")
	p := startPool(t, dir, "vm1")
	vm := startVM(t, dir, p, vmOpts{}, "vm1")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if stopped, err := Stop(ctx, vm.qmp); err != nil || !stopped {
		t.Fatalf("Stop: %v, %v", stopped, err)
	}
	if st := vm.status(t); st.Status != "paused" {
		t.Errorf("VM is %s after Stop", st.Status)
	}
	if stopped, err := Stop(ctx, vm.qmp); err != nil || stopped {
		t.Errorf("Stop of a paused VM: %v, %v", stopped, err)
	}
	if err := Cont(ctx, vm.qmp); err != nil {
		t.Fatal(err)
	}
	if st := vm.status(t); !st.Running {
		t.Errorf("VM is %s after Cont", st.Status)
	}
	if ev := events(vm.monitor, time.Second); !slices.Equal(ev, []string{"STOP", "RESUME"}) {
		t.Errorf("QEMU events %v, want [STOP RESUME]", ev)
	}
}
