package xfstests

import (
	"bufio"
	"embed"
	"fmt"
	"io"
	"os"
	"strings"
	"unicode"
)

//go:embed lists/default.txt expected/*.txt
var builtin embed.FS

// ListEntry is one test of a curated list, with the reason it is there.
type ListEntry struct {
	Test, Reason string
}

// DefaultList returns the curated default set for fstyp: generic/ and shared/ tests and
// those of fstyp's own directory.
func DefaultList(fstyp string) ([]ListEntry, error) {
	f, err := builtin.Open("lists/default.txt")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	all, err := ParseList(f)
	if err != nil {
		return nil, fmt.Errorf("default list: %w", err)
	}
	var out []ListEntry
	for _, e := range all {
		if AppliesTo(e.Test, fstyp) {
			out = append(out, e)
		}
	}
	return out, nil
}

// AppliesTo reports whether test belongs to the tests run for fstyp.
func AppliesTo(test, fstyp string) bool {
	dir, _, _ := strings.Cut(test, "/")
	return dir == "generic" || dir == "shared" || dir == fstyp
}

// ParseList reads "TEST reason" lines; '#' starts a comment line. Every test needs a reason.
func ParseList(r io.Reader) ([]ListEntry, error) {
	var out []ListEntry
	seen := map[string]bool{}
	err := eachLine(r, func(n int, test, reason string) error {
		reason = strings.TrimSpace(reason)
		if reason == "" {
			return fmt.Errorf("line %d: %s has no reason", n, test)
		}
		if seen[test] {
			return fmt.Errorf("line %d: %s listed twice", n, test)
		}
		seen[test] = true
		out = append(out, ListEntry{Test: test, Reason: reason})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// eachLine calls fn with each entry line's number, test name and the rest of the line,
// skipping blank and comment ('#') lines; a line that does not start with a test name and a
// blank is an error.
func eachLine(r io.Reader, fn func(n int, test, rest string) error) error {
	sc := bufio.NewScanner(r)
	n := 1
	for ; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		test, rest := line, ""
		if i := strings.IndexFunc(line, unicode.IsSpace); i >= 0 {
			test, rest = line[:i], line[i:]
		}
		if m := testNameRE.FindStringSubmatch(test); m == nil || m[1] != test {
			return fmt.Errorf("line %d: %q is not a test name", n, test)
		}
		if err := fn(n, test, rest); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("line %d: %w", n, err)
	}
	return nil
}

// ExpectedFailure is a test that fails for a reason outside thinblk, with the evidence.
type ExpectedFailure struct {
	Test, Reason, Evidence string
}

// ParseExpected reads "TEST reason | evidence: text" lines. Both parts are required: an
// entry without evidence that the failure is not thinblk's is refused.
func ParseExpected(r io.Reader) (map[string]ExpectedFailure, error) {
	out := map[string]ExpectedFailure{}
	err := eachLine(r, func(n int, test, rest string) error {
		reason, evidence, ok := strings.Cut(rest, "| evidence:")
		reason, evidence = strings.TrimSpace(reason), strings.TrimSpace(evidence)
		if !ok || reason == "" || evidence == "" {
			return fmt.Errorf("line %d: %s: want \"TEST reason | evidence: ...\"", n, test)
		}
		if _, dup := out[test]; dup {
			return fmt.Errorf("line %d: %s listed twice", n, test)
		}
		out[test] = ExpectedFailure{Test: test, Reason: reason, Evidence: evidence}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// LoadExpected reads the expected failures for fstyp: from path when set, else the file
// kept in the repository (xfstests/expected/FSTYP.txt).
func LoadExpected(fstyp, path string) (map[string]ExpectedFailure, error) {
	var r io.ReadCloser
	var err error
	if path != "" {
		r, err = os.Open(path)
	} else {
		r, err = builtin.Open("expected/" + fstyp + ".txt")
	}
	if err != nil {
		return nil, fmt.Errorf("expected failures for %s: %w", fstyp, err)
	}
	defer r.Close()
	m, err := ParseExpected(r)
	if err != nil {
		return nil, fmt.Errorf("expected failures for %s: %w", fstyp, err)
	}
	return m, nil
}
