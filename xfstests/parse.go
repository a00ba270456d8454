package xfstests

import (
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Outcome is what became of one test.
type Outcome string

const (
	Pass   Outcome = "pass"
	Fail   Outcome = "fail"
	NotRun Outcome = "notrun"
)

// Result is one test's outcome as the runner saw it.
type Result struct {
	Test    string        `json:"test"`
	Outcome Outcome       `json:"outcome"`
	Time    time.Duration `json:"time_ns"`
	// Reason: xfstests' not-run reason, or a short failure description (first line of the
	// failure text, "timed out after ...", "guest crashed").
	Reason string `json:"reason,omitempty"`
	// Output is check's text for this test after its name line (diff excerpts, dmesg notes).
	Output string `json:"output,omitempty"`
	// Expected is set when the failure is listed in the expected-failures file.
	Expected       bool   `json:"expected,omitempty"`
	ExpectedReason string `json:"expected_reason,omitempty"`
	// Files are the copies of the failure's .out.bad, .full and .dmesg under the run directory.
	Files []string `json:"files,omitempty"`
}

// testNameRE matches xfstests' test names as check prints them at the start of a line
// (generic/001, xfs/011, ext4/045, shared/298).
var testNameRE = regexp.MustCompile(`^([a-z0-9_-]+/[0-9]{3,4})(\s|$)`)

// passTimeRE matches the end of a passing test's line: " 12s" (check prints the elapsed
// seconds only when the output matched and no post-test check failed).
var passTimeRE = regexp.MustCompile(`\s([0-9]+)s$`)

// failMarkers are the strings check prints for a failed test (output mismatch, non-zero
// exit, post-test fs or dmesg check, core dump, missing golden output).
var failMarkers = []string{"- output mismatch", "[failed, exit status", "_check_", "[dumped core]", "no qualified output", "- no such test?"}

// Parser turns check's output stream into results as each test finishes. It takes bytes as
// they arrive (partial lines too), so the test that is running right now is known before its
// line ends; that is what the runner's hang watchdog needs.
type Parser struct {
	now func() time.Time
	// OnResult is called once per finished test, in order.
	OnResult func(Result)

	partial  string
	cur      *block
	summary  map[string]Outcome // from the closing "Failures:" / "Not run:" lines
	finished bool               // a summary line was seen: check ended normally
}

type block struct {
	name    string
	started time.Time
	lines   []string // the first is the test's own line, without the name
	closed  bool     // a single-line outcome (pass, not run) is already complete
}

// NewParser returns a parser; now may be nil (time.Now).
func NewParser(now func() time.Time, onResult func(Result)) *Parser {
	if now == nil {
		now = time.Now
	}
	return &Parser{now: now, OnResult: onResult, summary: map[string]Outcome{}}
}

// Write feeds check's output; it never fails.
func (p *Parser) Write(b []byte) (int, error) {
	data := p.partial + string(b)
	for {
		i := strings.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		p.line(strings.TrimRight(data[:i], "\r"))
		data = data[i+1:]
	}
	p.partial = data
	// check prints a test's name before running it, without a newline: the test has started.
	if m := testNameRE.FindStringSubmatch(p.partial); m != nil && (p.cur == nil || p.cur.name != m[1] || p.cur.closed) {
		if p.cur == nil || p.cur.name != m[1] {
			p.startBlock(m[1])
		}
	}
	return len(b), nil
}

// Running returns the test now running and since when (as the parser first saw its name).
func (p *Parser) Running() (string, time.Time, bool) {
	if p.cur == nil || p.cur.closed {
		return "", time.Time{}, false
	}
	return p.cur.name, p.cur.started, true
}

// Summary returns the outcomes check's closing lines list ("Failures:", "Not run:").
func (p *Parser) Summary() map[string]Outcome { return p.summary }

// Finished reports whether check printed its closing summary.
func (p *Parser) Finished() bool { return p.finished }

func (p *Parser) startBlock(name string) {
	p.flush()
	p.cur = &block{name: name, started: p.now()}
}

func (p *Parser) line(l string) {
	if m := testNameRE.FindStringSubmatch(l); m != nil {
		if p.cur == nil || p.cur.name != m[1] || p.cur.closed {
			p.startBlock(m[1])
		}
		rest := strings.TrimSpace(l[len(m[1]):])
		p.cur.lines = append(p.cur.lines, rest)
		// Pass and not-run lines are complete at their newline; a failure may go on with a diff.
		if strings.Contains(rest, "[not run]") || (passTimeRE.MatchString(" "+rest) && !hasFailMarker(rest)) || strings.Contains(rest, "[expunged]") {
			p.emit()
		}
		return
	}
	switch {
	case strings.HasPrefix(l, "Ran:"):
		p.flush()
		p.finished = true
		return
	case strings.HasPrefix(l, "Not run:"):
		p.summaryList(strings.TrimPrefix(l, "Not run:"), NotRun)
		return
	case strings.HasPrefix(l, "Failures:"):
		p.summaryList(strings.TrimPrefix(l, "Failures:"), Fail)
		return
	case strings.HasPrefix(l, "Failed ") && strings.Contains(l, " tests"), strings.HasPrefix(l, "Passed all "):
		p.flush()
		p.finished = true
		return
	case strings.HasPrefix(l, "SECTION "):
		p.flush()
		return
	}
	if p.cur != nil && !p.cur.closed {
		p.cur.lines = append(p.cur.lines, l)
	}
}

// summaryList takes a summary line that lists the tests with an outcome
// (Not run:, Failures:): it ends the current test and the run.
func (p *Parser) summaryList(tests string, outcome Outcome) {
	p.flush()
	for _, t := range strings.Fields(tests) {
		p.summary[t] = outcome
	}
	p.finished = true
}

// flush ends the current test at the start of the next one (or at the summary).
func (p *Parser) flush() {
	if p.cur != nil && !p.cur.closed {
		p.emit()
	}
}

// Close ends the stream. A test still open that shows no outcome was cut short (the
// process was killed or the guest died): it is reported as failed with reason.
func (p *Parser) Close(reason string) {
	if p.partial != "" {
		l := p.partial
		p.partial = ""
		p.line(l)
	}
	if p.cur != nil && !p.cur.closed {
		r := classify(p.cur, p.now())
		if r.Outcome == "" {
			r.Outcome, r.Reason = Fail, reason
		}
		p.cur.closed = true
		if p.OnResult != nil {
			p.OnResult(r)
		}
	}
}

func (p *Parser) emit() {
	r := classify(p.cur, p.now())
	p.cur.closed = true
	if r.Outcome == "" {
		// Neither pass nor a failure marker (e.g. check was interrupted mid-test): a failure.
		r.Outcome, r.Reason = Fail, "no outcome printed"
	}
	if r.Outcome == "skip" {
		return // expunged: not run by request
	}
	if p.OnResult != nil {
		p.OnResult(r)
	}
}

func hasFailMarker(s string) bool {
	for _, m := range failMarkers {
		if strings.Contains(s, m) {
			return true
		}
	}
	return false
}

// classify reads one test's block. An empty Outcome means no outcome was printed yet.
func classify(b *block, now time.Time) Result {
	r := Result{Test: b.name, Time: now.Sub(b.started)}
	first := ""
	if len(b.lines) > 0 {
		first = b.lines[0]
	}
	all := strings.Join(b.lines, "\n")
	switch {
	case strings.Contains(first, "[expunged]"):
		r.Outcome = "skip"
	case strings.Contains(first, "[not run]"):
		r.Outcome = NotRun
		_, reason, _ := strings.Cut(first, "[not run]")
		r.Reason = strings.TrimSpace(reason)
	case hasFailMarker(all):
		r.Outcome = Fail
		for _, l := range b.lines {
			if hasFailMarker(l) {
				r.Reason = strings.TrimSpace(l)
				break
			}
		}
		r.Output = strings.TrimSpace(all)
	default:
		if m := passTimeRE.FindStringSubmatch(" " + first); m != nil {
			secs, _ := strconv.Atoi(m[1])
			r.Outcome = Pass
			r.Time = time.Duration(secs) * time.Second
		}
	}
	return r
}
