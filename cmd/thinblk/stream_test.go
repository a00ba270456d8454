package main

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/thinblk/thinblk/thin"
)

// changePool opens a pool (no serve holding it) and runs fn on it.
func changePool(t *testing.T, dir string, fn func(p *thin.Pool)) {
	t.Helper()
	p, err := thin.Open(dir, thin.OpenOptions{FlushInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	fn(p)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// poolImage reads a volume whole, with its provisioned and mapped bytes.
func poolImage(t *testing.T, dir, name string) (data []byte, st thin.VolumeStatus) {
	t.Helper()
	changePool(t, dir, func(p *thin.Pool) {
		v, err := p.Volume(name)
		mustOK(t, err)
		data = make([]byte, v.Size())
		mustOK(t, v.ReadAt([][]byte{data}, 0))
		for _, s := range p.Status().Volumes {
			if s.Name == name {
				st = s
			}
		}
	})
	return data, st
}

// sh runs a shell pipeline of the real binary ($T) and returns its
// stdout, stderr and exit status.
func sh(t *testing.T, bin, script string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("bash", "-c", "set -o pipefail; "+script)
	cmd.Env = append(cmd.Environ(), "T="+bin)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

func sameImages(t *testing.T, srcDir, srcName, dstDir, dstName string) {
	t.Helper()
	a, as := poolImage(t, srcDir, srcName)
	b, bs := poolImage(t, dstDir, dstName)
	if !bytes.Equal(a, b) {
		t.Fatalf("%s:%s and %s:%s differ", srcDir, srcName, dstDir, dstName)
	}
	if as.ProvisionedBytes != bs.ProvisionedBytes && as.Kind == bs.Kind {
		t.Fatalf("provisioned %d and %d bytes", as.ProvisionedBytes, bs.ProvisionedBytes)
	}
}

func TestSendReceiveThroughPipes(t *testing.T) {
	bin := buildThinblk(t)
	src, dst := filepath.Join(t.TempDir(), "src"), filepath.Join(t.TempDir(), "dst")
	mustThinblk(t, "pool", "create", src, "--size", "16M")
	mustThinblk(t, "pool", "create", dst, "--size", "16M")
	mustThinblk(t, "volume", "create", src, "vm", "--size", "1G") // larger than the pools
	bs := int64(64 << 10)
	changePool(t, src, func(p *thin.Pool) {
		v, err := p.Volume("vm")
		mustOK(t, err)
		mustOK(t, v.WriteAt([][]byte{bytes.Repeat([]byte{7}, int(5*bs))}, 0))
		mustOK(t, v.WriteAt([][]byte{bytes.Repeat([]byte{8}, 4096)}, 1<<30-4096))
		mustOK(t, v.WriteZeroes(10*bs, 3*bs, false)) // provisioned
		mustOK(t, p.CreateSnapshot("vm", "s1", false))
		mustOK(t, v.WriteAt([][]byte{bytes.Repeat([]byte{9}, 512)}, bs+512))
		mustOK(t, v.Discard(3*bs, bs))
		mustOK(t, p.CreateSnapshot("vm", "s2", false))
		mustOK(t, v.WriteAt([][]byte{bytes.Repeat([]byte{10}, int(bs))}, 20*bs))
		mustOK(t, p.CreateSnapshot("vm", "s3", false))
		mustOK(t, v.WriteAt([][]byte{bytes.Repeat([]byte{11}, int(bs))}, 21*bs))
		mustOK(t, p.CreateSnapshot("vm", "s4", false))
	})
	out, errOut, code := sh(t, bin, `"$T" send `+src+` s1 --progress | "$T" receive `+dst+` vm`)
	if code != 0 || !strings.Contains(out, "received s1 into vm: full") || !strings.Contains(errOut, "sent s1: full, 6 data blocks") {
		t.Fatalf("full: exit %d\n%s%s", code, out, errOut)
	}
	sameImages(t, src, "s1", dst, "vm")
	_, st := poolImage(t, dst, "s1")
	if st.Kind != "snapshot" {
		t.Fatalf("received snapshot s1 is a %s", st.Kind)
	}
	// Through a file too, incremental.
	stream := filepath.Join(t.TempDir(), "s2.stream")
	if out, errOut, code := sh(t, bin, `"$T" send `+src+` s2 --from s1 > `+stream+` && "$T" receive `+dst+` vm < `+stream); code != 0 {
		t.Fatalf("incremental: exit %d\n%s%s", code, out, errOut)
	}
	sameImages(t, src, "s2", dst, "vm")
	// A truncated stream: a clear error, the volume still on s2.
	out, errOut, code = sh(t, bin, `"$T" send `+src+` s3 --from s2 | head -c 2000 | "$T" receive `+dst+` vm`)
	if code != 1 || !strings.Contains(errOut, "bad thinblk stream: truncated") {
		t.Fatalf("truncated: exit %d\n%s%s", code, out, errOut)
	}
	sameImages(t, src, "s2", dst, "vm")
	if out := mustThinblk(t, "check", dst, "--quiet"); !strings.Contains(out, "clean") {
		t.Fatalf("check after a truncated stream: %q", out)
	}
	// A stream whose base the receiver lacks.
	out, errOut, code = sh(t, bin, `"$T" send `+src+` s4 --from s3 | "$T" receive `+dst+` vm`)
	if code != 1 || !strings.Contains(errOut, "no snapshot s3") {
		t.Fatalf("wrong base: exit %d\n%s%s", code, out, errOut)
	}

	// With serve holding both pools, the same commands go through their
	// control sockets.
	serveSrc, srcLogs := startServe(t, bin, src)
	serveDst, dstLogs := startServe(t, bin, dst)
	waitForSocket(t, filepath.Join(src, "qmp.sock"))
	waitForSocket(t, filepath.Join(dst, "qmp.sock"))
	out, errOut, code = sh(t, bin, `"$T" send `+src+` s3 --from s2 | "$T" receive `+dst+` vm`)
	if code != 0 || !strings.Contains(out, "received s3 into vm: incremental from s2, 1 data blocks") {
		t.Fatalf("through serve: exit %d\n%s%s\nsrc serve:\n%s\ndst serve:\n%s", code, out, errOut, srcLogs, dstLogs)
	}
	out, errOut, code = sh(t, bin, `"$T" send `+src+` s4 --from s3 | head -c 100 | "$T" receive `+dst+` vm`)
	if code != 1 || !strings.Contains(errOut, "truncated") {
		t.Fatalf("truncated through serve: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = sh(t, bin, `"$T" send `+src+` nosuch | "$T" receive `+dst+` vm`)
	if code != 1 || !strings.Contains(errOut, "send nosuch: no such volume") {
		t.Fatalf("missing snapshot through serve: exit %d\n%s%s", code, out, errOut)
	}
	for _, c := range []*exec.Cmd{serveSrc, serveDst} {
		c.Process.Signal(syscall.SIGTERM)
		if err := c.Wait(); err != nil {
			t.Fatalf("serve exit: %v\n%s%s", err, srcLogs, dstLogs)
		}
	}
	sameImages(t, src, "s3", dst, "vm")
	sameImages(t, src, "s3", dst, "s3")
	for _, d := range []string{src, dst} {
		if out := mustThinblk(t, "check", d, "--quiet"); !strings.Contains(out, "clean") {
			t.Fatalf("check %s: %q", d, out)
		}
	}
}
