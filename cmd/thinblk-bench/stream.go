package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/thinblk/thinblk/bench"
	"github.com/thinblk/thinblk/internal/units"
)

// streamTarget is issue 15's bound: a full send | receive at no less than
// 0.7 times the rate of cp of the pool's data file.
const streamTarget = 0.7

type streamFlags struct {
	size    string
	changed float64
	keep    bool
	repeat  int
}

func addStreamFlags(fs *flag.FlagSet) *streamFlags {
	f := &streamFlags{}
	fs.StringVar(&f.size, "stream-size", "2G", "stream target: bytes written into the sent volume in 64 KiB blocks (the issue's figure)")
	fs.Float64Var(&f.changed, "stream-changed", 0.01, "stream target: share of the written blocks rewritten before the incremental stream")
	fs.BoolVar(&f.keep, "stream-keep", false, "stream target: keep the pools under DIR")
	fs.IntVar(&f.repeat, "stream-repeat", 3, "stream target: time cp and each stream this many times, alternating, and report medians")
	return f
}

func measureStream(ctx context.Context, c config, f *streamFlags, log io.Writer) (bench.StreamResult, error) {
	n, err := units.ParseSize(f.size)
	if err != nil || n == 0 || n%(64<<10) != 0 {
		return bench.StreamResult{}, fmt.Errorf("--stream-size %q: want a positive multiple of 64K", f.size)
	}
	if f.changed <= 0 || f.changed > 1 {
		return bench.StreamResult{}, fmt.Errorf("--stream-changed %v: want a share in (0, 1]", f.changed)
	}
	bin, err := filepath.Abs(c.thinblk)
	if err != nil {
		return bench.StreamResult{}, err
	}
	return bench.MeasureStream(bench.StreamOptions{Bin: bin, Dir: filepath.Join(c.dir, "stream"), Written: int64(n),
		Changed: f.changed, Repeat: f.repeat, Keep: f.keep, Log: log})
}

func rate(n int64, s float64) string {
	if s <= 0 {
		return "-"
	}
	return units.HumanBytes(uint64(float64(n)/s)) + "/s"
}

func secs(ds []time.Duration) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = fmt.Sprintf("%.2f", d.Seconds())
	}
	return strings.Join(parts, " ")
}

func printStream(w io.Writer, r bench.StreamResult) {
	med := func(ds []time.Duration) float64 { return bench.Median(ds).Seconds() }
	full, cp, cps, inc, empty := med(r.Full), med(r.Copy), med(r.CopySync), med(r.Incr), med(r.Empty)
	fmt.Fprintf(w, "\nstream: a volume with %s written in %d KiB blocks (the pool's block size); send | receive are two thinblk processes\n"+
		"joined by a pipe, into a new pool; cp copies the source pool's data file; cp+sync then fdatasyncs the copy (receive returns\n"+
		"with its data durable); medians of %d runs taken alternately (all runs in brackets); rates are of the blocks' bytes;\n"+
		"target: full at >= %.1fx cp's rate\n\n", units.HumanBytes(uint64(r.Written)), r.BlockSize>>10, len(r.Full), streamTarget)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "case\tseconds\trate\tstream bytes\tx cp\tx cp+sync\truns\t")
	fmt.Fprintf(tw, "cp data file\t%.2f\t%s\t-\t1.00\t\t[%s]\t\n", cp, rate(r.Written, cp), secs(r.Copy))
	fmt.Fprintf(tw, "cp data file + fdatasync\t%.2f\t%s\t-\t\t1.00\t[%s]\t\n", cps, rate(r.Written, cps), secs(r.CopySync))
	fmt.Fprintf(tw, "full send | receive\t%.2f\t%s\t%d\t%.2f\t%.2f\t[%s]\t\n", full, rate(r.Written, full), r.FullBytes, cp/full, cps/full, secs(r.Full))
	fmt.Fprintf(tw, "incremental, %d blocks changed (%.1f%%)\t%.3f\t%s\t%d\t\t\t[%s]\t\n", r.ChangedBlocks,
		100*float64(r.ChangedBlocks*r.BlockSize)/float64(r.Written), inc, rate(r.ChangedBlocks*r.BlockSize, inc), r.IncrBytes, secs(r.Incr))
	fmt.Fprintf(tw, "incremental, nothing changed\t%.3f\t\t\t\t\t[%s]\t\n", empty, secs(r.Empty))
	tw.Flush()
	fmt.Fprintf(w, "incremental / full time: %.3f (%.3f beyond the empty incremental's fixed cost) for %.3f of the blocks;\n"+
		"received snapshots compared byte for byte and the destination checked: %v\n",
		inc/full, (inc-empty)/full, float64(r.ChangedBlocks*r.BlockSize)/float64(r.Written), r.Verified)
}
