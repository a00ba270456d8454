package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

// serve --trace on a pool and on a raw image, driven by the Go front-end on two queues with
// writes, reads, discards and flushes from two goroutines: the trace has every request with the
// blocks it resolved to, trace-check finds every read consistent, and a trace whose one read
// returned other bytes (edited here) is reported with the write it contradicts.
func TestServeTrace(t *testing.T) {
	bin := buildThinblk(t)
	const size = 16 << 20
	t.Run("pool", func(t *testing.T) {
		trace := filepath.Join(t.TempDir(), "trace")
		s := serveNewPool(t, bin, []string{"--size", "32M", "--block-size", "64K"}, size, "--queues", "2", "--trace", trace)
		driveTraced(t, s.sock, size)
		s.stop(t)
		text := checkTrace(t, trace)
		for _, want := range []string{" N disk0 write ", "+new", " N disk0 read-async ", " S 1 disk0 "} {
			if !strings.Contains(text, want) {
				t.Errorf("trace lacks %q", want)
			}
		}
	})
	t.Run("raw", func(t *testing.T) {
		trace := filepath.Join(t.TempDir(), "trace")
		s := serveNewImage(t, bin, size, "--queues", "2", "--serial", "raw0", "--trace", trace)
		driveTraced(t, s.sock, size)
		s.stop(t)
		checkTrace(t, trace)
	})
}

// driveTraced writes, reads back, discards and flushes 4 KiB-aligned ranges of a small area
// from two goroutines (so that requests to the same sectors overlap), checking what it reads
// where no other goroutine writes.
func driveTraced(t *testing.T, sock string, size int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	disk, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for i := range 300 {
				// Each goroutine owns its half of the first MiB (checked reads) and shares
				// the next one with the other (overlapping writes).
				area := int64(g) * (512 << 10)
				if i%3 == 0 {
					area = 1 << 20
				}
				off := area + rng.Int64N(96)*4096
				n := (1 + rng.IntN(8)) * 4096
				if off+int64(n) > size {
					continue
				}
				buf := make([]byte, n)
				for j := range buf {
					buf[j] = byte(i + j/512 + g)
				}
				var err error
				switch rng.IntN(10) {
				case 0:
					err = disk.Discard(off, int64(n))
				case 1:
					err = disk.Flush()
				default:
					if _, err = disk.WriteAt(buf, off); err == nil {
						got := make([]byte, n)
						_, err = disk.ReadAt(got, off)
						if err == nil && area != 1<<20 && string(got) != string(buf) {
							err = fmt.Errorf("read back at %d differs", off)
						}
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// checkTrace runs trace-check on a consistent trace, then on a copy whose last full read
// returned other bytes, and returns the trace.
func checkTrace(t *testing.T, trace string) string {
	t.Helper()
	out, errOut, code := thinblk(t, "trace-check", trace)
	if code != 0 {
		t.Fatalf("trace-check: exit %d\n%s%s", code, out, errOut)
	}
	var reads, sectors int
	if _, err := fmt.Sscanf(out, "%d requests, %d reads: %d sectors compared", new(int), &reads, &sectors); err != nil || reads < 300 || sectors < 1000 {
		t.Errorf("trace-check checked too little (%v): %s", err, out)
	}
	data, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	// The last read of a range only one goroutine writes (below 1 MiB) now returns other bytes.
	readLen := map[string]int64{}
	for i, l := range lines {
		f := strings.Fields(l)
		if len(f) == 8 && f[2] == "S" && f[5] == "read" {
			var off, n int64
			fmt.Sscan(f[6], &off)
			fmt.Sscan(f[7], &n)
			if off+n <= 1<<20 {
				readLen[f[3]] = n
			}
			continue
		}
		if len(f) != 8 || f[2] != "D" || f[5] != "read" || f[6] != "ok" || readLen[f[3]] == 0 {
			continue
		}
		last := true
		for _, m := range lines[i+1:] {
			g := strings.Fields(m)
			if len(g) == 8 && g[2] == "D" && g[5] == "read" && readLen[g[3]] > 0 {
				last = false
				break
			}
		}
		if !last {
			continue
		}
		f[7] = fmt.Sprintf("1234abcd*%d", readLen[f[3]]/512)
		lines[i] = strings.Join(f, " ")
		bad := trace + ".edited"
		if err := os.WriteFile(bad, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		out, _, code := thinblk(t, "trace-check", bad)
		if code != 1 || !strings.Contains(out, "returned 1234abcd") || strings.Contains(out, " 0 differ") {
			t.Errorf("edited trace: exit %d\n%s", code, out)
		}
		return string(data)
	}
	t.Fatal("no read of a checked range in the trace")
	return ""
}
