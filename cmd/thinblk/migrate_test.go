package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
)

// TestMigrateCLIErrors: the command's flags are checked before anything is
// touched, and an unreachable serve is a clear error. The migration itself
// is tested in package migrate (real serves and QEMUs) and guesttests.
func TestMigrateCLIErrors(t *testing.T) {
	dir := t.TempDir()
	full := []string{"migrate", "--from-thinblk", filepath.Join(dir, "a.sock"), "--from-qemu", "unix:" + filepath.Join(dir, "q.sock"),
		"--to-thinblk", filepath.Join(dir, "b.sock"), "--to-qemu", filepath.Join(dir, "q2.sock"), "--volume", "v",
		"--uri", "unix:" + filepath.Join(dir, "m.sock"), "--start-destination", "false", "--timeout", "2s"}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"migrate"}, 2, "usage"},
		{full[:len(full)-4], 2, "usage"}, // no --start-destination
		{append(append([]string{}, full...), "--max-delta", "lots"), 2, "--max-delta"},
		{append(append([]string{}, full...), "--to-qemu", "tcp:host:1"), 2, "--to-qemu"},
		{append(append([]string{}, full...), "--max-rounds", "0"), 2, "--max-rounds 0: must be at least 1"},
		{append(append([]string{}, full...), "--max-rounds", "-1"), 2, "--max-rounds -1"},
		{append(append([]string{}, full...), "--timeout", "0"), 2, "--timeout 0s: must be positive"},
		{full, 1, "source thinblk"},
	} {
		var out, errOut bytes.Buffer
		code := run(c.args, &out, &errOut)
		if code != c.code || !strings.Contains(strings.ToLower(errOut.String()), strings.ToLower(c.want)) {
			t.Errorf("thinblk %v: exit %d, want %d with %q:\n%s", c.args[1:], code, c.code, c.want, errOut.String())
		}
	}
}
