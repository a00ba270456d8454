package guesttests

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestGuestServeKilled: `thinblk serve` is SIGKILLed under a running guest and started again
// (QEMU reconnects, chardev reconnect=1), with the in-flight area carrying the requests in
// flight across the kills.
//
//   - fio: a thin volume on two queues, fio random writes with crc32c verification at depth 32
//     while serve is killed 5 times at random moments: no I/O error, no verify failure.
//   - a write waiting for space (pause policy) while later reads on its queue complete; serve
//     is killed, the pool grown offline, serve started: the write completes, its data is on
//     the volume.
//
// The guest's kernel must never say "is not a head" or "I/O error", and `thinblk check` must
// find both pools clean. THINBLK_GUEST_NO_INFLIGHT=1 runs serve with --no-inflight: the test
// then fails (what the feature is for).
func TestGuestServeKilled(t *testing.T) {
	e := setup(t)
	if e.thinblk == "" {
		t.Skip("THINBLK_BACKEND has no thinblk: the kill test is thinblk's own")
	}
	ctx := context.Background()
	dir := workDir(t)
	var extra []string
	if os.Getenv("THINBLK_GUEST_NO_INFLIGHT") == "1" {
		extra = []string{"--no-inflight"}
	}
	type poolSpec struct {
		name, vol, size, volSize string
		create                   []string
		queues                   int
	}
	specs := []poolSpec{
		{"fio", "fiovol", "256M", "128M", nil, 2},
		{"full", "fullvol", "1M", "4M", []string{"--no-space", "pause"}, 1},
	}
	pools := map[string]string{}
	backends := map[string]*Backend{}
	socks := filepath.Join(dir, "socks")
	start := func(t *testing.T, s poolSpec, n int, env ...string) *Backend {
		t.Helper()
		b, err := StartBackend(ctx, BackendOptions{
			Kind: ThinPool, Image: pools[s.name], Socket: filepath.Join(socks, s.name, s.vol+".sock"), Queues: s.queues,
			LogPath: filepath.Join(dir, fmt.Sprintf("%s-backend-%d.log", s.name, n)), ThinblkBin: e.thinblk, ExtraArgs: extra, Env: env,
		})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var disks []DiskSpec
	for _, s := range specs {
		pools[s.name] = filepath.Join(dir, s.name)
		for _, args := range [][]string{
			append([]string{"pool", "create", pools[s.name], "--size", s.size, "--block-size", "64K"}, s.create...),
			{"volume", "create", pools[s.name], s.vol, "--size", s.volSize},
		} {
			if out, err := ThinblkCmd(ctx, e.thinblk, args...); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
		}
		backends[s.name] = start(t, s, 0)
		disks = append(disks, DiskSpec{Socket: filepath.Join(socks, s.name, s.vol+".sock"), Queues: s.queues, Reconnect: true})
	}
	t.Cleanup(func() {
		for _, b := range backends {
			b.Stop(15 * time.Second)
		}
	})
	vm, err := StartVM(ctx, VMOptions{Dir: filepath.Join(dir, "vm"), Images: e.images, CPUs: 2, Disks: disks, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	g := newGuest(t, vm)
	kill := func(t *testing.T, s poolSpec, n int, between func(), env ...string) {
		t.Helper()
		backends[s.name].Kill()
		if between != nil {
			between()
		}
		backends[s.name] = start(t, s, n, env...)
	}
	// guestClean checks the guest kernel reported no I/O trouble; it returns how many lines
	// did.
	guestClean := func(t *testing.T) int {
		t.Helper()
		out := strings.TrimSpace(g.sh(t, 20*time.Second, "dmesg | grep -E 'is not a head|I/O error|blocked for more than' || true"))
		if out == "" {
			return 0
		}
		t.Errorf("guest kernel log:\n%s", out)
		return len(strings.Split(out, "\n"))
	}

	t.Run("fio", func(t *testing.T) {
		s := specs[0]
		dev, err := vm.DiskDevice(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		// Blocks allocated and flushed first: a kill loses allocations younger than the
		// pool's last metadata commit (README, "Restarts and upgrades"); overwrites are kept.
		g.sh(t, 2*time.Minute, "dd if=/dev/zero of="+dev+" bs=1M count=64 oflag=direct conv=fsync 2>/dev/null && sync")
		// Bounded fio runs (each writes 32 MiB at random, then reads it all back and checks
		// it) one after another until told to stop; the first failure ends the loop.
		fio := "fio --name=v --filename=" + dev + " --size=32M --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio " +
			"--direct=1 --verify=crc32c --verify_fatal=1"
		g.sh(t, 20*time.Second, "rm -f /tmp/fio.*; setsid sh -c 'i=0; while [ ! -e /tmp/fio.stop ]; do i=$((i+1)); "+
			fio+" --output=/tmp/fio.out.$i || { echo $i > /tmp/fio.rc; exit; }; done; echo $i > /tmp/fio.runs; echo 0 > /tmp/fio.rc' </dev/null >/tmp/fio.log 2>&1 &")
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 13))
		kills := 5
		if n, err := strconv.Atoi(os.Getenv("THINBLK_SOAK_KILLS")); err == nil && n > 0 {
			kills = n
		}
		// Each process is armed to kill itself at a random point of the request path after
		// a random number of requests (so that requests are in flight: the guest is slow
		// under TCG, and a kill from outside mostly finds none); one that has not died after
		// a few seconds is killed from outside.
		points := []string{"fetched", "used-element", "used-index"}
		arm := func() string {
			return fmt.Sprintf("THINBLK_TEST_CRASH_AT=%s:%d", points[rng.IntN(len(points))], 50+rng.IntN(3000))
		}
		kill(t, s, 0, nil, arm())
		var longest time.Duration
		for i := 1; i <= kills; i++ {
			b := backends[s.name]
			select {
			case <-b.exited:
			case <-time.After(time.Duration(2000+rng.IntN(3000)) * time.Millisecond):
			}
			if out := g.sh(t, 20*time.Second, "cat /tmp/fio.rc 2>/dev/null || true"); strings.TrimSpace(out) != "" {
				t.Fatalf("fio failed (run %s) after %d kills:\n%s", strings.TrimSpace(out), i-1, g.sh(t, 20*time.Second, "cat /tmp/fio.log /tmp/fio.out.*"))
			}
			killed := time.Now()
			how := "from outside"
			if !b.Alive() {
				how = "at its crash point"
			}
			var env []string
			if i < kills {
				env = append(env, arm())
			}
			kill(t, s, i, nil, env...)
			// The stall: until the new process serves the rings again.
			waitBackendLog(t, backends[s.name], "ring started")
			stall := time.Since(killed)
			longest = max(longest, stall)
			t.Logf("kill %d of serve under fio (%s): rings served again after %v", i, how, stall.Round(time.Millisecond))
		}
		g.sh(t, 20*time.Second, "touch /tmp/fio.stop")
		var rc string
		deadline := time.Now().Add(3 * time.Minute)
		for rc == "" && time.Now().Before(deadline) {
			rc = strings.TrimSpace(g.sh(t, 20*time.Second, "cat /tmp/fio.rc 2>/dev/null || true"))
			time.Sleep(time.Second)
		}
		out := g.sh(t, 20*time.Second, "cat /tmp/fio.log /tmp/fio.runs /tmp/fio.out.* 2>/dev/null; ps; true")
		if rc != "0" || strings.Contains(out, "verify") && strings.Contains(out, "bad") {
			t.Fatalf("fio (rc %q) after %d kills:\n%s", rc, kills, out)
		}
		runs := strings.TrimSpace(g.sh(t, 20*time.Second, "cat /tmp/fio.runs"))
		resubmitted := 0
		for i := 1; i <= kills; i++ {
			data, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("%s-backend-%d.log", s.name, i)))
			resubmitted += strings.Count(string(data), "resubmitting request left in flight")
		}
		guestErrors := guestClean(t)
		t.Logf("SOAK: kills survived %d/%d, guest errors %d, fio runs verified %s, requests resubmitted %d, longest stall %v",
			kills, kills, guestErrors, runs, resubmitted, longest.Round(time.Millisecond))
		t.Logf("fio survived %d kills of serve", kills)
	})

	t.Run("waiting-for-space", func(t *testing.T) {
		s := specs[1]
		dev, err := vm.DiskDevice(ctx, 1)
		if err != nil {
			t.Fatal(err)
		}
		// Fill the pool (16 blocks), flushed; then a write that needs a 17th block waits.
		g.sh(t, time.Minute, "dd if=/dev/zero bs=64k count=16 2>/dev/null | tr '\\0' 'a' | dd of="+dev+" bs=64k oflag=direct conv=fsync 2>/dev/null")
		g.sh(t, 20*time.Second, "rm -f /tmp/w.rc; setsid sh -c 'dd if=/dev/zero bs=64k count=1 2>/dev/null | tr \"\\0\" w | dd of="+dev+" bs=64k seek=40 oflag=direct 2>/tmp/w.err; echo $? > /tmp/w.rc' </dev/null >/dev/null 2>&1 &")
		waitBackendLog(t, backends[s.name], "request waits for space")
		// Reads of mapped blocks on the same queue complete after it.
		if got := g.sh(t, time.Minute, "dd if="+dev+" bs=64k skip=3 count=4 iflag=direct 2>/dev/null | tr -d a | wc -c"); strings.TrimSpace(got) != "0" {
			t.Fatalf("reads behind the waiting write returned %s bytes that are not the fill", got)
		}
		if rc := g.sh(t, 20*time.Second, "cat /tmp/w.rc 2>/dev/null || true"); strings.TrimSpace(rc) != "" {
			t.Fatalf("the write to a full pool ended (%s) instead of waiting", rc)
		}
		kill(t, s, 1, func() {
			if out, err := ThinblkCmd(ctx, e.thinblk, "pool", "grow", pools[s.name], "--size", "2M"); err != nil {
				t.Fatalf("offline pool grow: %v\n%s", err, out)
			}
		})
		var rc string
		deadline := time.Now().Add(time.Minute)
		for rc == "" && time.Now().Before(deadline) {
			rc = strings.TrimSpace(g.sh(t, 20*time.Second, "cat /tmp/w.rc 2>/dev/null || true"))
			time.Sleep(500 * time.Millisecond)
		}
		if rc != "0" {
			t.Fatalf("the waiting write: exit %q: %s", rc, g.sh(t, 20*time.Second, "cat /tmp/w.err 2>/dev/null; true"))
		}
		if got := g.sh(t, time.Minute, "echo 3 > /proc/sys/vm/drop_caches; dd if="+dev+" bs=64k skip=40 count=1 iflag=direct 2>/dev/null | tr -d w | wc -c"); strings.TrimSpace(got) != "0" {
			t.Fatalf("the waiting write's data is not on the volume (%s other bytes)", strings.TrimSpace(got))
		}
		guestClean(t)
	})

	if err := g.shutdown(t, ctx); err != nil {
		t.Fatal(err)
	}
	for name, b := range backends {
		if err := b.Stop(15 * time.Second); err != nil {
			t.Errorf("stop %s: %v\n%s", name, err, b.LogTail(20))
		}
		if out, err := ThinblkCmd(ctx, e.thinblk, "check", pools[name]); err != nil {
			t.Errorf("thinblk check %s: %v\n%s", name, err, out)
		}
	}
}

// waitBackendLog waits until the back-end's log says s.
func waitBackendLog(t *testing.T, b *Backend, s string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		data, _ := os.ReadFile(b.Opts.LogPath)
		if strings.Contains(string(data), s) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("back-end log never said %q:\n%s", s, b.LogTail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
