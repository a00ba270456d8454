package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/thinblk/thinblk/internal/units"
	"github.com/thinblk/thinblk/thin"
)

// poolOps is what the management commands do to a pool: directly, or
// through the control socket of a `thinblk serve` that holds the pool.
type poolOps interface {
	Grow(size uint64) error
	CreateVolume(name string, size uint64) error
	DeleteVolume(name string) error
	ResizeVolume(name string, size uint64) error
	CreateSnapshots(specs []thin.SnapshotSpec) error
	Status() (thin.Status, error)
	Close() error
}

// directOps opens the pool in this process.
type directOps struct{ p *thin.Pool }

func (d directOps) Grow(size uint64) error                   { return d.p.Grow(size) }
func (d directOps) CreateVolume(n string, size uint64) error { return d.p.CreateVolume(n, size) }
func (d directOps) DeleteVolume(n string) error              { return d.p.DeleteVolume(n) }
func (d directOps) ResizeVolume(n string, size uint64) error { return d.p.ResizeVolume(n, size) }
func (d directOps) Status() (thin.Status, error)             { return d.p.Status(), nil }
func (d directOps) CreateSnapshots(specs []thin.SnapshotSpec) error {
	return d.p.CreateSnapshots(specs)
}
func (d directOps) Close() error { return d.p.Close() }

// quietLogger discards the pool's informational logs in one-shot commands
// but keeps warnings.
func quietLogger(stderr io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// lockedWait is how long a management command waits for a pool that
// another process holds while no control socket answers: a serve starting
// (it holds the pool before its control socket listens) or handing over,
// or another command.
const lockedWait = 10 * time.Second

// openPoolOps reaches the pool in dir: through a running serve's control
// socket when there is one, otherwise by opening it here.
func openPoolOps(dir string, stderr io.Writer) (poolOps, error) {
	deadline := time.Now().Add(lockedWait)
	for {
		if ops, err := dialControl(dir); err == nil {
			return ops, nil
		} else if !errors.Is(err, errNoControl) {
			return nil, err
		}
		p, err := thin.Open(dir, thin.OpenOptions{Logger: quietLogger(stderr), FlushInterval: -1})
		if err == nil {
			return directOps{p}, nil
		}
		if !errors.Is(err, thin.ErrLocked) {
			return nil, err
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w; no running 'thinblk serve' answered on its control socket within %v", err, lockedWait)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func runPool(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: thinblk pool create|grow DIR ... (see 'thinblk pool create --help')")
		return 2
	}
	switch args[0] {
	case "create":
		return runPoolCreate(args[1:], stdout, stderr)
	case "grow":
		return runPoolGrow(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "thinblk pool: unknown subcommand %q (want create or grow)\n", args[0])
	return 2
}

func runPoolCreate(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("pool create", "pool create DIR --size SIZE [--block-size 64K] [--no-space error|queue|pause] [--no-space-timeout 60s] [--low-water 10%] [--preallocate] [--data-device DEV]", stderr)
	size := fs.String("size", "", "pool size (data space), e.g. 20G; a multiple of the block size")
	blockSize := fs.String("block-size", "64K", "allocation unit: a power of two from 4K to 16M")
	noSpace := fs.String("no-space", "error", "when a write finds no free space: error (fail at once), queue (wait for space up to --no-space-timeout) or pause (wait for space however long; serve --qemu-qmp pauses the VM meanwhile)")
	noSpaceTimeout := fs.Duration("no-space-timeout", 60*time.Second, "how long a queued write waits for space before it fails")
	lowWater := fs.String("low-water", "10%", "log and flag the pool when free space falls below this share of it")
	dataDevice := fs.String("data-device", "", "keep the pool's data on this block device (LV, partition, loop device) instead of a file; DIR/thinblk.data links to it")
	prealloc := fs.Bool("preallocate", false, "allocate the whole data file on the host now (thick): the host can never be full under the pool; freed blocks are not punched")
	pos, sizeBytes, code, ok := parseSized(fs, args, 1, size, stderr)
	if !ok {
		return code
	}
	o := thin.CreateOptions{Size: sizeBytes}
	bs, err := units.ParseSize(*blockSize)
	if err != nil || bs > 1<<30 {
		return usageError(stderr, "pool create", fmt.Errorf("--block-size %q: want a power of two from 4K to 16M", *blockSize))
	}
	o.BlockSize = uint32(bs)
	if o.NoSpace, err = thin.ParseNoSpacePolicy(*noSpace); err != nil {
		return usageError(stderr, "pool create", err)
	}
	if *noSpaceTimeout <= 0 {
		return usageError(stderr, "pool create", fmt.Errorf("--no-space-timeout %v: must be positive", *noSpaceTimeout))
	}
	o.NoSpaceTimeout = *noSpaceTimeout
	if o.LowWater, err = units.ParsePercent(*lowWater); err != nil {
		return usageError(stderr, "pool create", fmt.Errorf("--low-water %w", err))
	}
	o.Preallocate, o.DataDevice = *prealloc, *dataDevice
	if err := thin.Create(pos[0], o); err != nil {
		return fail(stderr, "pool create", err)
	}
	fmt.Fprintf(stdout, "created pool %s: %s, block size %s\n", pos[0], units.HumanBytes(o.Size), units.HumanBytes(uint64(o.BlockSize)))
	st, err := settledStatus(pos[0], stderr)
	if err != nil {
		return fail(stderr, "pool create", err)
	}
	if st.Pool.HostUnbackedBytes > 0 {
		warnHost(stderr, st.Pool.HostUnbackedBytes, st.Pool.HostFreeBytes)
	}
	return 0
}

// settledStatus is a new pool's status as every later open sees it, what
// its host can back included. The first open allocates the metadata's
// headroom and drops the log Pebble preallocated at creation (4.5 MiB),
// in the background: a status then may still count that log (3 times in
// 20 here). So the status comes from a second open, which alone logs (the
// same warnings as the first).
func settledStatus(dir string, stderr io.Writer) (thin.Status, error) {
	var st thin.Status
	for _, w := range []io.Writer{io.Discard, stderr} {
		p, err := thin.Open(dir, thin.OpenOptions{Logger: quietLogger(w), FlushInterval: -1})
		if err != nil {
			return st, err
		}
		st = p.Status()
		if err := p.Close(); err != nil {
			return st, err
		}
	}
	return st, nil
}

// warnHost warns that the pool is over-committed on its host file system
// (hostFree is what is left besides what the pool holds there: its
// metadata's headroom too).
func warnHost(w io.Writer, unbacked, hostFree uint64) {
	fmt.Fprintf(w, "warning: the host file system has %s free: %s of the pool's free space is not backed by it; "+
		"writes to unprovisioned space follow the no-space policy when it fills (provisioned and reserved space stays backed)\n",
		units.HumanBytes(hostFree), units.HumanBytes(unbacked))
}

func runPoolGrow(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("pool grow", "pool grow DIR --size SIZE", stderr)
	size := fs.String("size", "", "new pool size, e.g. 40G (online while serve runs)")
	pos, n, code, ok := parseSized(fs, args, 1, size, stderr)
	if !ok {
		return code
	}
	return withPool(pos[0], stderr, "pool grow", func(ops poolOps) error {
		if err := ops.Grow(n); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "pool %s is now %s\n", pos[0], units.HumanBytes(n))
		if st, err := ops.Status(); err == nil && st.Pool.HostUnbackedBytes > 0 {
			warnHost(stderr, st.Pool.HostUnbackedBytes, st.Pool.HostFreeBytes)
		}
		return nil
	})
}

// withPool runs fn on the pool in dir and closes it.
func withPool(dir string, stderr io.Writer, cmd string, fn func(poolOps) error) int {
	ops, err := openPoolOps(dir, stderr)
	if err != nil {
		return fail(stderr, cmd, err)
	}
	err = fn(ops)
	if cerr := ops.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail(stderr, cmd, err)
	}
	return 0
}

// parseSized parses args for exactly n positional arguments and a --size,
// which it returns in bytes. When ok is false, usage or the error has
// been printed and code is the exit status to return.
func parseSized(fs *flag.FlagSet, args []string, n int, size *string, stderr io.Writer) (pos []string, bytes uint64, code int, ok bool) {
	pos, err := parseArgs(fs, args)
	if err != nil {
		return nil, 0, exitFor(err), false
	}
	if len(pos) != n || *size == "" {
		fs.Usage()
		return nil, 0, 2, false
	}
	if bytes, err = units.ParseSize(*size); err != nil {
		return nil, 0, usageError(stderr, fs.Name(), err), false
	}
	return pos, bytes, 0, true
}

// runOnPool parses args for exactly n positional arguments, the pool's
// directory first, and runs fn on that pool; fs's name is the command's in
// errors.
func runOnPool(fs *flag.FlagSet, args []string, n int, stderr io.Writer, fn func(ops poolOps, pos []string) error) int {
	pos, code, ok := parseExactly(fs, args, n)
	if !ok {
		return code
	}
	return withPool(pos[0], stderr, fs.Name(), func(ops poolOps) error { return fn(ops, pos) })
}

// runList is `volume list` and `snapshot list`: a line for each of the
// pool's volumes that line describes ("" leaves a volume out).
func runList(cmd string, args []string, stdout, stderr io.Writer, line func(thin.VolumeStatus) string) int {
	fs := newFlagSet(cmd, cmd+" DIR", stderr)
	return runOnPool(fs, args, 1, stderr, func(ops poolOps, _ []string) error {
		st, err := ops.Status()
		if err != nil {
			return err
		}
		for _, v := range st.Volumes {
			if l := line(v); l != "" {
				fmt.Fprintln(stdout, l)
			}
		}
		return nil
	})
}

func usageError(stderr io.Writer, cmd string, err error) int {
	fmt.Fprintf(stderr, "thinblk %s: %v\n", cmd, err)
	return 2
}

func runVolume(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: thinblk volume create|delete|resize|list|reserve DIR ...")
		return 2
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create", "resize":
		fs := newFlagSet("volume "+sub, "volume "+sub+" DIR NAME --size SIZE", stderr)
		size := fs.String("size", "", "virtual size of the volume, e.g. 100G (may exceed the pool)")
		pos, n, code, ok := parseSized(fs, args, 2, size, stderr)
		if !ok {
			return code
		}
		return withPool(pos[0], stderr, "volume "+sub, func(ops poolOps) error {
			var err error
			if sub == "create" {
				err = ops.CreateVolume(pos[1], n)
			} else {
				err = ops.ResizeVolume(pos[1], n)
			}
			if err == nil {
				fmt.Fprintf(stdout, "volume %s: %s\n", pos[1], units.HumanBytes(n))
			}
			return err
		})
	case "delete":
		fs := newFlagSet("volume delete", "volume delete DIR NAME", stderr)
		return runOnPool(fs, args, 2, stderr, func(ops poolOps, pos []string) error {
			return ops.DeleteVolume(pos[1])
		})
	case "list":
		return runList("volume list", args, stdout, stderr, func(v thin.VolumeStatus) string {
			return fmt.Sprintf("%s\t%d", v.Name, v.SizeBytes)
		})
	}
	fmt.Fprintf(stderr, "thinblk volume: unknown subcommand %q (want create, delete, resize or list)\n", sub)
	return 2
}

func runSnapshot(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: thinblk snapshot create|delete|list DIR ...")
		return 2
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create":
		fs := newFlagSet("snapshot create", "snapshot create DIR VOLUME SNAP [--writable] [VOLUME SNAP ...]", stderr)
		writable := fs.Bool("writable", false, "make writable clones instead of read-only snapshots")
		pos, err := parseArgs(fs, args)
		if err != nil {
			return exitFor(err)
		}
		// More than one pair makes a consistency group: one instant, all or none.
		if len(pos) < 3 || len(pos)%2 != 1 {
			fs.Usage()
			return 2
		}
		var specs []thin.SnapshotSpec
		for i := 1; i < len(pos); i += 2 {
			specs = append(specs, thin.SnapshotSpec{Origin: pos[i], Name: pos[i+1], Writable: *writable})
		}
		return withPool(pos[0], stderr, "snapshot create", func(ops poolOps) error {
			if err := ops.CreateSnapshots(specs); err != nil {
				return err
			}
			for _, sp := range specs {
				fmt.Fprintf(stdout, "%s: %s of %s\n", sp.Name, snapshotKind(sp.Writable), sp.Origin)
			}
			return nil
		})
	case "delete":
		fs := newFlagSet("snapshot delete", "snapshot delete DIR SNAP", stderr)
		return runOnPool(fs, args, 2, stderr, func(ops poolOps, pos []string) error {
			st, err := ops.Status()
			if err != nil {
				return err
			}
			if err := notAVolume(st, pos[1]); err != nil {
				return fmt.Errorf("%w (use volume delete)", err)
			}
			return ops.DeleteVolume(pos[1])
		})
	case "list":
		return runList("snapshot list", args, stdout, stderr, func(v thin.VolumeStatus) string {
			if v.Kind == "volume" {
				return ""
			}
			return fmt.Sprintf("%s\t%s\t%s", v.Name, v.Kind, v.Origin)
		})
	}
	fmt.Fprintf(stderr, "thinblk snapshot: unknown subcommand %q (want create, delete or list)\n", sub)
	return 2
}

// notAVolume refuses a snapshot operation on a plain volume, so that
// `snapshot delete` cannot delete one by a slip of the name.
func notAVolume(st thin.Status, name string) error {
	for _, v := range st.Volumes {
		if v.Name == name && v.Kind == "volume" {
			return fmt.Errorf("%s is a volume, not a snapshot or clone", name)
		}
	}
	return nil
}

func snapshotKind(writable bool) string {
	if writable {
		return "clone"
	}
	return "snapshot"
}

func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("status", "status DIR [--json]", stderr)
	asJSON := fs.Bool("json", false, "print JSON (numbers in bytes)")
	return runOnPool(fs, args, 1, stderr, func(ops poolOps, _ []string) error {
		st, err := ops.Status()
		if err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		}
		printStatus(stdout, st)
		return nil
	})
}

func printStatus(w io.Writer, st thin.Status) {
	p := st.Pool
	fmt.Fprintf(w, "pool %s: size %s, allocated %s, reserved %s, free %s (block size %s, no-space %s)\n",
		p.Dir, units.HumanBytes(p.SizeBytes), units.HumanBytes(p.AllocatedBytes), units.HumanBytes(p.ReservedBytes),
		units.HumanBytes(p.FreeBytes), units.HumanBytes(uint64(p.BlockSize)), p.NoSpace)
	if p.Preallocated {
		fmt.Fprintf(w, "preallocated: the whole data file is allocated on the host\n")
	}
	if p.DataDevice != "" {
		fmt.Fprintf(w, "data on block device %s\n", p.DataDevice)
	}
	if p.DataHostBytes > 0 {
		fmt.Fprintf(w, "data file takes %s on the host, metadata %s\n", units.HumanBytes(p.DataHostBytes), units.HumanBytes(p.MetadataBytes))
	}
	if p.BelowLowWater {
		fmt.Fprintf(w, "WARNING: free space is below the low-water mark (%s)\n", units.HumanBytes(p.LowWaterBytes))
	}
	if p.HostFreeBytes > 0 || p.HostUnbackedBytes > 0 {
		fmt.Fprintf(w, "host file system: free %s; pool free space it could not back: %s\n",
			units.HumanBytes(p.HostFreeBytes), units.HumanBytes(p.HostUnbackedBytes))
	}
	if p.HostBelowLowWater {
		fmt.Fprintf(w, "WARNING: the host file system's free space is below the pool's low-water mark (%s)\n", units.HumanBytes(p.LowWaterBytes))
	}
	if p.MetaHeadroomBytes < p.MetaHeadroomWantBytes {
		fmt.Fprintf(w, "WARNING: the metadata's host file system filled up: metadata headroom %s of %s; writes that need new host space follow the no-space policy until it is restored\n",
			units.HumanBytes(p.MetaHeadroomBytes), units.HumanBytes(p.MetaHeadroomWantBytes))
	}
	if p.ReservedUnbackedBytes > 0 {
		fmt.Fprintf(w, "WARNING: %s of reserved space has no host-allocated spare: promised writes may fail if the host fills up\n",
			units.HumanBytes(p.ReservedUnbackedBytes))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "VOLUME\tKIND\tSIZE\tMAPPED\tPROVISIONED\tRESERVED\t RESERVED FOR")
	for _, v := range st.Volumes {
		kind := v.Kind
		if v.Origin != "" {
			kind += " of " + v.Origin
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t %s\n", v.Name, kind, units.HumanBytes(v.SizeBytes), units.HumanBytes(v.MappedBytes),
			units.HumanBytes(v.ProvisionedBytes), units.HumanBytes(v.ReservedBytes), reservedFor(v))
	}
	tw.Flush()
}

// reservedFor says why a volume holds reserved space.
func reservedFor(v thin.VolumeStatus) string {
	var why []string
	for _, r := range []struct {
		what  string
		bytes uint64
	}{
		{"provisioned", v.ReservedProvisionedBytes},
		{"snapshot copies", v.ReservedSharedBytes},
		{"reserve mode", v.ReservedReserveModeBytes},
	} {
		if r.bytes > 0 {
			why = append(why, r.what+" "+units.HumanBytes(r.bytes))
		}
	}
	if v.ReserveMode && v.ReservedReserveModeBytes == 0 {
		why = append(why, "reserve mode (all owned)")
	}
	if len(why) == 0 {
		return "-"
	}
	return strings.Join(why, ", ")
}

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("check", "check DIR [--quiet]", stderr)
	quiet := fs.Bool("quiet", false, "no progress output")
	pos, code, ok := parseExactly(fs, args, 1)
	if !ok {
		return code
	}
	p, err := thin.Open(pos[0], thin.OpenOptions{Logger: quietLogger(stderr), FlushInterval: -1})
	if err != nil {
		if errors.Is(err, thin.ErrLocked) {
			err = fmt.Errorf("%w: stop 'thinblk serve' before checking", err)
		}
		return fail(stderr, "check", err)
	}
	defer p.Close()
	last := time.Now()
	progress := func(done, total uint64) {
		if *quiet || time.Since(last) < time.Second {
			return
		}
		last = time.Now()
		fmt.Fprintf(stderr, "check: %d of %d (%.0f%%)\n", done, total, 100*float64(done)/float64(max(total, 1)))
	}
	if err := p.Check(progress); err != nil {
		fmt.Fprintf(stdout, "pool %s: NOT clean\n%v\n", pos[0], err)
		return 1
	}
	fmt.Fprintf(stdout, "pool %s: clean\n", pos[0])
	return 0
}
