package main

import (
	"path/filepath"
	"strings"
	"testing"
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
