package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/vmsnap"
)

// stringList is a repeatable flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

func runVMSnapshot(args []string, stdout, stderr io.Writer) int {
	const cmd = "vm-snapshot"
	fs := newFlagSet(cmd, "vm-snapshot --qemu unix:PATH --thinblk unix:PATH|POOLDIR --volume V [--volume W ...] --name SNAP [--writable] [--freeze --qga unix:PATH] [--timeout 30s]", stderr)
	qemu := fs.String("qemu", "", "QEMU's QMP socket `unix:PATH`; no other client may hold it")
	tb := fs.String("thinblk", "", "thinblk serve's control socket `unix:PATH`, or the pool directory whose serve to use")
	var volumes stringList
	fs.Var(&volumes, "volume", "a thinblk `VOLUME` that is one of the VM's disks (repeat for each; all are snapshotted at one instant)")
	name := fs.String("name", "", "snapshot name `SNAP`: with one volume the snapshot is called SNAP, with several VOLUME@SNAP")
	freeze := fs.Bool("freeze", false, "freeze the guest's filesystems through the QEMU guest agent around the snapshot")
	writable := fs.Bool("writable", false, "make writable clones instead of read-only snapshots")
	qga := fs.String("qga", "", "the guest agent's virtio-serial chardev socket `unix:PATH`, needed with --freeze")
	timeout := fs.Duration("timeout", vmsnap.DefaultTimeout, "bound on connecting, freezing, pausing, draining in-flight requests and snapshotting; resuming and thawing get as long again")
	verbose := fs.Bool("v", false, "print each step")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return exitFor(err)
	}
	if len(pos) != 0 || *qemu == "" || *tb == "" || len(volumes) == 0 || *name == "" {
		fs.Usage()
		return 2
	}
	if *timeout <= 0 {
		return usageError(stderr, cmd, fmt.Errorf("--timeout %v: must be positive", *timeout))
	}
	if *freeze != (*qga != "") {
		return usageError(stderr, cmd, errors.New("--freeze and --qga go together"))
	}
	o := vmsnap.Options{Volumes: volumes, Name: *name, Freeze: *freeze, Writable: *writable, Timeout: *timeout}
	if o.QEMU, err = parseSocketFlag("--qemu", *qemu); err != nil {
		return usageError(stderr, cmd, err)
	}
	if o.Thinblk, err = thinblkControlPath(*tb); err != nil {
		return usageError(stderr, cmd, err)
	}
	if *qga != "" {
		if o.QGA, err = parseSocketFlag("--qga", *qga); err != nil {
			return usageError(stderr, cmd, err)
		}
	}
	if *verbose {
		o.Logf = func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) }
	}
	// Ctrl-C must not leave the VM paused or frozen: it cancels the steps
	// still to come, Take undoes what was done (on its own bounded time),
	// and signals stay caught until then.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	res, err := vmsnap.Take(ctx, o)
	stop()
	if err != nil {
		return fail(stderr, cmd, err)
	}
	for _, s := range res.Snapshots {
		fmt.Fprintf(stdout, "%s: %s of %s\n", s.Name, snapshotKind(*writable), s.Volume)
	}
	switch {
	case res.WasRunning:
		fmt.Fprintf(stdout, "VM paused for %v (in-flight requests drained in %v)", res.Paused.Round(time.Microsecond), res.Drain.Round(time.Microsecond))
	default:
		fmt.Fprint(stdout, "VM was already paused and stays paused")
	}
	if *freeze {
		fmt.Fprintf(stdout, "; %d guest filesystems frozen", res.Frozen)
	}
	fmt.Fprintln(stdout)
	return 0
}

// parseSocketFlag accepts unix:PATH or a bare path.
func parseSocketFlag(flagName, s string) (string, error) {
	path, err := parseQMPAddr(s)
	if err != nil {
		return "", fmt.Errorf("%s%s", flagName, strings.TrimPrefix(err.Error(), "--qmp"))
	}
	return path, nil
}

// thinblkControlPath takes a control socket, or a pool directory whose
// running serve recorded its control socket there.
func thinblkControlPath(s string) (string, error) {
	if fi, err := os.Stat(s); err == nil && fi.IsDir() {
		b, err := os.ReadFile(filepath.Join(s, controlFile))
		if err != nil {
			return "", fmt.Errorf("--thinblk %s: no running 'thinblk serve' recorded a control socket there", s)
		}
		return strings.TrimSpace(string(b)), nil
	}
	return parseSocketFlag("--thinblk", s)
}
