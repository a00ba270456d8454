package main

import (
	"strings"
	"testing"

	"github.com/thinblk/thinblk/internal/testenv"
)

// TestStreamTarget runs the stream target end to end at a tiny size:
// every timing sampled, the received snapshots verified, the table
// printed (the timings themselves are not asserted: the machine is shared).
func TestStreamTarget(t *testing.T) {
	dir := t.TempDir()
	bin := testenv.Thinblk(t)
	args := []string{"--thinblk", bin, "--dir", dir, "--targets", "stream", "--stream-size", "8M", "--stream-repeat", "2"}
	var doc struct {
		Stream struct {
			Full, Copy, CopySync, Incr, Empty []int64
			FullBytes, IncrBytes              int64
			ChangedBlocks                     int64
			Verified                          bool
		}
	}
	runJSON(t, args, &doc)
	s := doc.Stream
	if len(s.Full) != 2 || len(s.Copy) != 2 || len(s.Incr) != 2 || len(s.Empty) != 2 || !s.Verified {
		t.Fatalf("stream result %+v", s)
	}
	// 8 MiB of 64 KiB blocks: 128 blocks, 1% of them is 1.
	if s.ChangedBlocks != 1 || s.FullBytes < 8<<20 || s.IncrBytes < 64<<10 || s.IncrBytes > 80<<10 {
		t.Fatalf("stream sizes %+v", s)
	}
	table, _ := runOK(t, append(args, "--stream-repeat", "1")...)
	for _, row := range []string{"full send | receive", "incremental, 1 blocks changed", "incremental, nothing changed", "compared byte for byte and the destination checked: true"} {
		if !strings.Contains(table, row) {
			t.Fatalf("table lacks %q:\n%s", row, table)
		}
	}
}
