package xfstests

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Launcher starts xfstests' check on a list of tests, somewhere: a local process (tests of
// the runner itself) or a guest on thinblk or qemu-storage-daemon disks (VMLauncher).
type Launcher interface {
	// Start runs check on tests and streams its output to out as it comes. session counts
	// from 1; a new session starts after a hang with the tests left.
	Start(ctx context.Context, session int, tests []string, out io.Writer) (Session, error)
}

// Session is one running check.
type Session interface {
	// Wait returns when check has ended (for a guest: when the guest is down) and all its
	// output was written.
	Wait() error
	// Kill ends check at once (its process group, or the whole guest). Wait still returns.
	Kill()
}

// RunOptions configure Run.
type RunOptions struct {
	Backend string
	// Repeat is which repetition this run is (0: the only one); progress lines show it.
	Repeat int
	FSTYP  string
	Tests  []string
	// TestTimeout bounds one test; past it the session is killed, the test is reported
	// failed, and the run goes on with the tests left in a new session (StopOnHang: stops).
	TestTimeout time.Duration
	StopOnHang  bool
	// ResultBase is check's RESULT_BASE as seen on the host; failures' .out.bad, .full and
	// .dmesg are copied from there to OutDir/failures.
	ResultBase string
	OutDir     string
	Expected   map[string]ExpectedFailure
	// Progress gets one line per finished test; RawLog gets check's output verbatim.
	Progress, RawLog io.Writer
	// Now is the clock (nil: time.Now); tests pass a fake one.
	Now func() time.Time
	// WatchInterval is how often the hang watchdog looks (0: 1s).
	WatchInterval time.Duration
}

// syncParser serialises the launcher's writes and the watchdog's reads.
type syncParser struct {
	mu  sync.Mutex
	p   *Parser
	raw io.Writer
}

func (s *syncParser) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.raw != nil {
		_, _ = s.raw.Write(b)
	}
	return s.p.Write(b)
}

// Run runs o.Tests through l and returns what happened. It never panics on odd output and
// returns once every session has ended.
func Run(ctx context.Context, l Launcher, o RunOptions) BackendRun {
	now := o.Now
	if now == nil {
		now = time.Now
	}
	if o.WatchInterval == 0 {
		o.WatchInterval = time.Second
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	run := BackendRun{Backend: o.Backend, Repeat: o.Repeat, FSTYP: o.FSTYP, Started: now()}
	done := map[string]bool{}
	remaining := append([]string(nil), o.Tests...)
	for len(remaining) > 0 && ctx.Err() == nil {
		run.Sessions++
		var got []Result
		p := NewParser(now, func(r Result) {
			if done[r.Test] {
				return // check ran a test twice (cannot happen in one session): keep the first
			}
			if r.Outcome == Fail {
				if e, ok := o.Expected[r.Test]; ok {
					r.Expected, r.ExpectedReason = true, e.Reason
				}
			}
			done[r.Test] = true
			got = append(got, r)
			fmt.Fprintln(o.Progress, progressLine(run.Label(), r))
		})
		sp := &syncParser{p: p, raw: o.RawLog}
		sess, err := l.Start(ctx, run.Sessions, remaining, sp)
		if err != nil {
			run.Error = fmt.Sprintf("session %d: %v", run.Sessions, err)
			break
		}
		hung := watch(ctx, sess, sp, o.TestTimeout, o.WatchInterval, now)
		waitErr := sess.Wait()
		sp.mu.Lock()
		reason := "check ended before the test finished"
		if hung != "" {
			reason = fmt.Sprintf("timed out after %v: killed", o.TestTimeout)
		} else if ctx.Err() != nil {
			reason = "interrupted"
		} else if waitErr != nil {
			reason = fmt.Sprintf("check ended before the test finished: %v", waitErr)
		}
		p.Close(reason)
		for t, oc := range p.Summary() {
			// The closing summary is check's own verdict; it wins over a line we read as a pass.
			for i := range got {
				if got[i].Test == t && oc == Fail && got[i].Outcome == Pass {
					got[i].Outcome, got[i].Reason = Fail, "listed under Failures by check"
				}
			}
		}
		finished := p.Finished()
		sp.mu.Unlock()
		for i := range got {
			if got[i].Outcome == Fail {
				got[i].Files = copyFailureFiles(o.ResultBase, o.OutDir, got[i].Test)
			}
		}
		run.Results = append(run.Results, got...)
		var left []string
		for _, t := range remaining {
			if !done[t] {
				left = append(left, t)
			}
		}
		remaining = left
		if len(remaining) == 0 {
			break
		}
		switch {
		case hung != "" && o.StopOnHang:
			run.Error = fmt.Sprintf("stopped after %s hung; not run: %s", hung, strings.Join(remaining, " "))
			remaining = nil
		case hung == "" && (finished || len(got) == 0):
			// check ended on its own without running these (unknown names, or it died before
			// its first test): starting it again would do the same.
			msg := "check ended without running the test"
			if waitErr != nil {
				msg += ": " + waitErr.Error()
			}
			for _, t := range remaining {
				r := Result{Test: t, Outcome: Fail, Reason: msg}
				if e, ok := o.Expected[t]; ok {
					r.Expected, r.ExpectedReason = true, e.Reason
				}
				run.Results = append(run.Results, r)
				fmt.Fprintln(o.Progress, progressLine(run.Label(), r))
			}
			remaining = nil
		}
		// Otherwise (a hang, or a crash after some progress) a new session takes the rest.
	}
	if ctx.Err() != nil && run.Error == "" {
		run.Error = "interrupted: " + ctx.Err().Error()
	}
	run.Duration = now().Sub(run.Started)
	return run
}

// watch kills the session when a test runs past limit and returns that test's name; it
// returns "" when the session ended by itself.
func watch(ctx context.Context, sess Session, sp *syncParser, limit, every time.Duration, now func() time.Time) string {
	ended := make(chan struct{})
	var hung string
	go func() {
		_ = sess.Wait()
		close(ended)
	}()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ended:
			return hung
		case <-ctx.Done():
			sess.Kill()
			<-ended
			return ""
		case <-t.C:
		}
		if limit <= 0 || hung != "" {
			continue
		}
		sp.mu.Lock()
		name, since, ok := sp.p.Running()
		sp.mu.Unlock()
		if ok && now().Sub(since) > limit {
			hung = name
			sess.Kill()
		}
	}
}

func progressLine(label string, r Result) string {
	s := fmt.Sprintf("%-8s %-12s %-6s %5.0fs", label, r.Test, r.Outcome, r.Time.Seconds())
	switch {
	case r.Outcome == NotRun:
		s += "  " + r.Reason
	case r.Outcome == Fail && r.Expected:
		s += "  (expected: " + r.ExpectedReason + ")"
	case r.Outcome == Fail:
		s += "  " + r.Reason
	}
	return s
}

// copyFailureFiles copies a failed test's artefacts from check's result directory to
// outDir/failures and returns the copies' paths: its .out.bad, .full and .dmesg, and the
// files a test leaves beside them under its own name, such as fsx's operation logs
// (112.2.fsxops: what `fsx --replay-ops` replays) and their .full logs.
func copyFailureFiles(resultBase, outDir, test string) []string {
	if resultBase == "" || outDir == "" {
		return nil
	}
	var out []string
	srcs, _ := filepath.Glob(filepath.Join(resultBase, test+".*"))
	for _, src := range srcs {
		name := strings.TrimPrefix(src, filepath.Join(resultBase, test))
		if name == ".notrun" {
			continue
		}
		data, err := os.ReadFile(src)
		if err != nil {
			continue
		}
		dst := filepath.Join(outDir, "failures", test+name)
		if err := writeFile(dst, data); err == nil {
			out = append(out, dst)
		}
	}
	return out
}
