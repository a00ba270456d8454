package main

import (
	"io"
	"strings"
	"testing"
)

func TestParseCount(t *testing.T) {
	for in, want := range map[string]uint64{"1k": 1000, "100k": 100_000, "10M": 10_000_000, "7": 7, " 2K": 2000} {
		if got, err := parseCount(in); err != nil || got != want {
			t.Errorf("parseCount(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "k", "-1", "1G", "1.5M", "99999999M"} {
		if _, err := parseCount(in); err == nil {
			t.Errorf("parseCount(%q): no error", in)
		}
	}
}

// TestSnapshotTarget runs the snapshot target end to end on small
// volumes: every size measured, checked and its deletes timed (the
// timings themselves are not asserted: the machine is shared), in the
// table and in JSON.
func TestSnapshotTarget(t *testing.T) {
	dir := t.TempDir()
	args := []string{"--dir", dir, "--targets", "snapshot", "--snap-sizes", "1k,5k", "--snap-samples", "2", "--snap-block-size", "4K"}
	var doc struct {
		Snapshot []struct {
			Mapped     uint64    `json:"mapped_blocks"`
			BlockSize  uint32    `json:"block_size"`
			Check      float64   `json:"check_ms"`
			Snapshots  []float64 `json:"snapshot_ms"`
			Clones     []float64 `json:"clone_ms"`
			Deletes    []float64 `json:"delete_ms"`
			StampsRead int       `json:"stamps_read"`
			Error      string
		}
	}
	runJSON(t, args, &doc)
	if len(doc.Snapshot) != 2 || doc.Snapshot[0].Mapped != 1000 || doc.Snapshot[1].Mapped != 5000 {
		t.Fatalf("rows %+v", doc.Snapshot)
	}
	for _, r := range doc.Snapshot {
		if r.Error != "" || r.BlockSize != 4096 || r.Check <= 0 || len(r.Snapshots) != 2 || len(r.Clones) != 2 ||
			len(r.Deletes) != 4 || r.StampsRead == 0 || r.Snapshots[0] <= 0 {
			t.Errorf("row %+v", r)
		}
	}
	out, _ := runOK(t, append(args, "--snap-delete-max", "0")...)
	if !strings.Contains(out, "snapshot creation against mapped blocks") || !strings.Contains(out, "\n           1000  ") ||
		!strings.Contains(out, "\n           5000  ") {
		t.Fatalf("table:\n%s", out)
	}
	for _, bad := range []string{"--snap-sizes=1x", "--snap-block-size=3K", "--snap-samples=0", "--snap-check-max=z"} {
		if err := run([]string{"--dir", dir, "--targets", "snapshot", bad}, io.Discard, io.Discard); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}
