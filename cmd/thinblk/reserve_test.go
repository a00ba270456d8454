package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

func TestVolumeReserve(t *testing.T) {
	check := func(t *testing.T, dir string) {
		t.Helper()
		reserve := func(name string) (bool, uint64) {
			t.Helper()
			for _, v := range statusJSON(t, dir).Volumes {
				if v.Name == name {
					return v.ReserveMode, v.ReservedReserveModeBytes
				}
			}
			t.Fatalf("no volume %s", name)
			return false, 0
		}
		out := mustThinblk(t, "volume", "reserve", dir, "vm", "on")
		if !strings.Contains(out, "reserve mode on") {
			t.Errorf("output %q", out)
		}
		if on, n := reserve("vm"); !on || n != 64<<20 {
			t.Errorf("after on: reserve mode %v, %d bytes reserved for it, want 64 MiB", on, n)
		}
		// The pool cannot cover big's virtual size: refused, nothing changes.
		_, errOut, code := thinblk(t, "volume", "reserve", dir, "big", "on")
		if code != 1 || !strings.Contains(errOut, "no space") {
			t.Errorf("reserve on beyond the pool: exit %d, %q", code, errOut)
		}
		if on, n := reserve("big"); on || n != 0 {
			t.Errorf("after a refused reserve: mode %v, %d bytes", on, n)
		}
		mustThinblk(t, "volume", "reserve", dir, "vm", "off")
		if on, n := reserve("vm"); on || n != 0 {
			t.Errorf("after off: reserve mode %v, %d bytes", on, n)
		}
		if _, _, code := thinblk(t, "volume", "reserve", dir, "vm", "maybe"); code != 2 {
			t.Errorf("reserve maybe: exit %d, want 2", code)
		}
		if _, errOut, code := thinblk(t, "volume", "reserve", dir, "nosuch", "on"); code != 1 || !strings.Contains(errOut, "nosuch") {
			t.Errorf("reserve of a missing volume: exit %d, %q", code, errOut)
		}
	}
	newPool := func(t *testing.T) string {
		dir := filepath.Join(t.TempDir(), "pool")
		mustThinblk(t, "pool", "create", dir, "--size", "128M")
		mustThinblk(t, "volume", "create", dir, "vm", "--size", "64M")
		mustThinblk(t, "volume", "create", dir, "big", "--size", "1G")
		return dir
	}
	t.Run("offline", func(t *testing.T) { check(t, newPool(t)) })
	t.Run("through serve", func(t *testing.T) {
		dir := newPool(t)
		_, logs := startServe(t, buildThinblk(t), dir)
		waitForSocket(t, filepath.Join(dir, "qmp.sock"))
		check(t, dir)
		if !strings.Contains(logs.String(), "serving pool") {
			t.Errorf("serve log: %s", logs)
		}
	})
}

// The control socket's event shapes: SNAPSHOT_CREATED for single and
// group snapshots, and the pool's space events as a writer fills a pool
// (policy error: the write fails at once) and pool grow makes room.
func TestControlSnapshotAndSpaceEvents(t *testing.T) {
	bin := buildThinblk(t)
	dir := filepath.Join(t.TempDir(), "pool")
	abs, _ := filepath.Abs(dir)
	// 4 blocks of 64 KiB; below 2 free blocks is low water.
	mustThinblk(t, "pool", "create", dir, "--size", "256K", "--low-water", "50%")
	mustThinblk(t, "volume", "create", dir, "vm", "--size", "1M")
	startServe(t, bin, dir)
	waitForSocket(t, filepath.Join(dir, "vm.sock"))
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))
	ctl := &vmsEvents{t: t, c: vmsDial(t, filepath.Join(dir, "qmp.sock"))}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	if err := ctl.c.Execute(ctx, "snapshot-create", map[string]any{"volume": "vm", "name": "one"}, nil); err != nil {
		t.Fatal(err)
	}
	d := ctl.wait(eventSnapshotCreated, time.Minute)
	if got, _ := json.Marshal(d); string(got) != `{"snapshots":[{"name":"one","volume":"vm"}]}` {
		t.Errorf("%s %s", eventSnapshotCreated, got)
	}
	mustThinblk(t, "snapshot", "create", dir, "vm", "two", "one", "three", "--writable")
	d = ctl.wait(eventSnapshotCreated, time.Minute)
	if got, _ := json.Marshal(d); string(got) != `{"snapshots":[{"name":"two","volume":"vm","writable":true},{"name":"three","volume":"one","writable":true}]}` {
		t.Errorf("%s %s", eventSnapshotCreated, got)
	}
	// A refused snapshot sends nothing.
	if err := ctl.c.Execute(ctx, "snapshot-create", map[string]any{"volume": "nosuch", "name": "four"}, nil); err == nil {
		t.Error("snapshot of a missing volume succeeded")
	}
	ctl.none(eventSnapshotCreated, time.Second)

	disk, err := frontend.Dial(ctx, filepath.Join(dir, "vm.sock"), frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	block := bytes.Repeat([]byte{'x'}, 64<<10)
	for i := 0; i < 4; i++ {
		if _, err := disk.WriteAt(block, int64(i)*int64(len(block))); err != nil {
			t.Fatalf("write block %d: %v", i, err)
		}
	}
	if _, err := disk.WriteAt(block, 4*int64(len(block))); err == nil {
		t.Fatal("write to a full pool succeeded")
	}
	want := map[string]string{
		eventLowWater:   `{"below":true,"free_bytes":65536,"pool":"` + abs + `"}`,
		eventOutOfSpace: `{"free_bytes":0,"pool":"` + abs + `","volume":"vm"}`,
	}
	for _, name := range []string{eventLowWater, eventOutOfSpace} {
		if got, _ := json.Marshal(ctl.wait(name, time.Minute)); string(got) != want[name] {
			t.Errorf("%s %s, want %s", name, got, want[name])
		}
	}
	mustThinblk(t, "pool", "grow", dir, "--size", "1M")
	want = map[string]string{
		eventSpaceAvailable: `{"free_bytes":786432,"pool":"` + abs + `"}`,
		eventLowWater:       `{"below":false,"free_bytes":786432,"pool":"` + abs + `"}`,
	}
	got := map[string]string{}
	for len(got) < 2 {
		ev := ctl.waitAny(time.Minute, eventSpaceAvailable, eventLowWater)
		got[ev.Event] = string(ev.Data)
	}
	for name := range want {
		var g, w any
		json.Unmarshal([]byte(got[name]), &g)
		json.Unmarshal([]byte(want[name]), &w)
		if gb, _ := json.Marshal(g); string(gb) != want[name] {
			t.Errorf("%s %s, want %s", name, gb, want[name])
		}
	}
}
