package xfstests

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// SuiteOptions configure RunSuite: the same tests on each back-end in turn.
type SuiteOptions struct {
	XfstestsDir string
	OutDir      string // run directory (absolute); one subdirectory per back-end
	FSTYP       string
	Tests       []string
	Backends    []string // "thinblk", "qsd"
	ThinblkBin  string
	Image       GuestImage
	// VolumeSize is TEST's and SCRATCH's virtual size; PoolSize the thin pool's real size.
	VolumeSize, PoolSize string
	Queues               int
	MemoryMB, CPUs       int
	TestTimeout          time.Duration
	StopOnHang           bool
	Expected             map[string]ExpectedFailure
	// Repeat runs the tests that many times on each back-end (0 or 1: once), each time on new
	// disks in a new guest, to measure failure rates of tests that fail only sometimes.
	Repeat   int
	Progress io.Writer
	Logf     func(format string, args ...any)
}

// DefaultConfig is the xfstests configuration for fstyp on the guest's disks.
func DefaultConfig(fstyp string) Config {
	return Config{FSTYP: fstyp, TestDir: "/mnt/test", ScratchMnt: "/mnt/scratch",
		Extra: map[string]string{"USE_KMEMLEAK": "no"}}
}

// RunSuite runs the tests on every back-end (o.Repeat times) and returns the report
// (differences and, when repeated, failure rates filled).
func RunSuite(ctx context.Context, o SuiteOptions) *Report {
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	return RunRepeated(ctx, o.FSTYP, o.Tests, o.Backends, o.Repeat, func(ctx context.Context, kind string, rep int) BackendRun {
		return runOne(ctx, o, kind, rep, RepeatDir(o.OutDir, kind, rep))
	})
}

// RunRepeated calls runBackend for each back-end, repeat times (at least once), and returns
// the report with differences and failure rates. The back-ends take turns (thinblk, qsd,
// thinblk, qsd, ...), so that a machine whose load changes during the run weighs on both
// alike. rep is 0 for a single run and counts from 1 when repeated.
func RunRepeated(ctx context.Context, fstyp string, tests, backends []string, repeat int, runBackend func(ctx context.Context, kind string, rep int) BackendRun) *Report {
	rep := &Report{FSTYP: fstyp, Tests: tests, Repeat: max(repeat, 1)}
	for i := 1; i <= rep.Repeat; i++ {
		for _, kind := range backends {
			if ctx.Err() != nil {
				break
			}
			n := 0
			if rep.Repeat > 1 {
				n = i
			}
			run := runBackend(ctx, kind, n)
			run.Backend, run.Repeat = kind, n
			if rep.Repeat > 1 && ctx.Err() != nil {
				// Cut short by the interrupt: its test did not fail, it was stopped.
				// The repetitions that ended count; this one is left out of the rates.
				rep.LeftOut = append(rep.LeftOut, run.Label())
				continue
			}
			rep.Runs = append(rep.Runs, run)
		}
	}
	rep.Compare()
	return rep
}

// RepeatDir is a back-end's directory in the run directory: OUT/KIND for a single run,
// OUT/KIND/repN for repetition N.
func RepeatDir(outDir, kind string, rep int) string {
	if rep == 0 {
		return filepath.Join(outDir, kind)
	}
	return filepath.Join(outDir, kind, fmt.Sprintf("rep%d", rep))
}

func runOne(ctx context.Context, o SuiteOptions, kind string, rep int, dir string) BackendRun {
	failed := func(err error) BackendRun {
		return BackendRun{Backend: kind, FSTYP: o.FSTYP, Started: time.Now(), Error: err.Error()}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return failed(err)
	}
	o.Logf("%s: starting back-end", kind)
	disks, err := StartDisks(ctx, BackendSetup{Kind: kind, Dir: filepath.Join(dir, "backend"), ThinblkBin: o.ThinblkBin,
		VolumeSize: o.VolumeSize, PoolSize: o.PoolSize, Queues: o.Queues, Logf: o.Logf})
	if err != nil {
		return failed(err)
	}
	raw, err := os.Create(filepath.Join(dir, "check.out"))
	if err != nil {
		disks.Stop()
		return failed(err)
	}
	defer raw.Close()
	resultBase := filepath.Join(dir, "results")
	l := &VMLauncher{
		Image: o.Image, XfstestsDir: o.XfstestsDir, RunDir: dir, ResultBase: resultBase,
		Config: DefaultConfig(o.FSTYP), Test: disks.Test, Scratch: disks.Scratch,
		MemoryMB: o.MemoryMB, CPUs: o.CPUs, Logf: o.Logf,
	}
	run := Run(ctx, l, RunOptions{
		Backend: kind, Repeat: rep, FSTYP: o.FSTYP, Tests: o.Tests, TestTimeout: o.TestTimeout, StopOnHang: o.StopOnHang,
		ResultBase: resultBase, OutDir: dir, Expected: o.Expected, Progress: o.Progress, RawLog: raw,
	})
	if !disks.Alive() && run.Error == "" {
		run.Error = "back-end process died during the run; see " + filepath.Join(dir, "backend")
	}
	if err := disks.Stop(); err != nil && run.Error == "" {
		run.Error = err.Error()
	}
	if kind == "thinblk" {
		// Checked even after an interrupt: the pool's health is the point of the run.
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		run.PoolCheck = disks.CheckPool(cctx)
		cancel()
	}
	return run
}

// ResolveGroup lists the tests of group for fstyp from the tree's group.list files (generic,
// shared and fstyp's directory), sorted as check would run them.
func ResolveGroup(xfstestsDir, fstyp, group string) ([]string, error) {
	var out []string
	found := false
	for _, sub := range []string{"generic", "shared", fstyp} {
		path := filepath.Join(xfstestsDir, "tests", sub, "group.list")
		f, err := os.Open(path)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("group %s: %w", group, err)
		}
		found = true
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 2 || strings.HasPrefix(fields[0], "#") {
				continue
			}
			for _, g := range fields[1:] {
				if g == group {
					out = append(out, sub+"/"+fields[0])
					break
				}
			}
		}
		err = sc.Err()
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("group %s: %s: %w", group, path, err)
		}
	}
	if !found {
		return nil, fmt.Errorf("group %s: no tests/*/group.list in %s (is it a built xfstests tree?)", group, xfstestsDir)
	}
	sort.Strings(out)
	if len(out) == 0 {
		return nil, fmt.Errorf("group %s: no %s tests in it", group, fstyp)
	}
	return out, nil
}
