// Command thinblk is the thinblk back-end and its management tool.
//
//	thinblk serve --raw FILE --socket PATH [--read-only] [--queues N]
//	thinblk version
//
// Run `thinblk help` or `thinblk COMMAND --help` for the flags.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// command is one subcommand. run gets the arguments after the command's
// name and returns the process exit status.
type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"serve", "export disks to QEMU over vhost-user-blk", runServe},
		{"pool", "create or grow a thin pool", runPool},
		{"volume", "create, delete, resize, list volumes; reserve on|off", runVolumeOrReserve},
		{"snapshot", "create, delete or list snapshots and clones", runSnapshot},
		{"vm-snapshot", "snapshot a running VM's disks at one instant (QEMU paused)", runVMSnapshot},
		{"status", "show a pool's space and its volumes", runStatus},
		{"send", "write a snapshot (or its changes since another) as a stream to stdout", runSend},
		{"receive", "create or update a volume from a stream on stdin", runReceive},
		{"migrate", "move a running VM and its volumes to another pool, serve and QEMU", runMigrate},
		{"check", "verify a pool's metadata against its data file", runCheck},
		{"trace-check", "check a request trace (serve --trace): every read returned the last data written", runTraceCheck},
		{"version", "print the version", runVersion},
	}
}

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "thinblk: unknown command %q (see 'thinblk help')\n", args[0])
	return 2
}

// runVolumeOrReserve hands `volume reserve` to its own runner; every other
// volume subcommand goes to runVolume.
func runVolumeOrReserve(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "reserve" {
		return runVolumeReserve(args[1:], stdout, stderr)
	}
	return runVolume(args, stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: thinblk COMMAND [ARGS]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'thinblk COMMAND --help' for a command's flags.")
}

func runVersion(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stdout, "thinblk", version)
	return 0
}

// parseArgs parses flags that may come before, between or after positional
// arguments (`thinblk serve DIR --socket-dir X`), which the flag package
// alone does not allow. It returns the positional arguments. On --help it
// returns flag.ErrHelp after printing usage.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if rest[0] == "--" {
			positional = append(positional, rest[1:]...)
			break
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
	return positional, nil
}

// parseExactly parses args wanting exactly n positional arguments. When
// ok is false, usage or the error has been printed and code is the exit
// status to return.
func parseExactly(fs *flag.FlagSet, args []string, n int) (pos []string, code int, ok bool) {
	pos, err := parseArgs(fs, args)
	if err != nil {
		return nil, exitFor(err), false
	}
	if len(pos) != n {
		wrongArgCount(fs, pos, n)
		return nil, 2, false
	}
	return pos, 0, true
}

// wrongArgCount says on fs's output what is wrong with the positional
// arguments pos when the command wants n, then prints the usage.
func wrongArgCount(fs *flag.FlagSet, pos []string, n int) {
	if len(pos) > n {
		fmt.Fprintf(fs.Output(), "thinblk %s: unexpected argument %q\n", fs.Name(), pos[n])
	} else {
		fmt.Fprintf(fs.Output(), "thinblk %s: missing arguments (%d given, %d wanted)\n", fs.Name(), len(pos), n)
	}
	fs.Usage()
}

// newFlagSet makes a FlagSet that reports errors instead of exiting.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: thinblk %s\n", synopsis)
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 { // a command without flags gets no empty heading
			fmt.Fprintf(stderr, "\nflags:\n")
			fs.PrintDefaults()
		}
	}
	return fs
}

// exitFor maps a parse error to an exit status: 0 for --help, 2 otherwise.
func exitFor(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

// fail prints an error the way every subcommand does.
func fail(stderr io.Writer, cmd string, err error) int {
	msg := err.Error()
	if !strings.HasPrefix(msg, cmd) {
		msg = cmd + ": " + msg
	}
	fmt.Fprintln(stderr, "thinblk "+msg)
	return 1
}
