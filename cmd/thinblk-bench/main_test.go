package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"1G": 1 << 30, "256M": 256 << 20, "2048K": 2 << 20, "1048576": 1 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1G", "1T", "100K", "abc"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q): no error", in)
		}
	}
}

func TestSelectCases(t *testing.T) {
	cs, err := selectCases("randread-4k-qd32-q1,write-1m")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range cs {
		names = append(names, c.Name())
	}
	if strings.Join(names, " ") != "randread-4k-qd32-q1 write-1m-qd8-q1" {
		t.Fatalf("selected %v", names)
	}
	if _, err := selectCases("nonsense"); err == nil {
		t.Fatalf("no error for an unknown case")
	}
}

// TestRunAllTargets builds thinblk and runs one short case on every target
// end to end, with JSON output.
func TestRunAllTargets(t *testing.T) {
	targets := "thinblk,qsd,fio"
	if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
		if os.Getenv("THINBLK_SKIP_QSD") != "1" {
			t.Fatalf("qemu-storage-daemon not installed (THINBLK_SKIP_QSD=1 leaves it out): %v", err)
		}
		targets = "thinblk,fio"
	}
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatalf("fio not installed: %v", err)
	}
	dir := t.TempDir()
	bin := buildThinblk(t, dir)
	var doc struct {
		Results []struct {
			Target, Case string
			IOPS         float64
			Error        string
		}
	}
	stderr := runJSON(t, []string{"--thinblk", bin, "--dir", dir, "--size", "16M", "--duration", "300ms",
		"--cases", "randread-4k-qd32-q1", "--cache", "buffered", "--targets", targets}, &doc)
	got := map[string]bool{}
	for _, r := range doc.Results {
		if r.Error != "" || r.IOPS <= 0 || r.Case != "randread-4k-qd32-q1" {
			t.Errorf("result %+v", r)
		}
		got[r.Target] = true
	}
	if !got["thinblk"] || !got["fio"] || strings.Contains(targets, "qsd") && !got["qsd"] {
		t.Fatalf("targets measured: %v\n%s", got, stderr)
	}
}

// TestThinTarget runs the thin-volume comparison at a tiny size and checks
// every row was measured on both sides and the metadata cost was read.
func TestThinTarget(t *testing.T) {
	dir := t.TempDir()
	bin := buildThinblk(t, dir)
	var doc struct {
		Thin struct {
			Rows []struct {
				Name        string
				Raw, Thin   struct{ IOPS float64 }
				RawSparse   struct{ IOPS float64 } `json:"raw_sparse"`
				Ratio       float64
				RatioSparse float64 `json:"ratio_sparse"`
			}
			MappedBlocks uint64 `json:"mapped_blocks"`
		}
	}
	stderr := runJSON(t, []string{"--thinblk", bin, "--dir", dir, "--size", "16M", "--thin-span", "8M", "--duration", "300ms",
		"--targets", "thin"}, &doc)
	if len(doc.Thin.Rows) != 3 {
		t.Fatalf("%d thin rows, want 3: %+v", len(doc.Thin.Rows), doc.Thin.Rows)
	}
	for i, r := range doc.Thin.Rows {
		if r.Raw.IOPS <= 0 || r.Thin.IOPS <= 0 || r.Ratio <= 0 {
			t.Errorf("row %+v not measured\n%s", r, stderr)
		}
		// The allocating row is also compared with a sparse raw file.
		if sparse := r.RawSparse.IOPS > 0 && r.RatioSparse > 0; sparse != (i == 2) {
			t.Errorf("row %d (%s): sparse reference measured %v, want it only for the allocating row", i, r.Name, sparse)
		}
	}
	if !strings.HasSuffix(doc.Thin.Rows[2].Name, "-flush32") {
		t.Errorf("allocating row %q does not flush", doc.Thin.Rows[2].Name)
	}
	// 8 MiB filled in 64 KiB blocks.
	if doc.Thin.MappedBlocks != 128 {
		t.Errorf("mapped blocks after fill: %d, want 128", doc.Thin.MappedBlocks)
	}
}
