package main

import (
	"fmt"
	"io"
	"os"

	"github.com/thinblk/thinblk/virtio/blk/blktrace"
)

const traceCheckSynopsis = `trace-check FILE [--max N]`

// runTraceCheck replays a trace written by `serve --trace` on disks that
// started out zeroed (new volumes or files) and reports every read that
// did not return the last data written; exit 1 if any.
func runTraceCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("trace-check", traceCheckSynopsis, stderr)
	limit := fs.Int("max", 20, "mismatches to print")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return exitFor(err)
	}
	if len(pos) != 1 {
		fs.Usage()
		return 2
	}
	f, err := os.Open(pos[0])
	if err != nil {
		return fail(stderr, "trace-check", err)
	}
	defer f.Close()
	res, err := blktrace.Check(f, *limit)
	if err != nil {
		return fail(stderr, "trace-check", err)
	}
	fmt.Fprintf(stdout, "%d requests, %d reads: %d sectors compared, %d skipped (a write to them in flight), %d differ\n",
		res.Requests, res.Reads, res.Sectors, res.Ambiguous, res.Bad)
	for _, m := range res.Mismatches {
		fmt.Fprintln(stdout, m)
	}
	if res.Bad > 0 {
		return 1
	}
	return 0
}
