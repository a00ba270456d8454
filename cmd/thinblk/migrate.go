package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/internal/units"
	"github.com/thinblk/thinblk/migrate"
)

// runMigrate is `thinblk migrate` (package migrate): a running VM and its
// volumes move to another pool, serve and QEMU.
func runMigrate(args []string, stdout, stderr io.Writer) int {
	const cmd = "migrate"
	fs := newFlagSet(cmd, "migrate --from-thinblk SOCK|DIR --from-qemu unix:PATH --to-thinblk SOCK|DIR --to-qemu unix:PATH --volume V [--volume W ...] --uri URI --start-destination CMD [--stream-host HOST] [--max-delta SIZE] [--max-rounds N]", stderr)
	fromTB := fs.String("from-thinblk", "", "the source serve's control socket `unix:PATH`, or its pool directory")
	fromQ := fs.String("from-qemu", "", "the source QEMU's QMP socket `unix:PATH` (no other client may hold it)")
	toTB := fs.String("to-thinblk", "", "the destination serve's control socket `unix:PATH`, or its pool directory")
	toQ := fs.String("to-qemu", "", "the destination QEMU's QMP socket `unix:PATH`, once --start-destination started it")
	var volumes stringList
	fs.Var(&volumes, "volume", "a thinblk `VOLUME` that is one of the VM's disks (repeat for each); it must not exist on the destination")
	uri := fs.String("uri", "", "QEMU's migration `URI`, the destination QEMU's -incoming (unix:PATH, tcp:HOST:PORT)")
	start := fs.String("start-destination", "", "shell `CMD` that starts the destination QEMU (with -incoming URI and -daemonize, or in the background) once the volumes exist there")
	streamHost := fs.String("stream-host", "", "the serves connect to this `HOST` (TCP) for the streams; default: a unix socket on this machine")
	maxDelta := fs.String("max-delta", "16M", "rounds while the VM runs end once one sent no more than `SIZE`")
	maxRounds := fs.Int("max-rounds", 5, "at most `N` rounds while the VM runs")
	timeout := fs.Duration("timeout", 10*time.Minute, "bound on each step (streams excepted) and on QEMU's migration")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return exitFor(err)
	}
	if len(pos) != 0 || *fromTB == "" || *fromQ == "" || *toTB == "" || *toQ == "" || len(volumes) == 0 || *uri == "" || *start == "" {
		fs.Usage()
		return 2
	}
	o := migrate.Options{Volumes: volumes, URI: *uri, StreamHost: *streamHost, MaxRounds: *maxRounds, Timeout: *timeout,
		Logf: func(f string, a ...any) { fmt.Fprintf(stderr, f+"\n", a...) }}
	// The library takes 0 for its defaults; a user who typed 0 or -1 meant something else.
	if *maxRounds < 1 {
		return usageError(stderr, cmd, fmt.Errorf("--max-rounds %d: must be at least 1", *maxRounds))
	}
	if *timeout <= 0 {
		return usageError(stderr, cmd, fmt.Errorf("--timeout %v: must be positive", *timeout))
	}
	if o.MaxDelta, err = units.ParseSize(*maxDelta); err != nil {
		return usageError(stderr, cmd, fmt.Errorf("--max-delta: %w", err))
	}
	for _, s := range []struct {
		flag, val string
		dst       *string
		control   bool
	}{
		{"--from-thinblk", *fromTB, &o.Source.Thinblk, true}, {"--to-thinblk", *toTB, &o.Destination.Thinblk, true},
		{"--from-qemu", *fromQ, &o.Source.QEMU, false}, {"--to-qemu", *toQ, &o.Destination.QEMU, false},
	} {
		var err error
		if s.control {
			*s.dst, err = thinblkControlPath(s.val)
		} else {
			*s.dst, err = parseSocketFlag(s.flag, s.val)
		}
		if err != nil {
			return usageError(stderr, cmd, fmt.Errorf("%s: %w", s.flag, err))
		}
	}
	o.StartDestination = func(ctx context.Context) error {
		c := exec.CommandContext(ctx, "sh", "-c", *start)
		c.Stdout, c.Stderr = stderr, stderr
		if err := c.Run(); err != nil {
			return fmt.Errorf("%q: %w", *start, err)
		}
		return nil
	}
	// Ctrl-C undoes: the VM stays on the source.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	res, err := migrate.Run(ctx, o)
	stop()
	if err != nil {
		return fail(stderr, cmd, err)
	}
	fmt.Fprintf(stdout, "migrated: full %s, %d rounds, last delta %s in %v, downtime %v, total %v\n",
		units.HumanBytes(res.FullBytes), res.Rounds, units.HumanBytes(res.LastDeltaBytes),
		res.LastDelta.Round(time.Millisecond), res.Downtime, res.Total.Round(time.Millisecond))
	return 0
}
