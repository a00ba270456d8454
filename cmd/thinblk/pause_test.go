package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/vhostuser/frontend"

	"github.com/thinblk/thinblk/internal/testenv"
)

// vmsEvents collects QMP events from a client and waits for named ones.
type vmsEvents struct {
	t    *testing.T
	c    *qmp.Client
	seen []qmp.Event
}

// wait returns the data of the next event called name, failing the test
// after timeout. Other events are kept in seen.
func (e *vmsEvents) wait(name string, timeout time.Duration) map[string]any {
	e.t.Helper()
	var data map[string]any
	json.Unmarshal(e.waitAny(timeout, name).Data, &data)
	return data
}

// waitAny returns the next event with one of the names.
func (e *vmsEvents) waitAny(timeout time.Duration, names ...string) qmp.Event {
	e.t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-e.c.Events():
			if !ok {
				e.t.Fatalf("connection closed while waiting for %v", names)
			}
			e.seen = append(e.seen, ev)
			for _, n := range names {
				if ev.Event == n {
					return ev
				}
			}
		case <-deadline:
			e.t.Fatalf("none of %v within %v (seen: %v)", names, timeout, e.names())
		}
	}
}

// none fails if an event called name arrives within d.
func (e *vmsEvents) none(name string, d time.Duration) {
	e.t.Helper()
	deadline := time.After(d)
	for {
		select {
		case ev, ok := <-e.c.Events():
			if !ok {
				return
			}
			e.seen = append(e.seen, ev)
			if ev.Event == name {
				e.t.Errorf("unexpected %s event: %s", name, ev.Data)
			}
		case <-deadline:
			return
		}
	}
}

func (e *vmsEvents) names() []string {
	var n []string
	for _, ev := range e.seen {
		n = append(n, ev.Event)
	}
	return n
}

func vmsDial(t *testing.T, path string) *qmp.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for { // QEMU binds its monitor socket a moment before it listens
		c, err := qmp.Dial(ctx, path)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		if ctx.Err() != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startQEMU runs a firmware-only VM (TCG) with a QMP monitor on each of qmpSocks and, unless
// disk is "", the vhost-user-blk disk on that socket; it returns once the last monitor's
// socket exists and kills the VM when the test ends.
func startQEMU(t *testing.T, disk string, qmpSocks ...string) {
	t.Helper()
	args := []string{"-accel", "tcg", "-nodefaults", "-display", "none", "-m", "32"}
	if disk != "" {
		args = []string{"-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64",
			"-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem",
			"-chardev", "socket,id=d0,path=" + disk, "-device", "vhost-user-blk-pci,chardev=d0"}
	}
	for _, s := range qmpSocks {
		args = append(args, "-qmp", "unix:"+s+",server=on,wait=off")
	}
	qemu := exec.Command("qemu-system-x86_64", args...)
	qemu.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qemu.Process.Kill(); qemu.Wait() })
	waitForSocket(t, qmpSocks[len(qmpSocks)-1])
}

// The pause policy with a real QEMU: a writer (the Go front-end, on its
// own volume) fills the pool; serve reports the low-water crossing and
// the out-of-space, stops the VM (QEMU's STOP), and once `pool grow`
// makes room it reports the space, resumes the VM (RESUME) and the
// waiting write completes. A VM paused by someone else is left paused.
func TestServePausePolicyStopsQEMU(t *testing.T) {
	testenv.NeedQEMU(t)
	bin := buildThinblk(t)
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "pool")
	// 16 blocks of 64 KiB; below 8 free blocks is low water.
	mustThinblk(t, "pool", "create", dir, "--size", "1M", "--no-space", "pause", "--low-water", "50%")
	mustThinblk(t, "volume", "create", dir, "fill", "--size", "16M")
	mustThinblk(t, "volume", "create", dir, "vm", "--size", "16M")
	qmpSock, watchSock := filepath.Join(tmp, "q.sock"), filepath.Join(tmp, "w.sock")
	// A second VM on the pool (no disk needed): every listed VM is paused.
	qmpB, watchB := filepath.Join(tmp, "qb.sock"), filepath.Join(tmp, "wb.sock")
	_, logs := startServe(t, bin, dir, "--qemu-qmp", "unix:"+qmpSock, "--qemu-qmp", qmpB)
	waitForSocket(t, filepath.Join(dir, "vm.sock"))
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))
	startQEMU(t, filepath.Join(dir, "vm.sock"), qmpSock, watchSock)
	startQEMU(t, "", qmpB, watchB)
	watch := &vmsEvents{t: t, c: vmsDial(t, watchSock)}
	watchOther := &vmsEvents{t: t, c: vmsDial(t, watchB)}
	ctl := &vmsEvents{t: t, c: vmsDial(t, filepath.Join(dir, "qmp.sock"))}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	status := func() string {
		var st struct{ Status string }
		if err := watch.c.Execute(ctx, "query-status", nil, &st); err != nil {
			t.Fatal(err)
		}
		return st.Status
	}

	disk, err := frontend.Dial(ctx, filepath.Join(dir, "fill.sock"), frontend.Options{Timeout: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	block := bytes.Repeat([]byte{'x'}, 64<<10)
	for i := 0; i < 16; i++ {
		if _, err := disk.WriteAt(block, int64(i)*int64(len(block))); err != nil {
			t.Fatalf("write block %d: %v", i, err)
		}
	}
	if d := ctl.wait(eventLowWater, time.Minute); d["below"] != true || d["pool"] == "" {
		t.Errorf("%s %v", eventLowWater, d)
	}
	// The pool is full: the next write waits, and the VM is stopped.
	written := make(chan error, 1)
	go func() {
		_, err := disk.WriteAt(block, 16*int64(len(block)))
		written <- err
	}()
	if d := ctl.wait(eventOutOfSpace, time.Minute); d["volume"] != "fill" || d["free_bytes"] != 0.0 {
		t.Errorf("%s %v", eventOutOfSpace, d)
	}
	stoppedVMs := map[any]bool{}
	for range 2 {
		d := ctl.wait(eventVMStopped, 2*time.Minute)
		if d["volume"] != "fill" || d["error"] != nil {
			t.Errorf("%s %v", eventVMStopped, d)
		}
		stoppedVMs[d["qemu"]] = true
	}
	if !stoppedVMs[qmpSock] || !stoppedVMs[qmpB] {
		t.Errorf("%s for %v, want both VMs", eventVMStopped, stoppedVMs)
	}
	watch.wait("STOP", time.Minute)
	watchOther.wait("STOP", time.Minute)
	if st := status(); st != "paused" {
		t.Errorf("VM is %s while the pool is out of space", st)
	}
	select {
	case err := <-written:
		t.Fatalf("write to a full pool returned (%v) instead of waiting", err)
	case <-time.After(time.Second):
	}

	mustThinblk(t, "pool", "grow", dir, "--size", "4M")
	if d := ctl.wait(eventSpaceAvailable, time.Minute); d["free_bytes"] == 0.0 {
		t.Errorf("%s %v", eventSpaceAvailable, d)
	}
	for range 2 {
		if d := ctl.wait(eventVMResumed, 2*time.Minute); d["error"] != nil {
			t.Errorf("%s %v", eventVMResumed, d)
		}
	}
	watch.wait("RESUME", time.Minute)
	watchOther.wait("RESUME", time.Minute)
	if st := status(); st != "running" {
		t.Errorf("VM is %s after space came back", st)
	}
	select {
	case err := <-written:
		if err != nil {
			t.Errorf("the waiting write failed: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the waiting write did not complete after pool grow")
	}

	// Someone else pauses the first VM; the pool fills again: serve leaves
	// that VM as it is and does not resume it when space comes back; the
	// other is stopped and resumed as before.
	secondRound := time.Now()
	if err := watch.c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	watch.wait("STOP", time.Minute)
	for i := 17; i < 64; i++ {
		if _, err := disk.WriteAt(block, int64(i)*int64(len(block))); err != nil {
			t.Fatalf("write block %d: %v", i, err)
		}
	}
	go func() {
		_, err := disk.WriteAt(block, 64*int64(len(block)))
		written <- err
	}()
	ctl.wait(eventOutOfSpace, time.Minute)
	mustThinblk(t, "pool", "grow", dir, "--size", "8M")
	ctl.wait(eventSpaceAvailable, time.Minute)
	if err := <-written; err != nil {
		t.Errorf("the second waiting write failed: %v", err)
	}
	watchOther.wait("STOP", time.Minute)
	watchOther.wait("RESUME", time.Minute)
	if d := ctl.wait(eventVMResumed, time.Minute); d["qemu"] != qmpB {
		t.Errorf("second round: %s %v, want the other VM", eventVMResumed, d)
	}
	watch.none("RESUME", 2*time.Second)
	ctl.none("", time.Second) // gathers the rest
	for _, ev := range ctl.seen {
		if ev.Event == eventVMStopped || ev.Event == eventVMResumed {
			var d map[string]any
			json.Unmarshal(ev.Data, &d)
			if d["qemu"] == qmpSock && ev.Time().After(secondRound) {
				t.Errorf("%s for the VM paused by someone else: %v", ev.Event, d)
			}
		}
	}
	if st := status(); st != "paused" {
		t.Errorf("VM paused by someone else is %s after the pool's space came back", st)
	}
	if !strings.Contains(logs.String(), "VM stopped until space appears") {
		t.Errorf("serve log lacks the pause:\n%s", logs)
	}
}
