package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/thinblk/thinblk/bench"
)

// thinCase is one row of the thin-pool comparison: the same requests
// against `serve --raw` and a thin volume, with the target ratio of issue 18.
type thinCase struct {
	label  string
	c      bench.Case
	fresh  bool    // on a newly created volume, so every write allocates
	target float64 // wanted thin/raw IOPS ratio
}

var thinCases = []thinCase{
	{"4k random read, mapped blocks", bench.Case{Op: bench.RandRead, BlockSize: 4096, QueueDepth: 32, Queues: 1}, false, 0.95},
	{"4k random overwrite, mapped blocks", bench.Case{Op: bench.RandWrite, BlockSize: 4096, QueueDepth: 32, Queues: 1}, false, 0.9},
	{"4k random write that allocates, FLUSH every 32", bench.Case{Op: bench.RandWrite, BlockSize: 4096, QueueDepth: 32, Queues: 1, FlushEvery: 32}, true, 0.6},
}

// thinRow is one case's medians. raw is `serve --raw` on the written
// image; sparse (allocating cases only) is `serve --raw` on a new sparse
// file as large as the thin volume, where the same writes allocate host
// blocks as the thin pool's do.
type thinRow struct {
	tc                thinCase
	raw, sparse, thin bench.Result
	rawErr, sparseErr error
	thinErr           error
}

type thinReport struct {
	rows             []thinRow
	span             int64
	blockSize        uint64
	mappedBlocks     uint64
	metaDiskPerBlock float64
	rssPerBlock      float64
	metaErr          error
}

// allocVolumeSize is the size of the volume (and sparse raw file) each
// allocating run writes at random: large, so that nearly every write
// lands in a new block.
const allocVolumeSize = 64 << 30

// measureThin compares a thin volume with the raw file on the same cases.
// The raw reference is a `serve --raw` of its own without --direct: a
// pool's data file goes through the page cache, so both sides do. The
// volume is filled over span first, so reads and overwrites hit mapped
// blocks; the allocating case gets a new, large volume per run, and a new
// sparse raw file of the same size as its second reference.
func measureThin(ctx context.Context, c config, img string, log io.Writer) (thinReport, error) {
	rep := thinReport{span: c.thinSpan}
	raw, err := bench.StartThinblk(c.thinblk, img, filepath.Join(c.dir, "thinblk-raw.sock"), 1, false)
	if err != nil {
		return rep, err
	}
	defer raw.Stop()
	// Both sides start from the same write history: the host page cache
	// sizes its folios by the writes, and that changes the cost of later
	// 4 KiB reads and overwrites several-fold. So the raw image leaves the
	// cache and is written through serve --raw with the requests that fill
	// the thin volume below.
	if err := bench.DropCache(img); err != nil {
		return rep, err
	}
	fmt.Fprintf(log, "thin: filling %d MiB of the raw image\n", c.thinSpan>>20)
	if err := bench.Fill(ctx, raw.Socket, c.thinSpan); err != nil {
		return rep, err
	}
	// Room for one allocating run at a time (each run's volume is deleted
	// after it): a fast machine allocates several GiB in a few seconds. The
	// data file is sparse; only written blocks take host space.
	poolSize := c.thinSpan + 16<<30
	pool, err := bench.StartThinPool(c.thinblk, filepath.Join(c.dir, "thinpool"), poolSize, c.thinSpan, "filled", 1)
	if err != nil {
		return rep, err
	}
	defer pool.Stop()
	rss0, _ := pool.RSS()
	fmt.Fprintf(log, "thin: filling %d MiB of the thin volume\n", c.thinSpan>>20)
	if err := bench.Fill(ctx, pool.Socket, c.thinSpan); err != nil {
		return rep, err
	}
	if st, err := pool.Status(); err != nil {
		rep.metaErr = err
	} else {
		rep.blockSize = st.Pool.BlockSize
		for _, v := range st.Volumes {
			rep.mappedBlocks += v.MappedBytes / max(st.Pool.BlockSize, 1)
		}
		if rep.mappedBlocks > 0 {
			rep.metaDiskPerBlock = float64(st.Pool.MetadataBytes) / float64(rep.mappedBlocks)
			if rss1, err := pool.RSS(); err == nil {
				rep.rssPerBlock = float64(rss1-rss0) / float64(rep.mappedBlocks)
			}
		}
	}
	opts := bench.DriverOptions{Duration: c.duration, Span: c.thinSpan}
	for _, tc := range thinCases {
		row := thinRow{tc: tc}
		var raws, sparses, thins []bench.Result
		for i := 0; i < c.repeat; i++ {
			if ctx.Err() != nil {
				return rep, ctx.Err()
			}
			opts.Seed = uint64(i)
			r, err := bench.RunDriver(ctx, raw.Socket, tc.c, opts)
			if err != nil {
				row.rawErr = err
			} else {
				raws = append(raws, r)
			}
			sock, topts := pool.Socket, opts
			if tc.fresh {
				topts.Span = 0
				if r, err := runSparse(ctx, c, tc.c, topts); err != nil {
					row.sparseErr = err
				} else {
					sparses = append(sparses, r)
				}
				name := fmt.Sprintf("alloc%d", i)
				if err := pool.CreateVolume(name, allocVolumeSize); err != nil {
					row.thinErr = err
					continue
				}
				sock = pool.VolumeSocket(name)
			}
			t, err := bench.RunDriver(ctx, sock, tc.c, topts)
			if err != nil {
				row.thinErr = err
			} else {
				thins = append(thins, t)
			}
			if tc.fresh {
				if err := pool.DeleteVolume(fmt.Sprintf("alloc%d", i)); err != nil && row.thinErr == nil {
					row.thinErr = err
				}
			}
		}
		row.raw, row.sparse, row.thin = median(raws), median(sparses), median(thins)
		rep.rows = append(rep.rows, row)
		fmt.Fprintf(log, "thin     %-48s raw %8.0f IOPS  sparse raw %8.0f IOPS  thin %8.0f IOPS\n", tc.label, row.raw.IOPS, row.sparse.IOPS, row.thin.IOPS)
	}
	return rep, nil
}

// runSparse runs one case against `serve --raw` on a new sparse file of
// allocVolumeSize bytes, removed afterwards.
func runSparse(ctx context.Context, c config, bc bench.Case, opts bench.DriverOptions) (bench.Result, error) {
	path := filepath.Join(c.dir, "sparse.raw")
	os.Remove(path)
	f, err := os.Create(path)
	if err != nil {
		return bench.Result{}, err
	}
	err = f.Truncate(allocVolumeSize)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	defer os.Remove(path)
	if err != nil {
		return bench.Result{}, err
	}
	srv, err := bench.StartThinblk(c.thinblk, path, filepath.Join(c.dir, "thinblk-sparse.sock"), 1, false)
	if err != nil {
		return bench.Result{}, err
	}
	defer srv.Stop()
	return bench.RunDriver(ctx, srv.Socket, bc, opts)
}

func printThin(w io.Writer, c config, rep thinReport) {
	fmt.Fprintf(w, "\nthin volume vs serve --raw, all through the host page cache (same requests, one queue, QD32, span %d MiB, median of %d, %s per case)\n", rep.span>>20, c.repeat, c.duration)
	fmt.Fprintf(w, "reference: the written raw image; for writes that allocate, first a new sparse raw file of %d GiB, whose writes allocate host blocks as the pool's do\n\n", allocVolumeSize>>30)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "case\treference\tref IOPS\tmean us\tthin IOPS\tmean us\tthin/ref\ttarget\t")
	line := func(r thinRow, ref string, base bench.Result, err error, target string) {
		refCell, ratio := "error\t-", "-"
		if err == nil {
			refCell = fmt.Sprintf("%.0f\t%.1f", base.IOPS, base.MeanUs)
		}
		thinCell := "error\t-"
		if r.thinErr == nil {
			thinCell = fmt.Sprintf("%.0f\t%.1f", r.thin.IOPS, r.thin.MeanUs)
			if err == nil && base.IOPS > 0 {
				ratio = fmt.Sprintf("%.2f", r.thin.IOPS/base.IOPS)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t\n", r.tc.label, ref, refCell, thinCell, ratio, target)
	}
	for _, r := range rep.rows {
		target := fmt.Sprintf(">= %.2f", r.tc.target)
		if r.tc.fresh {
			line(r, "raw, new sparse file", r.sparse, r.sparseErr, target)
			line(r, "raw, written image", r.raw, r.rawErr, "(reported)")
			continue
		}
		line(r, "raw, written image", r.raw, r.rawErr, target)
	}
	tw.Flush()
	for _, r := range rep.rows {
		if r.rawErr != nil {
			fmt.Fprintf(w, "raw %s: %v\n", r.tc.label, r.rawErr)
		}
		if r.sparseErr != nil {
			fmt.Fprintf(w, "sparse raw %s: %v\n", r.tc.label, r.sparseErr)
		}
		if r.thinErr != nil {
			fmt.Fprintf(w, "thin %s: %v\n", r.tc.label, r.thinErr)
		}
	}
	if rep.metaErr != nil {
		fmt.Fprintf(w, "metadata cost: %v\n", rep.metaErr)
	} else if rep.mappedBlocks > 0 {
		fmt.Fprintf(w, "\nmetadata cost after mapping %d blocks of %d KiB: %.1f bytes on disk per mapped block (Pebble store), %.1f bytes of serve RSS growth per mapped block\n",
			rep.mappedBlocks, rep.blockSize>>10, rep.metaDiskPerBlock, rep.rssPerBlock)
	}
}

// json is the thin comparison in --json output.
func (rep thinReport) json() map[string]any {
	rows := []map[string]any{}
	for _, r := range rep.rows {
		row := map[string]any{"case": r.tc.label, "name": r.tc.c.Name(), "raw": r.raw, "thin": r.thin, "target_ratio": r.tc.target}
		if r.raw.IOPS > 0 && r.rawErr == nil && r.thinErr == nil {
			row["ratio"] = r.thin.IOPS / r.raw.IOPS
		}
		if r.tc.fresh {
			// The target applies to this ratio for writes that allocate.
			row["raw_sparse"] = r.sparse
			if r.sparse.IOPS > 0 && r.sparseErr == nil && r.thinErr == nil {
				row["ratio_sparse"] = r.thin.IOPS / r.sparse.IOPS
			}
		}
		rows = append(rows, row)
	}
	return map[string]any{
		"span_bytes": rep.span, "rows": rows, "mapped_blocks": rep.mappedBlocks,
		"metadata_disk_bytes_per_block": rep.metaDiskPerBlock, "rss_bytes_per_block": rep.rssPerBlock,
	}
}
