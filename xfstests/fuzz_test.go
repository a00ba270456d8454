package xfstests

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

// wholeTestName is a test name and nothing else.
var wholeTestName = regexp.MustCompile(`^[a-z0-9_-]+/[0-9]{3,4}$`)

// FuzzLists: the list and expected-failure parsers take any text without panicking; every
// entry they accept has a test name, a reason (and evidence), and written back in the
// files' format parses to the same entries.
func FuzzLists(f *testing.F) {
	for _, s := range []string{
		"# comment\ngeneric/001 basic I/O\nxfs/011 log recovery\n",
		"generic/091  fsx mismatch | evidence: fails on qsd too\n",
		"generic/001\n", "generic/001\tx y\n", "generic/001 a\ngeneric/001 b\n",
		"Generic/1 x\n", "generic/0001 r | evidence:\n", "generic/002 r | evidence: a | evidence: b\n",
		"\xff\xfe\n", strings.Repeat("a", 70000) + "\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if l, err := ParseList(strings.NewReader(s)); err == nil {
			var b strings.Builder
			for _, e := range l {
				if !wholeTestName.MatchString(e.Test) || e.Reason == "" || e.Reason != strings.TrimSpace(e.Reason) {
					t.Fatalf("list entry %q accepted", e)
				}
				fmt.Fprintf(&b, "%s %s\n", e.Test, e.Reason)
			}
			if again, err := ParseList(strings.NewReader(b.String())); err != nil || !reflect.DeepEqual(again, l) {
				t.Fatalf("list %q written back as %q reads %q (%v)", l, b.String(), again, err)
			}
		} else if err.Error() == "" {
			t.Fatal("empty error")
		}
		if m, err := ParseExpected(strings.NewReader(s)); err == nil {
			var b strings.Builder
			for test, e := range m {
				if test != e.Test || !wholeTestName.MatchString(e.Test) || e.Reason == "" || e.Evidence == "" {
					t.Fatalf("expected failure %q accepted", e)
				}
				fmt.Fprintf(&b, "%s %s | evidence: %s\n", e.Test, e.Reason, e.Evidence)
			}
			if again, err := ParseExpected(strings.NewReader(b.String())); err != nil || !reflect.DeepEqual(again, m) {
				t.Fatalf("expected failures %q written back as %q read %q (%v)", m, b.String(), again, err)
			}
		} else if err.Error() == "" {
			t.Fatal("empty error")
		}
	})
}

// FuzzReport: whatever check prints in the guest (hostile: any bytes) ends in a JSON report
// and a JUnit file that parse back, with a test case per result.
func FuzzReport(f *testing.F) {
	f.Add(realOutput)
	f.Add("generic/001 - output mismatch\n    \x00\x1b[31m\xff\xfe]]>&<\"\n")
	f.Add("generic/002 [not run] \x07 <x>\n")
	f.Fuzz(func(t *testing.T, s string) {
		var results []Result
		p := NewParser(func() time.Time { return time.Unix(0, 0) }, func(r Result) { results = append(results, r) })
		p.Write([]byte(s))
		p.Close("the guest died: " + s)
		rep := &Report{FSTYP: "xfs", Runs: []BackendRun{
			{Backend: "thinblk", FSTYP: "xfs", Results: results, Error: s, PoolCheck: s},
			{Backend: "qsd", FSTYP: "xfs", Results: results},
		}}
		rep.Compare()
		dir := t.TempDir()
		if err := rep.WriteJSON(filepath.Join(dir, "r.json")); err != nil {
			t.Fatal(err)
		}
		if err := rep.WriteJUnit(filepath.Join(dir, "r.xml")); err != nil {
			t.Fatal(err)
		}
		var back Report
		if b, err := os.ReadFile(filepath.Join(dir, "r.json")); err != nil || json.Unmarshal(b, &back) != nil || len(back.Runs[0].Results) != len(results) {
			t.Fatalf("JSON report does not read back: %v\n%s", err, b)
		}
		var ju junitSuites
		b, err := os.ReadFile(filepath.Join(dir, "r.xml"))
		if err == nil {
			err = xml.Unmarshal(b, &ju)
		}
		if err != nil || len(ju.Suites) != 2 || len(ju.Suites[1].Cases) != len(results)+1 { // and the "run" pseudo-test
			t.Fatalf("JUnit report does not read back (%v):\n%s", err, b)
		}
		rep.WriteTable(new(strings.Builder))
	})
}
