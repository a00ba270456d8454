package main

import (
	"bytes"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/thinblk/thinblk/internal/units"
	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio/blk"
)

// FuzzFlagValues: every decoder of a flag's value takes any string without panicking; what it
// accepts is in range, and what it refuses gets an error that quotes the value.
func FuzzFlagValues(f *testing.F) {
	for _, s := range []string{
		"0600", "0777", "01000", "-1", "999", "unix:/run/thinblk/qmp.sock", "/run/q.sock", "unix:", "tcp:localhost:4444",
		"127.0.0.1:9470", ":0", "[::1]:70000", "http://127.0.0.1:9470", "64K", "1.5G", "0.3K", "16P", "17179869184P",
		"1e308", "NaN", "-0", "5%", "150%", "0.99", "debug", "WARN+2", "", " ", "\x00", "é",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		quotes := func(what string, err error) {
			t.Helper()
			if !strings.Contains(err.Error(), strconv.Quote(s)) {
				t.Fatalf("%s refused %q with an error that does not quote it: %v", what, s, err)
			}
		}
		if m, err := parseMode(s); err != nil {
			quotes("--socket-mode", err)
		} else if m > 0o777 {
			t.Fatalf("--socket-mode %q accepted as %v", s, m)
		}
		if path, err := parseQMPAddr(s); err != nil {
			quotes("--qmp", err)
		} else if path == "" || (path != s && "unix:"+path != s) {
			t.Fatalf("--qmp %q accepted as %q", s, path)
		}
		if path, err := parseSocketFlag("--qemu-qmp", s); err != nil {
			quotes("--qemu-qmp", err)
			if !strings.HasPrefix(err.Error(), "--qemu-qmp ") {
				t.Fatalf("--qemu-qmp %q: error does not name the flag: %v", s, err)
			}
		} else if path == "" {
			t.Fatalf("--qemu-qmp %q accepted as an empty path", s)
		}
		if network, addr, err := parseMetricsAddr(s); err != nil {
			quotes("--metrics", err)
		} else {
			switch network {
			case "unix":
				if addr == "" || "unix:"+addr != s {
					t.Fatalf("--metrics %q accepted as unix %q", s, addr)
				}
			case "tcp":
				_, port, err := net.SplitHostPort(addr)
				if n, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || n > math.MaxUint16 {
					t.Fatalf("--metrics %q accepted as tcp %q", s, addr)
				}
			default:
				t.Fatalf("--metrics %q accepted as network %q", s, network)
			}
		}
		if n, err := units.ParseSize(s); err != nil {
			quotes("size", err)
		} else if m, err := units.ParseSize(strconv.FormatUint(n, 10)); err != nil || m != n {
			t.Fatalf("size %q is %d, which reads back as %d (%v)", s, n, m, err)
		}
		if p, err := units.ParsePercent(s); err != nil {
			quotes("percentage", err)
		} else if !(p >= 0 && p < 1) {
			t.Fatalf("percentage %q accepted as %v", s, p)
		}
		if _, err := newLogger(io.Discard, s); err != nil {
			quotes("--log-level", err)
		}
	})
}

// FuzzServeFlags: serve's argument parsing takes any argument list (NUL-separated here)
// without panicking; what it accepts passes every check serve relies on, and what it refuses
// exits 2 with a message (0 and usage for --help).
func FuzzServeFlags(f *testing.F) {
	for _, args := range [][]string{
		{"pool"},
		{"pool", "--socket-dir", "/run/thinblk", "--queues", "4", "--qmp", "unix:/run/q.sock", "--qemu-qmp", "/run/vm.qmp"},
		{"--raw", "disk.img", "--socket", "d.sock", "--read-only", "--serial", "abc", "--socket-mode", "0660"},
		{"--raw", "x", "--socket", "s", "--queue-size", "1024", "--metrics", "unix:/m.sock", "--log-level", "debug"},
		{"--raw", "x", "--socket", "s", "--queues", "257"},
		{"pool", "--", "--raw"},
		{"--help"},
		{"-queues=0x10", "pool", "-direct=false", "--trace", "t"},
		{"pool", "other"},
		{"--serial"},
	} {
		f.Add(strings.Join(args, "\x00"))
	}
	f.Fuzz(func(t *testing.T, in string) {
		args := strings.Split(in, "\x00")
		var stderr bytes.Buffer
		fl, code, ok := parseServeFlags(args, &stderr)
		if !ok {
			if code != 0 && code != 2 || stderr.Len() == 0 {
				t.Fatalf("%q refused with exit %d and stderr %q", args, code, stderr.String())
			}
			return
		}
		if (fl.pool == "") == (fl.raw == "") || fl.raw != "" && fl.socket == "" {
			t.Fatalf("%q accepted with pool %q, raw %q, socket %q", args, fl.pool, fl.raw, fl.socket)
		}
		if fl.pool != "" && !slices.Contains(args, fl.pool) {
			t.Fatalf("%q accepted with pool %q, not one of the arguments", args, fl.pool)
		}
		if fl.queues < 1 || fl.queues > vhostuser.MaxRings || fl.queueSize < 2 || fl.queueSize > 1024 ||
			fl.queueSize&(fl.queueSize-1) != 0 || len(fl.serial) > blk.IDBytes {
			t.Fatalf("%q accepted with %+v", args, fl)
		}
		if m, err := parseMode(fl.socketMode); err != nil || m&^os.ModePerm != 0 {
			t.Fatalf("%q accepted with socket mode %q", args, fl.socketMode)
		}
	})
}
