package xfstests

import (
	"strings"
	"testing"
	"time"
)

// realOutput is shaped like upstream check's output (format of check in fstests 2025):
// names padded to the longest, the previous run's time "5s ... ", then the outcome.
const realOutput = `SECTION       -- xfs
FSTYP         -- xfs (non-debug)
PLATFORM      -- Linux/x86_64 guest 6.1.0-56-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1
MKFS_OPTIONS  -- -f /dev/vdb
MOUNT_OPTIONS -- /dev/vdb /mnt/scratch

generic/001 5s ...  4s
generic/002       [not run] this test requires a valid $SCRATCH_LOGDEV
generic/003 2s ... - output mismatch (see /r/generic/003.out.bad)
    --- tests/generic/003.out	2026-11-24 12:00:00
    +++ /r/generic/003.out.bad	2026-11-24 12:01:00
    @@ -1,2 +1,2 @@
     QA output created by 003
    -good
    +bad
    ...
    (Run 'diff -u /x/tests/generic/003.out /r/generic/003.out.bad'  to see the entire diff)
generic/005        [failed, exit status 1]- output mismatch (see /r/generic/005.out.bad)
    --- a
    +++ b
generic/006 3s ...  _check_dmesg: something found (see /r/generic/006.dmesg)

xfs/011 10s ...  12s
Ran: generic/001 generic/002 generic/003 generic/005 generic/006 xfs/011
Not run: generic/002
Failures: generic/003 generic/005 generic/006
Failed 3 of 6 tests

`

func parseAll(t *testing.T, text string, chunk int) ([]Result, *Parser) {
	t.Helper()
	var got []Result
	p := NewParser(nil, func(r Result) { got = append(got, r) })
	for i := 0; i < len(text); i += chunk {
		j := min(i+chunk, len(text))
		p.Write([]byte(text[i:j]))
	}
	p.Close("cut short")
	return got, p
}

func TestParseRealOutput(t *testing.T) {
	for _, chunk := range []int{1, 7, len(realOutput)} {
		got, p := parseAll(t, realOutput, chunk)
		want := []struct {
			test    string
			outcome Outcome
			reason  string
		}{
			{"generic/001", Pass, ""},
			{"generic/002", NotRun, "this test requires a valid $SCRATCH_LOGDEV"},
			{"generic/003", Fail, "generic/003 2s ... - output mismatch"},
			{"generic/005", Fail, "[failed, exit status 1]- output mismatch (see /r/generic/005.out.bad)"},
			{"generic/006", Fail, "3s ...  _check_dmesg: something found (see /r/generic/006.dmesg)"},
			{"xfs/011", Pass, ""},
		}
		if len(got) != len(want) {
			t.Fatalf("chunk %d: got %d results %+v, want %d", chunk, len(got), got, len(want))
		}
		for i, w := range want {
			g := got[i]
			if g.Test != w.test || g.Outcome != w.outcome {
				t.Errorf("chunk %d: result %d = %s %s, want %s %s", chunk, i, g.Test, g.Outcome, w.test, w.outcome)
			}
			if w.outcome == NotRun && g.Reason != w.reason {
				t.Errorf("chunk %d: %s reason %q, want %q", chunk, g.Test, g.Reason, w.reason)
			}
			if w.outcome == Fail && g.Reason == "" {
				t.Errorf("chunk %d: %s failed without a reason", chunk, g.Test)
			}
		}
		if got[0].Time != 4*time.Second || got[5].Time != 12*time.Second {
			t.Errorf("chunk %d: pass times %v, %v; want 4s and 12s (this run's, not the previous)", chunk, got[0].Time, got[5].Time)
		}
		if !strings.Contains(got[2].Output, "+bad") {
			t.Errorf("chunk %d: 003's output lacks the diff: %q", chunk, got[2].Output)
		}
		if !p.Finished() {
			t.Errorf("chunk %d: summary not seen", chunk)
		}
		if s := p.Summary(); s["generic/005"] != Fail || s["generic/002"] != NotRun {
			t.Errorf("chunk %d: summary %v", chunk, s)
		}
	}
}

// The watchdog needs the running test from the partial line check prints before the test.
func TestParseRunningAndCutShort(t *testing.T) {
	clock := time.Unix(1000, 0)
	var got []Result
	p := NewParser(func() time.Time { return clock }, func(r Result) { got = append(got, r) })
	p.Write([]byte("generic/001 5s ...  4s\ngeneric/004 "))
	name, since, ok := p.Running()
	if !ok || name != "generic/004" || !since.Equal(clock) {
		t.Fatalf("Running() = %q %v %v, want generic/004 since %v", name, since, ok, clock)
	}
	clock = clock.Add(90 * time.Second)
	p.Write([]byte("3s ... ")) // the previous run's time: still running
	if name, _, ok := p.Running(); !ok || name != "generic/004" {
		t.Fatalf("Running() after more of the line = %q %v", name, ok)
	}
	p.Close("timed out")
	if len(got) != 2 || got[1].Test != "generic/004" || got[1].Outcome != Fail || got[1].Reason != "timed out" || got[1].Time != 90*time.Second {
		t.Fatalf("results %+v", got)
	}
	if p.Finished() {
		t.Error("Finished without a summary")
	}
	if _, _, ok := p.Running(); ok {
		t.Error("still running after Close")
	}
}

func FuzzParser(f *testing.F) {
	f.Add(realOutput)
	f.Add("generic/001")
	f.Add("generic/001 [not run]\ngeneric/001 1s\n")
	f.Add("xfs/011 - output mismatch\n    diff\nFailures: xfs/011\n")
	f.Fuzz(func(t *testing.T, s string) {
		seen := map[string]int{}
		p := NewParser(nil, func(r Result) {
			seen[r.Test]++
			if r.Outcome != Pass && r.Outcome != Fail && r.Outcome != NotRun {
				t.Fatalf("outcome %q", r.Outcome)
			}
			if !testNameRE.MatchString(r.Test) {
				t.Fatalf("test name %q", r.Test)
			}
		})
		p.Write([]byte(s))
		p.Close("end")
		_ = p.Summary()
	})
}
