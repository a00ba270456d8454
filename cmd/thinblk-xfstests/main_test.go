package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/thinblk/thinblk/xfstests"
)

func TestUsageErrors(t *testing.T) {
	fake, _ := filepath.Abs("../../xfstests/testdata/fakexfstests")
	for _, args := range [][]string{
		{"--fstyp", "btrfs", "--xfstests", fake},
		{"--xfstests", ""},
		{"--xfstests", fake, "--tests", "generic/001", "--group", "quick"},
		{"--xfstests", fake, "--backend", "lvm"},
		{"--xfstests", t.TempDir()}, // no check there
		{"--xfstests", fake, "extra"},
		{"--xfstests", fake, "--repeat", "0"},
	} {
		var stdout, stderr bytes.Buffer
		t.Setenv("XFSTESTS_DIR", "")
		if code := run(args, &stdout, &stderr); code != 2 {
			t.Errorf("%q: exit %d, want 2; stderr %s", args, code, stderr.String())
		}
	}
}

// A second run in a directory another run holds is refused before anything starts.
func TestRunDirInUse(t *testing.T) {
	fake, _ := filepath.Abs("../../xfstests/testdata/fakexfstests")
	out := t.TempDir()
	unlock, err := lockRunDir(out)
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := run([]string{"--xfstests", fake, "--backend", "qsd", "--tests", "generic/001", "--out", out}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "in use by another thinblk-xfstests run") {
		t.Errorf("exit %d, stderr %s", code, stderr.String())
	}
	unlock()
	if unlock, err = lockRunDir(out); err != nil {
		t.Errorf("lock not released: %v", err)
	} else {
		unlock()
	}
}

func TestList(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--list", "--fstyp", "ext4"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	// The list prints each test with its reason; another filesystem's tests are left out.
	if !strings.Contains(stdout.String(), "generic/009  fallocate zero range") || strings.Contains(stdout.String(), "xfs/") {
		t.Errorf("ext4 list:\n%s", stdout.String())
	}
}

// The exit status follows the report's verdict, and the three reports are written.
func TestFinishExitStatus(t *testing.T) {
	for _, tc := range []struct {
		name string
		runs []xfstests.BackendRun
		want int
	}{
		{"clean", []xfstests.BackendRun{{Backend: "thinblk", Results: []xfstests.Result{{Test: "generic/001", Outcome: xfstests.Pass}, {Test: "generic/091", Outcome: xfstests.Fail, Expected: true}}}}, 0},
		{"unexpected", []xfstests.BackendRun{{Backend: "thinblk", Results: []xfstests.Result{{Test: "generic/001", Outcome: xfstests.Fail}}}}, 1},
		{"pool", []xfstests.BackendRun{{Backend: "thinblk", PoolCheck: "thinblk check: NOT clean"}}, 1},
		{"worse than qsd", []xfstests.BackendRun{
			{Backend: "thinblk", Results: []xfstests.Result{{Test: "generic/091", Outcome: xfstests.Fail, Expected: true}}},
			{Backend: "qsd", Results: []xfstests.Result{{Test: "generic/091", Outcome: xfstests.Pass}}}}, 1},
	} {
		dir := t.TempDir()
		rep := &xfstests.Report{FSTYP: "xfs", Runs: tc.runs}
		rep.Compare()
		var stdout, stderr bytes.Buffer
		if got := finish(rep, dir, &stdout, &stderr); got != tc.want {
			t.Errorf("%s: exit %d, want %d\n%s", tc.name, got, tc.want, stdout.String())
		}
		for _, f := range []string{"report.json", "junit.xml", "summary.txt"} {
			if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
		}
		var back xfstests.Report
		data, _ := os.ReadFile(filepath.Join(dir, "report.json"))
		if err := json.Unmarshal(data, &back); err != nil || len(back.Runs) != len(tc.runs) {
			t.Errorf("%s: report.json %v", tc.name, err)
		}
	}
}
