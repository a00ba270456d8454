package main

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/thinblk/thinblk/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// runOK runs the benchmark with args and returns its stdout and stderr, failing the test if
// the run fails.
func runOK(t *testing.T, args ...string) (stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	if err := run(args, &out, &errOut); err != nil {
		t.Fatalf("run: %v\n%s", err, errOut.String())
	}
	return out.String(), errOut.String()
}

// runJSON runs the benchmark with args and --json and decodes its output into doc; it
// returns what the run wrote to stderr.
func runJSON(t *testing.T, args []string, doc any) string {
	t.Helper()
	out, errOut := runOK(t, append(args[:len(args):len(args)], "--json")...)
	if err := json.Unmarshal([]byte(out), doc); err != nil {
		t.Fatalf("JSON output: %v\n%s", err, out)
	}
	return errOut
}
