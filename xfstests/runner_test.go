package xfstests

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func fakeTree(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("testdata/fakexfstests")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func localLauncher(t *testing.T, out string) *LocalLauncher {
	return &LocalLauncher{
		Dir: fakeTree(t),
		Config: Config{FSTYP: "xfs", TestDev: "/dev/fake-test", ScratchDev: "/dev/fake-scratch",
			TestDir: "/mnt/test", ScratchMnt: "/mnt/scratch", MkfsOptions: "-m reflink=1"},
		ConfigPath: filepath.Join(out, "local.config"),
		ResultBase: filepath.Join(out, "results"),
	}
}

func byTest(rs []Result) map[string]Result {
	m := map[string]Result{}
	for _, r := range rs {
		m[r.Test] = r
	}
	return m
}

func TestRunFakeCheck(t *testing.T) {
	out := t.TempDir()
	l := localLauncher(t, out)
	expected := map[string]ExpectedFailure{"generic/003": {Test: "generic/003", Reason: "known bad", Evidence: "qsd too"}}
	var progress, raw bytes.Buffer
	run := Run(context.Background(), l, RunOptions{
		Backend: "thinblk", FSTYP: "xfs",
		Tests:       []string{"generic/001", "generic/002", "generic/003", "generic/005", "generic/999"},
		TestTimeout: time.Minute, ResultBase: l.ResultBase, OutDir: out, Expected: expected,
		Progress: &progress, RawLog: &raw,
	})
	if run.Error != "" {
		t.Fatalf("run error: %s", run.Error)
	}
	got := byTest(run.Results)
	if len(run.Results) != 5 {
		t.Fatalf("%d results: %+v", len(run.Results), run.Results)
	}
	for test, want := range map[string]Outcome{"generic/001": Pass, "generic/002": NotRun, "generic/003": Fail, "generic/005": Fail, "generic/999": Fail} {
		if got[test].Outcome != want {
			t.Errorf("%s: %s, want %s (%+v)", test, got[test].Outcome, want, got[test])
		}
	}
	if r := got["generic/002"]; r.Reason != "this test requires a valid $SCRATCH_LOGDEV" {
		t.Errorf("notrun reason %q", r.Reason)
	}
	if !got["generic/003"].Expected || got["generic/005"].Expected {
		t.Errorf("expected flags: 003 %v, 005 %v", got["generic/003"].Expected, got["generic/005"].Expected)
	}
	// The failure's artefacts are copied under the run directory.
	for _, f := range []string{"failures/generic/003.out.bad", "failures/generic/003.full"} {
		data, err := os.ReadFile(filepath.Join(out, f))
		if err != nil {
			t.Errorf("copied file: %v", err)
		} else if f == "failures/generic/003.full" && !strings.Contains(string(data), "data mismatch at offset 4096") {
			t.Errorf("%s: %q", f, data)
		}
	}
	if len(got["generic/003"].Files) != 2 {
		t.Errorf("003 files %v", got["generic/003"].Files)
	}
	// The config check read: the fake check echoes MKFS_OPTIONS and the scratch device.
	if !strings.Contains(raw.String(), "MKFS_OPTIONS  -- -m reflink=1 /dev/fake-scratch") {
		t.Errorf("check did not see the written config:\n%s", raw.String())
	}
	for _, want := range []string{"generic/001", "pass", "generic/003", "(expected: known bad)", "generic/005"} {
		if !strings.Contains(progress.String(), want) {
			t.Errorf("progress lacks %q:\n%s", want, progress.String())
		}
	}
	if run.OK() {
		t.Error("run with the unexpected failure generic/005 counts as OK")
	}
	if u := run.Unexpected(); len(u) != 2 || u[0].Test != "generic/005" || u[1].Test != "generic/999" {
		t.Errorf("unexpected %+v", u)
	}

	// Reports.
	rep := &Report{FSTYP: "xfs", Runs: []BackendRun{run}}
	if err := rep.WriteJSON(filepath.Join(out, "report.json")); err != nil {
		t.Fatal(err)
	}
	if err := rep.WriteJUnit(filepath.Join(out, "junit.xml")); err != nil {
		t.Fatal(err)
	}
	var back Report
	data, _ := os.ReadFile(filepath.Join(out, "report.json"))
	if err := json.Unmarshal(data, &back); err != nil || len(back.Runs[0].Results) != 5 {
		t.Fatalf("report.json: %v %s", err, data)
	}
	var ju junitSuites
	data, _ = os.ReadFile(filepath.Join(out, "junit.xml"))
	if err := xml.Unmarshal(data, &ju); err != nil {
		t.Fatalf("junit.xml: %v", err)
	}
	s := ju.Suites[0]
	// 5 tests + the run and pool-check pseudo-tests; 005 and 999 fail, 002 and 003 skipped.
	if s.Tests != 7 || s.Failures != 2 || s.Skipped != 2 || s.Errors != 0 {
		t.Errorf("junit suite counts tests=%d failures=%d skipped=%d errors=%d\n%s", s.Tests, s.Failures, s.Skipped, s.Errors, data)
	}
	var table bytes.Buffer
	rep.WriteTable(&table)
	if !strings.Contains(table.String(), "RESULT: FAILED") || !strings.Contains(table.String(), "unexpected failure generic/005") {
		t.Errorf("table:\n%s", table.String())
	}
}

// A hung test is killed after the time limit, reported failed by name, and the run goes on
// with the rest in a new check session.
func TestRunHungTest(t *testing.T) {
	out := t.TempDir()
	l := localLauncher(t, out)
	start := time.Now()
	var progress bytes.Buffer
	run := Run(context.Background(), l, RunOptions{
		Backend: "thinblk", FSTYP: "xfs", Tests: []string{"generic/001", "generic/004", "generic/006"},
		TestTimeout: 10 * time.Second, WatchInterval: 100 * time.Millisecond,
		ResultBase: l.ResultBase, OutDir: out, Progress: &progress,
	})
	if took := time.Since(start); took > 90*time.Second {
		t.Errorf("run took %v with a 10s test limit", took)
	}
	got := byTest(run.Results)
	if got["generic/001"].Outcome != Pass || got["generic/006"].Outcome != Pass {
		t.Errorf("results %+v", run.Results)
	}
	h := got["generic/004"]
	if h.Outcome != Fail || !strings.Contains(h.Reason, "timed out after 10s") {
		t.Errorf("hung test: %+v", h)
	}
	if run.Sessions != 2 {
		t.Errorf("sessions %d, want 2", run.Sessions)
	}
	if !strings.Contains(progress.String(), "generic/004") {
		t.Errorf("progress:\n%s", progress.String())
	}

	// StopOnHang: the run stops with what it has.
	run = Run(context.Background(), l, RunOptions{
		Backend: "thinblk", FSTYP: "xfs", Tests: []string{"generic/001", "generic/004", "generic/006"},
		TestTimeout: 10 * time.Second, WatchInterval: 100 * time.Millisecond, StopOnHang: true,
		ResultBase: l.ResultBase, OutDir: out,
	})
	if len(run.Results) != 2 || run.Sessions != 1 || !strings.Contains(run.Error, "generic/006") || run.OK() {
		t.Errorf("stop on hang: %+v", run)
	}
}

// A check that dies at once (bad config) yields failures, not a retry loop.
func TestRunCheckDies(t *testing.T) {
	out := t.TempDir()
	l := localLauncher(t, out)
	l.Config.FSTYP = "btrfs"
	run := Run(context.Background(), l, RunOptions{Backend: "qsd", FSTYP: "xfs", Tests: []string{"generic/001"}, TestTimeout: time.Minute})
	if run.Error == "" || run.OK() {
		t.Errorf("bad config: %+v", run)
	}
	l.Config.FSTYP = "xfs"
	l.Dir = t.TempDir() // no check here: bash fails
	run = Run(context.Background(), l, RunOptions{Backend: "qsd", FSTYP: "xfs", Tests: []string{"generic/001"}, TestTimeout: time.Minute})
	if len(run.Results) != 1 || run.Results[0].Outcome != Fail || run.Sessions != 1 {
		t.Errorf("missing check: %+v", run)
	}
}

func TestCompareAndVerdict(t *testing.T) {
	rep := &Report{Runs: []BackendRun{
		{Backend: "thinblk", Results: []Result{{Test: "generic/001", Outcome: Pass}, {Test: "generic/002", Outcome: NotRun}}},
		{Backend: "qsd", Results: []Result{{Test: "generic/001", Outcome: Pass}, {Test: "generic/002", Outcome: Pass}}},
	}}
	rep.Compare()
	if len(rep.Differences) != 1 || rep.Differences[0].Test != "generic/002" {
		t.Fatalf("differences %+v", rep.Differences)
	}
	if !rep.OK() {
		t.Error("a notrun difference fails the run")
	}
	rep.Runs[0].Results[1] = Result{Test: "generic/002", Outcome: Fail, Expected: true}
	rep.Compare()
	if rep.OK() {
		t.Error("thinblk failing what qsd passes counts as OK, even if listed as expected")
	}
	rep = &Report{Runs: []BackendRun{{Backend: "thinblk", PoolCheck: "block 7 mapped twice"}}}
	if rep.OK() {
		t.Error("unclean pool counts as OK")
	}
}

func TestConfigRender(t *testing.T) {
	c := Config{FSTYP: "ext4", TestDir: "/mnt/test", ScratchMnt: "/mnt/scr'atch", Extra: map[string]string{"USE_KMEMLEAK": "no"}}
	s, err := c.Render()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"export FSTYP='ext4'\n",
		`export TEST_DEV="${THINBLK_TEST_DEV:?`,
		`export SCRATCH_DEV="${THINBLK_SCRATCH_DEV:?`,
		`export SCRATCH_MNT='/mnt/scr'\''atch'`,
		"export USE_KMEMLEAK='no'\n",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("config lacks %q:\n%s", want, s)
		}
	}
	for _, bad := range []Config{{FSTYP: "btrfs", TestDir: "a", ScratchMnt: "b"}, {FSTYP: "xfs"}, {FSTYP: "xfs", TestDir: "a", ScratchMnt: "b", Extra: map[string]string{"a;b": "x"}}} {
		if _, err := bad.Render(); err == nil {
			t.Errorf("config %+v accepted", bad)
		}
	}
}

func TestLists(t *testing.T) {
	for _, fstyp := range []string{"xfs", "ext4"} {
		l, err := DefaultList(fstyp)
		if err != nil {
			t.Fatal(err)
		}
		// The set is trimmed to run in about 15 min; far fewer would drop coverage.
		if len(l) < 10 {
			t.Errorf("%s default list has %d tests", fstyp, len(l))
		}
		for _, e := range l {
			if !AppliesTo(e.Test, fstyp) {
				t.Errorf("%s list has %s", fstyp, e.Test)
			}
		}
		if _, err := LoadExpected(fstyp, ""); err != nil {
			t.Error(err)
		}
	}
	if _, err := ParseList(strings.NewReader("generic/001\n")); err == nil {
		t.Error("entry without reason accepted")
	}
	if _, err := ParseExpected(strings.NewReader("generic/001 flaky\n")); err == nil {
		t.Error("expected failure without evidence accepted")
	}
	m, err := ParseExpected(strings.NewReader("# c\ngeneric/091  fsx mismatch | evidence: fails on qsd\n"))
	if err != nil || m["generic/091"].Evidence != "fails on qsd" || m["generic/091"].Reason != "fsx mismatch" {
		t.Errorf("parse expected: %v %+v", err, m)
	}
}

// A test that fails only sometimes, repeated on two back-ends: each back-end's failure rate,
// which repetitions failed, their fsx operation logs kept per repetition, and the verdict
// (failing on thinblk in some runs while the reference never fails is a difference).
func TestRunRepeatedFailureRates(t *testing.T) {
	out := t.TempDir()
	every := map[string]string{"thinblk": "2", "qsd": ""} // thinblk fails runs 2 and 4
	rep := RunRepeated(context.Background(), "xfs", []string{"generic/001", "generic/007"}, []string{"thinblk", "qsd"}, 4,
		func(ctx context.Context, kind string, n int) BackendRun {
			dir := RepeatDir(out, kind, n)
			l := localLauncher(t, dir)
			l.Env = []string{"FAKE_FLAKY_STATE=" + filepath.Join(out, kind+".count"), "FAKE_FLAKY_EVERY=" + every[kind]}
			return Run(ctx, l, RunOptions{Backend: kind, Repeat: n, FSTYP: "xfs", Tests: []string{"generic/001", "generic/007"},
				TestTimeout: time.Minute, ResultBase: l.ResultBase, OutDir: dir})
		})
	if len(rep.Runs) != 8 || rep.Repeat != 4 {
		t.Fatalf("%d runs, repeat %d", len(rep.Runs), rep.Repeat)
	}
	// The back-ends take turns.
	for i, run := range rep.Runs {
		if want := []string{"thinblk", "qsd"}[i%2]; run.Backend != want || run.Repeat != i/2+1 {
			t.Errorf("run %d is %s, want %s#%d", i, run.Label(), want, i/2+1)
		}
	}
	rates := map[string]Rate{}
	for _, r := range rep.Rates {
		rates[r.Test+" "+r.Backend] = r
	}
	if len(rep.Rates) != 4 {
		t.Errorf("rates %+v", rep.Rates)
	}
	if r := rates["generic/007 thinblk"]; r.Runs != 4 || r.Failures != 2 || r.FailureRate != 0.5 || fmt.Sprint(r.FailedIn) != "[2 4]" {
		t.Errorf("thinblk 007 rate %+v", r)
	}
	if r := rates["generic/007 qsd"]; r.Runs != 4 || r.Failures != 0 || r.FailureRate != 0 {
		t.Errorf("qsd 007 rate %+v", r)
	}
	if r := rates["generic/001 thinblk"]; r.Runs != 4 || r.Failures != 0 {
		t.Errorf("thinblk 001 rate %+v", r)
	}
	if len(rep.Differences) != 1 || rep.Differences[0].Outcomes["thinblk"] != Fail || rep.Differences[0].Outcomes["qsd"] != Pass {
		t.Errorf("differences %+v", rep.Differences)
	}
	if rep.OK() {
		t.Error("thinblk failing 2 of 4 runs of a test the reference always passes counts as OK")
	}
	// Each failing repetition keeps its own fsx operation log and .full.
	for _, n := range []int{2, 4} {
		data, err := os.ReadFile(filepath.Join(RepeatDir(out, "thinblk", n), "failures", "generic", "007.1.fsxops"))
		if err != nil || !strings.Contains(string(data), fmt.Sprintf("(run %d)", n)) {
			t.Errorf("repetition %d's fsxops: %q %v", n, data, err)
		}
	}
	if _, err := os.Stat(filepath.Join(RepeatDir(out, "thinblk", 1), "failures")); !os.IsNotExist(err) {
		t.Errorf("passing repetition 1 has failure files: %v", err)
	}
	var table bytes.Buffer
	rep.WriteTable(&table)
	for _, want := range []string{"failure rates over 4 repetitions", "2/4 fail (50%) #2,#4", "0/4 fail (0%)", "thinblk#3: 2 pass", "RESULT: FAILED"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
	if err := rep.WriteJSON(filepath.Join(out, "report.json")); err != nil {
		t.Fatal(err)
	}
	var back Report
	data, _ := os.ReadFile(filepath.Join(out, "report.json"))
	if err := json.Unmarshal(data, &back); err != nil || back.Repeat != 4 || len(back.Rates) != 4 || back.Runs[3].Repeat != 2 {
		t.Fatalf("report.json: %v %s", err, data)
	}

	// An interrupt leaves the repetition it cut short out of the rates.
	ctx, cancel := context.WithCancel(context.Background())
	cut := RunRepeated(ctx, "xfs", []string{"generic/001"}, []string{"thinblk", "qsd"}, 3,
		func(ctx context.Context, kind string, n int) BackendRun {
			if n == 2 && kind == "qsd" {
				cancel()
				return BackendRun{Results: []Result{{Test: "generic/001", Outcome: Fail, Reason: "interrupted"}}, Error: "interrupted"}
			}
			return BackendRun{Results: []Result{{Test: "generic/001", Outcome: Pass}}}
		})
	if len(cut.Runs) != 3 || fmt.Sprint(cut.LeftOut) != "[qsd#2]" || cut.Rates[1].Runs != 1 || cut.Rates[1].Failures != 0 || cut.OK() {
		t.Errorf("interrupted: runs %d, left out %v, rates %+v, ok %v", len(cut.Runs), cut.LeftOut, cut.Rates, cut.OK())
	}

	// Once is the old report: no rates, one column per back-end.
	once := RunRepeated(context.Background(), "xfs", []string{"generic/001"}, []string{"qsd"}, 1,
		func(ctx context.Context, kind string, n int) BackendRun {
			if n != 0 {
				t.Errorf("single run numbered %d", n)
			}
			return BackendRun{Results: []Result{{Test: "generic/001", Outcome: Pass}}}
		})
	if once.Repeat != 1 || once.Rates != nil || once.Runs[0].Backend != "qsd" || !once.OK() {
		t.Errorf("single run %+v", once)
	}
	if RepeatDir(out, "qsd", 0) != filepath.Join(out, "qsd") {
		t.Errorf("single run's directory %s", RepeatDir(out, "qsd", 0))
	}
}
