package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
)

// Careless and hostile input to the commands, as a new user types it: each
// must end in a clear error naming what is wrong and a non-zero exit, never
// a panic, a hang or a changed pool.

// runBinary runs the built thinblk with args and returns its output and exit
// status; it fails the test if the command does not end within a minute.
func runBinary(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, buildThinblk(t), args...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("thinblk %s did not end within a minute\n%s", strings.Join(args, " "), errOut.String())
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// wantError wants a non-zero exit whose error, the last line on stderr
// (serve logs before it), holds every one of words, and no Go panic.
func wantError(t *testing.T, stderr string, code int, words ...string) {
	t.Helper()
	if code == 0 {
		t.Errorf("exit 0, want an error; stderr %q", stderr)
	}
	if strings.Contains(stderr, "goroutine ") || strings.Contains(stderr, "panic:") {
		t.Fatalf("panic:\n%s", stderr)
	}
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	last := lines[len(lines)-1]
	for _, w := range words {
		if !strings.Contains(last, w) {
			t.Errorf("error %q does not say %q", last, w)
		}
	}
}

func TestServeSocketPathErrors(t *testing.T) {
	dir := t.TempDir()
	img := newImage(t, dir, 1<<20)
	long := filepath.Join(dir, strings.Repeat("d", 120), "disk.sock")
	if err := os.MkdirAll(filepath.Dir(long), 0o755); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := runBinary(t, "serve", "--raw", img, "--socket", long)
	wantError(t, errOut, code, long, "at most 107")

	missing := filepath.Join(dir, "nodir", "disk.sock")
	_, errOut, code = runBinary(t, "serve", "--raw", img, "--socket", missing)
	wantError(t, errOut, code, filepath.Join(dir, "nodir")+" does not exist")
	if _, err := os.Stat(filepath.Dir(missing)); !os.IsNotExist(err) {
		t.Errorf("serve made the socket's directory: %v", err)
	}

	pool := filepath.Join(dir, "pool")
	mustThinblk(t, "pool", "create", pool, "--size", "1M")
	mustThinblk(t, "volume", "create", pool, "vm1", "--size", "1M")
	_, errOut, code = runBinary(t, "serve", pool, "--qmp", "unix:"+long)
	wantError(t, errOut, code, "control socket", "at most 107")
	_, errOut, code = runBinary(t, "serve", pool, "--socket-dir", filepath.Dir(long))
	wantError(t, errOut, code, "vm1", "at most 107")
}

func TestPoolCreateFailureLeavesNothing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	// Refused after the directory and the lock were made: a data device that is none.
	_, errOut, code := runBinary(t, "pool", "create", dir, "--size", "1M", "--data-device", "/nonexistent-device")
	wantError(t, errOut, code, "data device", "/nonexistent-device", "no such file")
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(dir)
		t.Errorf("a failed pool create left %s behind (%v, %d entries)", dir, err, len(entries))
	}
	// A directory that was there stays, as empty as it was.
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = runBinary(t, "pool", "create", dir, "--size", "1M", "--data-device", "/dev/null")
	wantError(t, errOut, code, "data device /dev/null is not a block device")
	if strings.Contains(errOut, "<nil>") {
		t.Errorf("error with a <nil> in it: %q", errOut)
	}
	if entries, err := os.ReadDir(dir); err != nil || len(entries) != 0 {
		t.Errorf("a failed pool create in an existing directory left %v (%v)", entries, err)
	}
	// And the same command with good arguments works.
	mustThinblk(t, "pool", "create", dir, "--size", "1M")
}

func TestSizeAndPathErrorsSayWhatIsWrong(t *testing.T) {
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "1M")
	mustThinblk(t, "volume", "create", dir, "vm1", "--size", "1M")
	for _, c := range []struct {
		args  []string
		words []string
	}{
		// 16383P is a multiple of 512, only too large.
		{[]string{"volume", "create", dir, "big", "--size", "16383P"}, []string{"big", "larger than the largest"}},
		{[]string{"volume", "resize", dir, "vm1", "--size", "16383P"}, []string{"vm1", "larger than the largest"}},
		{[]string{"pool", "grow", dir, "--size", "16383P"}, []string{"larger than the largest"}},
		{[]string{"pool", "create", filepath.Join(tmp, "p2"), "--size", "16383P"}, []string{"larger than the largest"}},
	} {
		_, errOut, code := runBinary(t, c.args...)
		wantError(t, errOut, code, c.words...)
	}
	file := filepath.Join(tmp, "afile")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := runBinary(t, "status", file)
	wantError(t, errOut, code, file, "not a directory")
	if out := mustThinblk(t, "volume", "list", dir); out != "vm1\t1048576\n" {
		t.Errorf("volume list after the refused commands: %q", out)
	}
}

func TestVolumeNameErrorsNameTheCharacter(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "1M")
	for name, words := range map[string][]string{
		"disk-é":       {`"disk-é"`, `"é"`},
		"a b":          {`" "`},
		"vm/1":         {`'/'`},
		"..":           {"reserved"},
		"x\xffy":       {`"\xff"`},
		"":             {"empty"},
		"日本":           {`"日"`},
		"tab\there":    {`"\t"`},
		"semi;colon":   {`";"`},
		"quote'single": {`"'"`},
	} {
		_, errOut, code := runBinary(t, "volume", "create", dir, name, "--size", "1M")
		wantError(t, errOut, code, words...)
	}
	if out := mustThinblk(t, "volume", "list", dir); out != "" {
		t.Errorf("volumes after refused names: %q", out)
	}
}

// A volume whose socket would be serve's own control socket (a volume
// called "qmp" in the pool directory), or whose socket path is too long for
// a unix socket, cannot be served: serve says so at start, and a running
// serve refuses to create one.
func TestVolumeSocketCannotBeServed(t *testing.T) {
	bin := buildThinblk(t)
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "1M")
	mustThinblk(t, "volume", "create", dir, "vm1", "--size", "1M")
	mustThinblk(t, "volume", "create", dir, "qmp", "--size", "1M")
	_, errOut, code := runBinary(t, "serve", dir)
	wantError(t, errOut, code, "volume qmp", filepath.Join(dir, "qmp.sock"), "control socket")
	// Elsewhere the control socket and the volume's do not meet.
	cmd, logs := startServe(t, bin, dir, "--socket-dir", filepath.Join(t.TempDir(), "run"))
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))
	stopServe(t, cmd, logs)
	mustThinblk(t, "volume", "delete", dir, "qmp")

	cmd, logs = startServe(t, bin, dir)
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))
	waitForSocket(t, filepath.Join(dir, "vm1.sock"))
	long := strings.Repeat("n", 120)
	for _, c := range []struct {
		args  []string
		words []string
	}{
		{[]string{"volume", "create", dir, "qmp", "--size", "1M"}, []string{"volume qmp", "control socket"}},
		{[]string{"snapshot", "create", dir, "vm1", "qmp"}, []string{"volume qmp", "control socket"}},
		{[]string{"volume", "create", dir, long, "--size", "1M"}, []string{long, "at most 107"}},
		{[]string{"snapshot", "create", dir, "vm1", "ok", "vm1", long}, []string{long, "at most 107"}},
	} {
		_, errOut, code := runBinary(t, c.args...)
		wantError(t, errOut, code, c.words...)
	}
	if out := mustThinblk(t, "volume", "list", dir); out != "vm1\t1048576\n" {
		t.Errorf("volumes after the refused creates: %q", out)
	}
	// The control socket still answers, and serve still serves.
	mustThinblk(t, "volume", "create", dir, "vm2", "--size", "1M")
	waitForSocket(t, filepath.Join(dir, "vm2.sock"))
	stopServe(t, cmd, logs)
	if strings.Contains(logs.String(), "cannot export") {
		t.Errorf("serve made a volume it could not export:\n%s", logs)
	}
}

func TestArgumentCountErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "1M")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"volume", "delete", dir}, "thinblk volume delete: missing arguments (1 given, 2 wanted)"},
		{[]string{"volume", "delete", dir, "a", "b"}, `thinblk volume delete: unexpected argument "b"`},
		{[]string{"status", dir, "extra"}, `thinblk status: unexpected argument "extra"`},
		{[]string{"check"}, "thinblk check: missing arguments (0 given, 1 wanted)"},
		{[]string{"snapshot", "list"}, "thinblk snapshot list: missing arguments (0 given, 1 wanted)"},
		{[]string{"volume", "create", dir, "--size", "1M"}, "thinblk volume create: missing arguments (1 given, 2 wanted)"},
		{[]string{"volume", "create", dir, "v"}, "thinblk volume create: --size is required"},
		{[]string{"pool", "create", dir + "2"}, "thinblk pool create: --size is required"},
		{[]string{"pool", "grow", dir, "x", "--size", "2M"}, `thinblk pool grow: unexpected argument "x"`},
	} {
		_, errOut, code := runBinary(t, c.args...)
		if first, _, _ := strings.Cut(errOut, "\n"); code != 2 || first != c.want {
			t.Errorf("thinblk %s: exit %d, first line %q, want exit 2 and %q", strings.Join(c.args, " "), code, first, c.want)
		}
		if !strings.Contains(errOut, "usage: thinblk ") {
			t.Errorf("thinblk %s: no usage after the error:\n%s", strings.Join(c.args, " "), errOut)
		}
	}
}

func TestHelpOfCommandsWithoutFlags(t *testing.T) {
	for _, args := range [][]string{{"volume", "list"}, {"snapshot", "list"}, {"volume", "reserve"}} {
		out, errOut, code := runBinary(t, append(args, "--help")...)
		help := out + errOut
		if code != 0 || !strings.HasPrefix(help, "usage: thinblk "+strings.Join(args, " ")) || strings.Contains(help, "flags:") {
			t.Errorf("thinblk %s --help: exit %d, %q; want the usage line without an empty flags heading", strings.Join(args, " "), code, help)
		}
	}
}

// Deleting a volume or snapshot a VM is connected to is refused (the pool
// unchanged, the VM's I/O going on) unless forced, as qemu-storage-daemon
// refuses block-export-del of an export in use.
func TestDeleteVolumeInUse(t *testing.T) {
	bin := buildThinblk(t)
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "4M")
	mustThinblk(t, "volume", "create", dir, "vm1", "--size", "1M")
	cmd, logs := startServe(t, bin, dir)
	waitForSocket(t, filepath.Join(dir, "qmp.sock"))
	waitForSocket(t, filepath.Join(dir, "vm1.sock"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	disk, err := frontend.Dial(ctx, filepath.Join(dir, "vm1.sock"), frontend.Options{})
	if err != nil {
		t.Fatalf("dial: %v\n%s", err, logs)
	}
	defer disk.Close()
	data := bytes.Repeat([]byte("thinblk!"), 8<<10)
	if _, err := disk.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	mustThinblk(t, "snapshot", "create", dir, "vm1", "snap1")
	waitForSocket(t, filepath.Join(dir, "snap1.sock"))
	snap, err := frontend.Dial(ctx, filepath.Join(dir, "snap1.sock"), frontend.Options{})
	if err != nil {
		t.Fatalf("dial snapshot: %v\n%s", err, logs)
	}

	_, errOut, code := runBinary(t, "volume", "delete", dir, "vm1")
	wantError(t, errOut, code, "volume vm1 is in use", filepath.Join(dir, "vm1.sock"), "force")
	_, errOut, code = runBinary(t, "snapshot", "delete", dir, "snap1")
	wantError(t, errOut, code, "volume snap1 is in use", "force")
	if out := mustThinblk(t, "volume", "list", dir); out != "snap1\t1048576\nvm1\t1048576\n" {
		t.Errorf("volumes after the refused deletes: %q", out)
	}
	got := make([]byte, len(data))
	if _, err := disk.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the VM's disk after a refused delete: %v, data equal %v", err, bytes.Equal(got, data))
	}
	// Forced, the snapshot goes while its front-end is connected.
	mustThinblk(t, "snapshot", "delete", dir, "snap1", "--force")
	snap.Close()
	// Once the VM has gone the delete needs no force.
	disk.Close()
	mustThinblk(t, "volume", "delete", dir, "vm1")
	if out := mustThinblk(t, "volume", "list", dir); out != "" {
		t.Errorf("volumes after the deletes: %q", out)
	}
	stopServe(t, cmd, logs)
	if out := mustThinblk(t, "check", dir, "--quiet"); !strings.Contains(out, "clean") {
		t.Errorf("check: %q", out)
	}
}

func TestPoolCreateBlockSizeZero(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	_, errOut, code := runBinary(t, "pool", "create", dir, "--size", "1M", "--block-size", "0")
	wantError(t, errOut, code, `--block-size "0"`)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("a refused pool create made %s (%v)", dir, err)
	}
}

func TestSnapshotGroupNameTwice(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "1M")
	mustThinblk(t, "volume", "create", dir, "vm1", "--size", "1M")
	mustThinblk(t, "volume", "create", dir, "vm2", "--size", "1M")
	_, errOut, code := runBinary(t, "snapshot", "create", dir, "vm1", "s", "vm2", "s")
	wantError(t, errOut, code, "create snapshot s", "given twice")
	if out := mustThinblk(t, "snapshot", "list", dir); out != "" {
		t.Errorf("snapshots after a refused group: %q", out)
	}
}

// Sizes read as qemu-img reads them: K to E suffixes, fractions; not exponents or hex.
func TestSizeSuffixesAsQemuImg(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	mustThinblk(t, "pool", "create", dir, "--size", "1.5M")
	mustThinblk(t, "volume", "create", dir, "big", "--size", "1E")
	mustThinblk(t, "volume", "create", dir, "mid", "--size", "0.5G")
	for _, size := range []string{"1e9", "0x100000", "+1M", "1.5Q"} {
		_, errOut, code := runBinary(t, "volume", "create", dir, "v", "--size", size)
		wantError(t, errOut, code, `size "`+size+`"`, "K, M, G, T, P or E suffix")
	}
	if out := mustThinblk(t, "volume", "list", dir); out != "big\t1152921504606846976\nmid\t536870912\n" {
		t.Errorf("volumes: %q", out)
	}
}
