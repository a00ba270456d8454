// Command thinblk-bench compares, on one machine and one file, thinblk's
// vhost-user-blk back-end (`thinblk serve --raw`), qemu-storage-daemon's
// vhost-user-blk export, and fio on the host file itself. Both back-ends
// are driven host-side through the project's front-end driver, with the
// same requests, queue depths and queue counts.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/thinblk/thinblk/bench"
	"github.com/thinblk/thinblk/internal/units"
)

type config struct {
	thinblk, qsd, fio string
	dir               string
	size              int64
	duration          time.Duration
	cases             []bench.Case
	targets           map[string]bool
	cache             string
	qsdAIO            string
	jsonOut           bool
	svg               string
	repeat            int
	thinSpan          int64
	// thinblkArgs are extra flags for the thinblk target's serve (after the
	// bench's own, so they win: "--queues 256", "--metrics 127.0.0.1:0").
	thinblkArgs []string
	// alts are other thinblk builds served like the thinblk target and
	// measured in the same run, case by case beside it (--alt).
	alts []altBuild
}

// altBuild is one --alt NAME=PATH: a target NAME that runs `PATH serve
// --raw` on the same image.
type altBuild struct{ name, bin string }

// altFlag collects repeated --alt flags.
type altFlag struct{ alts *[]altBuild }

func (f altFlag) String() string { return "" }

func (f altFlag) Set(v string) error {
	name, bin, ok := strings.Cut(v, "=")
	if !ok || name == "" || bin == "" {
		return fmt.Errorf("want NAME=PATH, got %q", v)
	}
	if slices.Contains(standardTargets, name) || strings.ContainsAny(name, ",/ ") {
		return fmt.Errorf("NAME %q: a target's name, or not a plain word", name)
	}
	for _, a := range *f.alts {
		if a.name == name {
			return fmt.Errorf("NAME %q given twice", name)
		}
	}
	*f.alts = append(*f.alts, altBuild{name, bin})
	return nil
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "thinblk-bench:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("thinblk-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c config
	var size, cases, targets string
	fs.StringVar(&c.thinblk, "thinblk", "_build/bin/thinblk", "thinblk binary `PATH`")
	fs.StringVar(&c.qsd, "qsd", "qemu-storage-daemon", "qemu-storage-daemon binary")
	fs.StringVar(&c.fio, "fio", "fio", "fio binary")
	fs.StringVar(&c.dir, "dir", "_build/bench", "work `DIR` for the image and sockets")
	fs.StringVar(&size, "size", "1G", "image size (K, M, G suffixes)")
	fs.DurationVar(&c.duration, "duration", 3*time.Second, "duration of each case")
	fs.StringVar(&cases, "cases", "all", "comma-separated case names or substrings (e.g. randread-4k-qd32-q1,write-1m); 'list' prints them")
	fs.StringVar(&targets, "targets", "thinblk,qsd,null,fio,thin,snapshot,stream", "targets to run: thinblk (serve --raw), qsd, null (serve --null: no I/O, the vhost-user path's and the driver's ceiling), fio, thin (a thin volume compared with serve --raw), snapshot (snapshot creation time against mapped blocks), stream (send | receive against cp)")
	snapF := addSnapFlags(fs)
	streamF := addStreamFlags(fs)
	var thinSpan string
	fs.StringVar(&thinSpan, "thin-span", "1G", "bytes of the thin volume filled and then read and overwritten")
	fs.StringVar(&c.cache, "cache", "direct", "direct: thinblk --direct, QSD cache.direct=on, fio --direct=1; buffered: all through the page cache")
	fs.StringVar(&c.qsdAIO, "qsd-aio", "io_uring", "qemu-storage-daemon aio= (io_uring, threads, native)")
	fs.BoolVar(&c.jsonOut, "json", false, "print results as JSON instead of a table")
	fs.StringVar(&c.svg, "svg", "", "also draw the thinblk, qsd, null and fio results (IOPS and p99 latency per case) as an SVG chart in `FILE`")
	fs.IntVar(&c.repeat, "repeat", 1, "run each case this many times per target and keep the median (by IOPS)")
	fs.Var(altFlag{&c.alts}, "alt", "`NAME=PATH`: also serve the image with the thinblk binary PATH as target NAME, measured beside the thinblk target case by case (e.g. main's build, to compare a change in one run; repeatable)")
	var thinblkArgs string
	fs.StringVar(&thinblkArgs, "thinblk-args", "", "extra flags for the thinblk target's serve, space-separated (they override the bench's own, e.g. \"--queues 256\")")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// Everything is a flag: a stray word is a mistyped one, not something to ignore.
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (every setting is a flag: see --help)", fs.Arg(0))
	}
	c.thinblkArgs = strings.Fields(thinblkArgs)
	var err error
	if c.size, err = parseSize(size); err != nil {
		return err
	}
	if c.thinSpan, err = parseSize(thinSpan); err != nil {
		return fmt.Errorf("--thin-span: %w", err)
	}
	if cases == "list" {
		for _, bc := range bench.DefaultCases() {
			fmt.Fprintln(stdout, bc.Name())
		}
		return nil
	}
	if c.cases, err = selectCases(cases); err != nil {
		return err
	}
	c.targets = map[string]bool{}
	for _, t := range strings.Split(targets, ",") {
		if !slices.Contains(standardTargets, t) {
			return fmt.Errorf("--targets: unknown target %q", t)
		}
		c.targets[t] = true
	}
	for _, a := range c.alts {
		c.targets[a.name] = true
	}
	if c.repeat < 1 {
		return fmt.Errorf("--repeat %d: want at least 1", c.repeat)
	}
	// fio takes its runtime in whole milliseconds, and 0 or less runs it for ever.
	if c.duration < time.Millisecond {
		return fmt.Errorf("--duration %v: want at least 1ms", c.duration)
	}
	if c.cache != "direct" && c.cache != "buffered" {
		return fmt.Errorf("--cache %q: want direct or buffered", c.cache)
	}
	snapCfg, err := snapF.config()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var results []bench.Result
	var thin thinReport
	if c.deviceTargets() || c.targets["thin"] {
		results, thin, err = measure(ctx, c, stderr)
	}
	if c.svg != "" && len(results) > 0 {
		if cerr := writeChart(c, results); cerr != nil {
			err = errors.Join(err, cerr)
		} else {
			fmt.Fprintf(stderr, "chart written to %s\n", c.svg)
		}
	}
	var snaps snapReport
	if c.targets["snapshot"] && ctx.Err() == nil {
		var serr error
		snaps, serr = measureSnapshots(ctx, c.dir, snapCfg, stderr)
		err = errors.Join(err, serr)
	}
	var streamRes bench.StreamResult
	if c.targets["stream"] && ctx.Err() == nil {
		var serr error
		if streamRes, serr = measureStream(ctx, c, streamF, stderr); serr != nil {
			err = errors.Join(err, fmt.Errorf("stream: %w", serr))
		}
	}
	if c.jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(map[string]any{
			"cache": c.cache, "qsd_aio": c.qsdAIO, "duration_s": c.duration.Seconds(),
			"size_bytes": c.size, "repeat": c.repeat, "results": results, "thin": thin.json(),
			"snapshot": snaps.json(), "stream": streamRes,
		}); jerr != nil {
			return jerr
		}
	} else {
		if c.deviceTargets() {
			printTable(stdout, c, results)
		}
		if c.targets["thin"] {
			printThin(stdout, c, thin)
		}
		if c.targets["snapshot"] {
			printSnapshots(stdout, snaps)
		}
		if c.targets["stream"] && len(streamRes.Full) > 0 {
			printStream(stdout, streamRes)
		}
	}
	return err
}

// standardTargets are the targets --targets names.
var standardTargets = []string{"thinblk", "qsd", "null", "fio", "thin", "snapshot", "stream"}

// deviceTargets are the targets measured case by case, in the order they
// alternate and appear in the table (the --alt builds after thinblk).
var deviceTargets = []string{"thinblk", "qsd", "null", "fio"}

// deviceOrder is deviceTargets with c's --alt builds after thinblk.
func (c config) deviceOrder() []string {
	order := []string{"thinblk"}
	for _, a := range c.alts {
		order = append(order, a.name)
	}
	return append(order, deviceTargets[1:]...)
}

// deviceTargets reports whether any of them was selected.
func (c config) deviceTargets() bool {
	for _, t := range c.deviceOrder() {
		if c.targets[t] {
			return true
		}
	}
	return false
}

// writeChart draws results into c.svg (bench.WriteChart), titled with
// what a reader needs to compare runs: the date, the load, the repeats.
func writeChart(c config, results []bench.Result) error {
	var cases, targets []string
	for _, bc := range c.cases {
		cases = append(cases, bc.Name())
	}
	for _, t := range deviceTargets {
		if c.targets[t] {
			targets = append(targets, t)
		}
	}
	load := ""
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			load = ", load " + f[0]
		}
	}
	title := fmt.Sprintf("%s: median of %d x %s, %s%s", time.Now().UTC().Format("2006-01-02 15:04 UTC"), c.repeat, c.duration, c.cache, load)
	f, err := os.Create(c.svg)
	if err != nil {
		return fmt.Errorf("--svg: %w", err)
	}
	if err := bench.WriteChart(f, title, cases, targets, results); err != nil {
		f.Close()
		return fmt.Errorf("--svg: %w", err)
	}
	return f.Close()
}

func parseSize(s string) (int64, error) {
	n, err := units.ParseSize(s)
	// The image is written in full before measuring: keep it sane.
	if err != nil || n == 0 || n%(1<<20) != 0 || n > 64<<30 {
		return 0, fmt.Errorf("--size %q: want a positive multiple of 1M, at most 64G", s)
	}
	return int64(n), nil
}

func selectCases(spec string) ([]bench.Case, error) {
	all := bench.DefaultCases()
	if spec == "all" || spec == "" {
		return all, nil
	}
	var out []bench.Case
	for _, want := range strings.Split(spec, ",") {
		found := false
		for _, bc := range all {
			if strings.Contains(bc.Name(), want) {
				out = append(out, bc)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("--cases: no case matches %q (try --cases list)", want)
		}
	}
	return out, nil
}

func maxQueues(cs []bench.Case) int {
	n := 1
	for _, c := range cs {
		n = max(n, c.Queues)
	}
	return n
}

// measure runs every selected case on every target. A target that fails
// to start is reported and skipped; the others still run.
func measure(ctx context.Context, c config, log io.Writer) ([]bench.Result, thinReport, error) {
	var thin thinReport
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return nil, thin, err
	}
	img := filepath.Join(c.dir, "bench.raw")
	fmt.Fprintf(log, "preparing %s (%d MiB)\n", img, c.size>>20)
	if err := bench.PrepareFile(img, c.size); err != nil {
		return nil, thin, err
	}
	if c.targets["thin"] && c.thinSpan > c.size {
		return nil, thin, fmt.Errorf("--thin-span %d exceeds --size %d", c.thinSpan, c.size)
	}
	direct := c.cache == "direct"
	queues := maxQueues(c.cases)
	var errs []error
	// Both back-ends run for the whole benchmark (an idle one sleeps), so
	// that each case runs on every target back to back: on a shared
	// machine the load then drifts less between the columns of a row.
	servers := map[string]*bench.Server{}
	alts := map[string]string{}
	for _, a := range c.alts {
		alts[a.name] = a.bin
	}
	for _, target := range c.deviceOrder() {
		if !c.targets[target] || target == "fio" {
			continue
		}
		sock := filepath.Join(c.dir, target+".sock")
		var srv *bench.Server
		var err error
		switch target {
		case "thinblk":
			srv, err = bench.StartThinblk(c.thinblk, img, sock, queues, direct, c.thinblkArgs...)
		case "qsd":
			bin, lerr := exec.LookPath(c.qsd)
			if lerr != nil {
				err = lerr
			} else {
				srv, err = bench.StartQSD(bin, img, sock, queues, bench.QSDOptions{Direct: direct, AIO: c.qsdAIO})
			}
		case "null":
			srv, err = bench.StartNull(c.thinblk, sock, c.size, queues, c.thinblkArgs...)
		default:
			srv, err = bench.StartThinblk(alts[target], img, sock, queues, direct, c.thinblkArgs...)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", target, err))
			fmt.Fprintf(log, "%s: not started: %v\n", target, err)
			continue
		}
		defer srv.Stop()
		servers[target] = srv
	}
	var results []bench.Result
	for _, bc := range c.cases {
		// Repetitions alternate between targets too.
		runs := map[string][]bench.Result{}
		failed := map[string]error{}
		for rep := 0; rep < c.repeat; rep++ {
			for _, target := range c.deviceOrder() {
				if ctx.Err() != nil {
					return results, thin, errors.Join(append(errs, ctx.Err())...)
				}
				srv := servers[target]
				if target == "fio" && !c.targets["fio"] || target != "fio" && srv == nil || failed[target] != nil {
					continue
				}
				var r bench.Result
				var err error
				if target == "fio" {
					r, err = bench.RunFio(ctx, img, bc, bench.FioOptions{Bin: c.fio, Direct: direct, Duration: c.duration})
				} else {
					cpu0, cerr0 := srv.CPUTime()
					cs0, cserr0 := srv.ContextSwitches()
					r, err = runDriverRetry(ctx, srv.Socket, bc, c.duration)
					if cpu1, cerr1 := srv.CPUTime(); err == nil && cerr0 == nil && cerr1 == nil && r.Ops > 0 {
						r.ServerCPUUs = float64((cpu1 - cpu0).Microseconds()) / float64(r.Ops)
					}
					if cs1, cserr1 := srv.ContextSwitches(); err == nil && cserr0 == nil && cserr1 == nil && r.Ops > 0 {
						r.ServerSwitches = float64(cs1-cs0) / float64(r.Ops)
					}
				}
				if err != nil {
					failed[target] = err
					continue
				}
				runs[target] = append(runs[target], r)
			}
		}
		for _, target := range c.deviceOrder() {
			if len(runs[target]) > 0 || failed[target] != nil {
				results = append(results, record(log, target, bc, median(runs[target]), failed[target]))
			}
		}
	}
	if c.targets["thin"] {
		var err error
		if thin, err = measureThin(ctx, c, img, log); err != nil {
			errs = append(errs, fmt.Errorf("thin: %w", err))
		}
	}
	return results, thin, errors.Join(errs...)
}

// median is the run with the median IOPS.
func median(runs []bench.Result) bench.Result {
	if len(runs) == 0 {
		return bench.Result{}
	}
	slices.SortFunc(runs, func(a, b bench.Result) int { return cmp.Compare(a.IOPS, b.IOPS) })
	return runs[len(runs)/2]
}

// runDriverRetry dials again briefly if the back-end is still tearing
// down the previous case's connection.
func runDriverRetry(ctx context.Context, sock string, bc bench.Case, d time.Duration) (bench.Result, error) {
	var err error
	for i := 0; i < 50; i++ {
		dctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
		var r bench.Result
		r, err = bench.RunDriver(dctx, sock, bc, bench.DriverOptions{Duration: d, Seed: uint64(i)})
		cancel()
		if err == nil || !strings.Contains(err.Error(), "negotiation") {
			return r, err
		}
		time.Sleep(20 * time.Millisecond)
	}
	return bench.Result{}, err
}

func record(log io.Writer, target string, bc bench.Case, r bench.Result, err error) bench.Result {
	r.Target, r.Case = target, bc.Name()
	if err != nil {
		r.Err = err.Error()
		fmt.Fprintf(log, "%-8s %-22s error: %v\n", target, bc.Name(), err)
	} else {
		cpu := ""
		if r.ServerCPUUs > 0 {
			cpu = fmt.Sprintf("  CPU/op: server %5.1f us, driver %5.1f us; switches/op %.2f", r.ServerCPUUs, r.DriverCPUUs, r.ServerSwitches)
		}
		fmt.Fprintf(log, "%-8s %-22s %9.0f IOPS %8.1f MB/s  mean %7.1f us  p99 %7.1f us%s\n",
			target, bc.Name(), r.IOPS, r.MBps, r.MeanUs, r.P99Us, cpu)
	}
	return r
}

func printTable(w io.Writer, c config, results []bench.Result) {
	by := map[string]map[string]bench.Result{}
	for _, r := range results {
		if by[r.Case] == nil {
			by[r.Case] = map[string]bench.Result{}
		}
		by[r.Case][r.Target] = r
	}
	fmt.Fprintf(w, "\nmedian of %d run(s) per cell; cache=%s (thinblk --direct=%v, qemu-storage-daemon cache.direct=%v aio=%s, fio direct=%v ioengine=io_uring); %s per case; file %d MiB\n",
		c.repeat, c.cache, c.cache == "direct", c.cache == "direct", c.qsdAIO, c.cache == "direct", c.duration, c.size>>20)
	fmt.Fprintf(w, "qd is per queue; latency in microseconds (driver: submit to completion; fio: lat mean, clat p99);\ncpu/op: back-end process CPU time (user+sys, all threads) per request in microseconds;\ndrv/op: the front-end driver's (this process's) CPU time per request; csw/op: the back-end's context switches\n(all threads) per request; null: serve --null, no I/O\n\n")
	var shown []string
	for _, t := range c.deviceOrder() {
		if c.targets[t] {
			shown = append(shown, t)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "case\t")
	for _, t := range shown {
		fmt.Fprintf(tw, "%s IOPS\tmean\tp99\t", t)
		if t != "fio" {
			fmt.Fprint(tw, "cpu/op\tdrv/op\tcsw/op\t")
		}
	}
	ratios := [][2]string{{"thinblk", "qsd"}, {"thinblk", "fio"}, {"thinblk", "null"}}
	for _, a := range c.alts {
		ratios = append(ratios, [2]string{"thinblk", a.name}, [2]string{a.name, "qsd"}, [2]string{a.name, "fio"})
	}
	for _, rt := range ratios {
		if c.targets[rt[0]] && c.targets[rt[1]] {
			fmt.Fprintf(tw, "%s/%s\t", rt[0], rt[1])
		}
	}
	fmt.Fprintln(tw)
	ratio := func(v float64) string {
		if v <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", v)
	}
	us := func(v float64) string {
		if v <= 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f", v)
	}
	for _, bc := range c.cases {
		rs := by[bc.Name()]
		fmt.Fprintf(tw, "%s\t", bc.Name())
		for _, t := range shown {
			r, ok := rs[t]
			switch {
			case !ok:
				fmt.Fprint(tw, "-\t-\t-\t")
			case r.Err != "":
				fmt.Fprint(tw, "error\t-\t-\t")
			default:
				fmt.Fprintf(tw, "%.0f\t%.1f\t%.1f\t", r.IOPS, r.MeanUs, r.P99Us)
			}
			if t != "fio" {
				fmt.Fprintf(tw, "%s\t%s\t%s\t", us(r.ServerCPUUs), us(r.DriverCPUUs), ratio(r.ServerSwitches))
			}
		}
		for _, rt := range ratios {
			if !c.targets[rt[0]] || !c.targets[rt[1]] {
				continue
			}
			a, aok := rs[rt[0]]
			b, bok := rs[rt[1]]
			if !aok || !bok || a.Err != "" || b.Err != "" || b.IOPS == 0 {
				fmt.Fprint(tw, "-\t")
			} else {
				fmt.Fprintf(tw, "%.2f\t", a.IOPS/b.IOPS)
			}
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}
