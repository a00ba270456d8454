package xfstests

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// BackendRun is the outcome of the selected tests on one back-end.
type BackendRun struct {
	Backend string `json:"backend"`
	// Repeat is which repetition of the tests this run was (from 1; 0 when not repeated).
	Repeat   int           `json:"repeat,omitempty"`
	FSTYP    string        `json:"fstyp"`
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration_ns"`
	Results  []Result      `json:"results"`
	// Sessions is how many times check was started (more than one after a hang).
	Sessions int `json:"sessions"`
	// PoolCheck is the pool's health after the run (thinblk back-end only): empty when clean.
	PoolCheck string `json:"pool_check,omitempty"`
	// Error is a run-level failure (boot failed, back-end died, ...).
	Error string `json:"error,omitempty"`
}

// Label names the run: the back-end, and "#N" for repetition N.
func (r *BackendRun) Label() string {
	if r.Repeat == 0 {
		return r.Backend
	}
	return fmt.Sprintf("%s#%d", r.Backend, r.Repeat)
}

// Counts returns pass, fail and notrun counts.
func (r *BackendRun) Counts() (pass, fail, notrun int) {
	for _, x := range r.Results {
		switch x.Outcome {
		case Pass:
			pass++
		case Fail:
			fail++
		case NotRun:
			notrun++
		}
	}
	return
}

// Unexpected returns the failures not listed as expected.
func (r *BackendRun) Unexpected() []Result {
	var out []Result
	for _, x := range r.Results {
		if x.Outcome == Fail && !x.Expected {
			out = append(out, x)
		}
	}
	return out
}

// OK reports whether the run counts as passed: no unexpected failure, a clean pool, no
// run-level error.
func (r *BackendRun) OK() bool {
	return len(r.Unexpected()) == 0 && r.PoolCheck == "" && r.Error == ""
}

// Difference is a test whose outcome differs between back-ends.
type Difference struct {
	Test     string             `json:"test"`
	Outcomes map[string]Outcome `json:"outcomes"`
}

// Report is everything one invocation produced.
type Report struct {
	FSTYP string   `json:"fstyp"`
	Tests []string `json:"tests"`
	// Repeat is how many times the tests ran on each back-end.
	Repeat      int          `json:"repeat,omitempty"`
	Runs        []BackendRun `json:"runs"`
	Differences []Difference `json:"differences,omitempty"`
	// Rates are each test's failures per back-end over the repetitions.
	Rates []Rate `json:"rates,omitempty"`
	// LeftOut names the repetitions an interrupt cut short (not in Runs or Rates).
	LeftOut []string `json:"left_out,omitempty"`
}

// Rate is how often one test failed on one back-end over the runs that ran it (a notrun
// counts in neither).
type Rate struct {
	Test        string  `json:"test"`
	Backend     string  `json:"backend"`
	Runs        int     `json:"runs"`
	Failures    int     `json:"failures"`
	FailureRate float64 `json:"failure_rate"`
	// FailedIn lists the repetitions (from 1) that failed.
	FailedIn []int `json:"failed_in,omitempty"`
}

// String is "3/10 fail (30%)".
func (r Rate) String() string {
	if r.Runs == 0 {
		return "not run"
	}
	return fmt.Sprintf("%d/%d fail (%.0f%%)", r.Failures, r.Runs, 100*r.FailureRate)
}

// OK reports whether every back-end's run passed and thinblk did no worse than the
// reference on any test.
func (r *Report) OK() bool {
	if len(r.LeftOut) > 0 {
		return false
	}
	for i := range r.Runs {
		if !r.Runs[i].OK() {
			return false
		}
	}
	for _, d := range r.Differences {
		if d.Outcomes["thinblk"] == Fail {
			return false
		}
	}
	return true
}

// backends returns the back-ends in the order they first ran.
func (r *Report) backends() []string {
	var out []string
	for _, run := range r.Runs {
		if !slices.Contains(out, run.Backend) {
			out = append(out, run.Backend)
		}
	}
	return out
}

// Compare fills Differences (every test whose outcome is not the same on all back-ends) and
// Rates. Over repetitions a back-end's outcome for a test is fail if any run failed it, else
// pass if any passed it, else notrun.
func (r *Report) Compare() {
	r.Differences, r.Rates = nil, nil
	outcomes := map[string]map[string]Outcome{}
	rates := map[string]map[string]*Rate{}
	var order []string
	for _, run := range r.Runs {
		for _, x := range run.Results {
			if outcomes[x.Test] == nil {
				outcomes[x.Test] = map[string]Outcome{}
				rates[x.Test] = map[string]*Rate{}
				order = append(order, x.Test)
			}
			o := outcomes[x.Test]
			if prev, ok := o[run.Backend]; !ok || x.Outcome == Fail || prev == NotRun {
				o[run.Backend] = x.Outcome
			}
			rt := rates[x.Test][run.Backend]
			if rt == nil {
				rt = &Rate{Test: x.Test, Backend: run.Backend}
				rates[x.Test][run.Backend] = rt
			}
			if x.Outcome == NotRun {
				continue
			}
			rt.Runs++
			if x.Outcome == Fail {
				rt.Failures++
				rt.FailedIn = append(rt.FailedIn, run.Repeat)
			}
		}
	}
	backends := r.backends()
	if r.Repeat > 1 {
		for _, t := range order {
			for _, b := range backends {
				rt := rates[t][b]
				if rt == nil {
					rt = &Rate{Test: t, Backend: b}
				}
				if rt.Runs > 0 {
					rt.FailureRate = float64(rt.Failures) / float64(rt.Runs)
				}
				r.Rates = append(r.Rates, *rt)
			}
		}
	}
	if len(backends) < 2 {
		return
	}
	for _, t := range order {
		o := outcomes[t]
		same := true
		for _, b := range backends {
			if o[b] != o[backends[0]] {
				same = false
			}
		}
		if !same {
			for _, b := range backends {
				if _, ok := o[b]; !ok {
					o[b] = "missing"
				}
			}
			r.Differences = append(r.Differences, Difference{Test: t, Outcomes: o})
		}
	}
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("report json: %w", err)
	}
	return writeFile(path, append(b, '\n'))
}

type junitSuites struct {
	XMLName xml.Name     `xml:"testsuites"`
	Suites  []junitSuite `xml:"testsuite"`
}

type junitSuite struct {
	Name     string      `xml:"name,attr"`
	Tests    int         `xml:"tests,attr"`
	Failures int         `xml:"failures,attr"`
	Skipped  int         `xml:"skipped,attr"`
	Errors   int         `xml:"errors,attr"`
	Time     string      `xml:"time,attr"`
	Cases    []junitCase `xml:"testcase"`
}

type junitCase struct {
	Name      string        `xml:"name,attr"`
	Classname string        `xml:"classname,attr"`
	Time      string        `xml:"time,attr"`
	Failure   *junitMessage `xml:"failure,omitempty"`
	Skipped   *junitMessage `xml:"skipped,omitempty"`
	SystemOut string        `xml:"system-out,omitempty"`
}

type junitMessage struct {
	Message string `xml:"message,attr"`
	Type    string `xml:"type,attr,omitempty"`
	Body    string `xml:",chardata"`
}

func secs(d time.Duration) string { return fmt.Sprintf("%.3f", d.Seconds()) }

// WriteJUnit writes one testsuite per back-end. Expected failures are reported as skipped
// (with the reason), so CI systems flag only what fails the run; a run-level error or an
// unclean pool is a failed pseudo-test.
func (r *Report) WriteJUnit(path string) error {
	var s junitSuites
	for _, run := range r.Runs {
		suite := junitSuite{Name: fmt.Sprintf("xfstests.%s.%s", run.FSTYP, run.Label()), Time: secs(run.Duration)}
		for _, x := range run.Results {
			c := junitCase{Name: x.Test, Classname: "xfstests." + run.FSTYP + "." + run.Backend, Time: secs(x.Time)}
			switch {
			case x.Outcome == NotRun:
				c.Skipped = &junitMessage{Message: x.Reason}
				suite.Skipped++
			case x.Outcome == Fail && x.Expected:
				c.Skipped = &junitMessage{Message: "expected failure: " + x.ExpectedReason}
				c.SystemOut = x.Output
				suite.Skipped++
			case x.Outcome == Fail:
				c.Failure = &junitMessage{Message: x.Reason, Type: "fail", Body: x.Output}
				suite.Failures++
			}
			suite.Cases = append(suite.Cases, c)
		}
		for _, extra := range []struct{ name, msg string }{{"run", run.Error}, {"pool-check", run.PoolCheck}} {
			if run.Backend != "thinblk" && extra.name == "pool-check" {
				continue
			}
			c := junitCase{Name: extra.name, Classname: "thinblk-xfstests." + run.Backend, Time: "0"}
			if extra.msg != "" {
				c.Failure = &junitMessage{Message: firstLine(extra.msg), Type: "error", Body: extra.msg}
				suite.Errors++
			}
			suite.Cases = append(suite.Cases, c)
		}
		suite.Tests = len(suite.Cases)
		s.Suites = append(s.Suites, suite)
	}
	b, err := xml.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("report junit: %w", err)
	}
	return writeFile(path, append([]byte(xml.Header), append(b, '\n')...))
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

func writeFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// WriteTable prints the terminal summary: one row per test, one column per back-end (its
// outcome, or when repeated its failure rate), then each run's counts, differences and the
// verdict.
func (r *Report) WriteTable(w io.Writer) {
	if r.Repeat > 1 {
		r.writeRates(w)
	} else {
		r.writeOutcomes(w)
	}
	for i := range r.Runs {
		run := &r.Runs[i]
		label := run.Label()
		p, f, n := run.Counts()
		fmt.Fprintf(w, "%s: %d pass, %d fail (%d unexpected), %d notrun in %s, %d check session(s)\n",
			label, p, f, len(run.Unexpected()), n, run.Duration.Round(time.Second), run.Sessions)
		if run.Error != "" {
			fmt.Fprintf(w, "%s: run error: %s\n", label, run.Error)
		}
		if run.PoolCheck != "" {
			fmt.Fprintf(w, "%s: pool check FAILED: %s\n", label, run.PoolCheck)
		}
		for _, x := range run.Unexpected() {
			fmt.Fprintf(w, "%s: unexpected failure %s: %s\n", label, x.Test, x.Reason)
		}
	}
	if len(r.Differences) > 0 {
		fmt.Fprintln(w, "outcomes that differ between back-ends:")
		for _, d := range r.Differences {
			keys := make([]string, 0, len(d.Outcomes))
			for k := range d.Outcomes {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			var parts []string
			for _, k := range keys {
				parts = append(parts, k+"="+string(d.Outcomes[k]))
			}
			fmt.Fprintf(w, "  %s: %s\n", d.Test, strings.Join(parts, " "))
		}
	}
	if r.OK() {
		fmt.Fprintln(w, "RESULT: OK")
	} else {
		fmt.Fprintln(w, "RESULT: FAILED")
	}
}

// writeRates prints one row per test, one column per back-end: its failures over the
// repetitions, and which repetitions failed.
func (r *Report) writeRates(w io.Writer) {
	backends := r.backends()
	fmt.Fprintf(w, "failure rates over %d repetitions:\n", r.Repeat)
	if len(r.LeftOut) > 0 {
		fmt.Fprintf(w, "interrupted, left out: %s\n", strings.Join(r.LeftOut, " "))
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprint(tw, "TEST")
	for _, b := range backends {
		fmt.Fprintf(tw, "\t%s", strings.ToUpper(b))
	}
	fmt.Fprintln(tw)
	for i := 0; i < len(r.Rates); i += len(backends) {
		fmt.Fprint(tw, r.Rates[i].Test)
		for _, rt := range r.Rates[i : i+len(backends)] {
			cell := rt.String()
			if len(rt.FailedIn) > 0 {
				runs := make([]string, len(rt.FailedIn))
				for j, n := range rt.FailedIn {
					runs[j] = fmt.Sprint("#", n)
				}
				cell += " " + strings.Join(runs, ",")
			}
			fmt.Fprintf(tw, "\t%s", cell)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}

// writeOutcomes prints one row per test, one column per run: outcome and seconds.
func (r *Report) writeOutcomes(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprint(tw, "TEST")
	for _, run := range r.Runs {
		fmt.Fprintf(tw, "\t%s", strings.ToUpper(run.Backend))
	}
	fmt.Fprintln(tw)
	byTest := make([]map[string]Result, len(r.Runs))
	var order []string
	seen := map[string]bool{}
	for i, run := range r.Runs {
		byTest[i] = map[string]Result{}
		for _, x := range run.Results {
			byTest[i][x.Test] = x
			if !seen[x.Test] {
				seen[x.Test] = true
				order = append(order, x.Test)
			}
		}
	}
	for _, t := range order {
		fmt.Fprint(tw, t)
		for i := range r.Runs {
			x, ok := byTest[i][t]
			cell := "-"
			if ok {
				cell = fmt.Sprintf("%s %.0fs", x.Outcome, x.Time.Seconds())
				if x.Expected {
					cell += " (expected)"
				}
			}
			fmt.Fprintf(tw, "\t%s", cell)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}
