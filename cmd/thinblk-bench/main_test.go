package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/thinblk/thinblk/bench"

	"github.com/thinblk/thinblk/internal/testenv"
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
	targets := "thinblk,qsd,null,fio"
	if _, err := exec.LookPath("qemu-storage-daemon"); err != nil {
		if os.Getenv("THINBLK_SKIP_QSD") != "1" {
			t.Fatalf("qemu-storage-daemon not installed (THINBLK_SKIP_QSD=1 leaves it out): %v", err)
		}
		targets = "thinblk,null,fio"
	}
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatalf("fio not installed: %v", err)
	}
	dir := t.TempDir()
	bin := testenv.Thinblk(t)
	var doc struct {
		Results []struct {
			Target, Case string
			IOPS         float64
			Error        string
			ServerCPU    float64 `json:"server_cpu_us_per_op"`
			DriverCPU    float64 `json:"driver_cpu_us_per_op"`
			Switches     float64 `json:"server_switches_per_op"`
		}
	}
	stderr := runJSON(t, []string{"--thinblk", bin, "--dir", dir, "--size", "16M", "--duration", "300ms",
		"--cases", "randread-4k-qd32-q1", "--cache", "buffered", "--targets", targets,
		"--alt", "base=" + bin, "--svg", filepath.Join(dir, "bench.svg")}, &doc)
	got := map[string]bool{}
	for _, r := range doc.Results {
		if r.Error != "" || r.IOPS <= 0 || r.Case != "randread-4k-qd32-q1" {
			t.Errorf("result %+v", r)
		}
		// The null target serves from the same binary, so it must at least
		// report the driver's cost like the other back-ends.
		if r.Target == "null" && (r.ServerCPU <= 0 && r.DriverCPU <= 0) {
			t.Errorf("null result without CPU figures: %+v", r)
		}
		// A back-end that sleeps between kicks switches out at times.
		if r.Target == "thinblk" && r.Switches <= 0 {
			t.Errorf("thinblk result without context switches: %+v", r)
		}
		got[r.Target] = true
	}
	if !got["thinblk"] || !got["base"] || !got["fio"] || !got["null"] || strings.Contains(targets, "qsd") && !got["qsd"] {
		t.Fatalf("targets measured: %v\n%s", got, stderr)
	}
	// The chart holds every measured target's series (its legend entry)
	// and the case.
	svg, err := os.ReadFile(filepath.Join(dir, "bench.svg"))
	if err != nil {
		t.Fatalf("chart: %v", err)
	}
	for _, want := range []string{">thinblk serve --raw<", ">thinblk serve --null (no I/O)<", ">fio on the host file<"} {
		if n := strings.Count(string(svg), want); n != 1 {
			t.Errorf("chart has %d of %q, want 1", n, want)
		}
	}
	if !strings.Contains(string(svg), "randread-4k-qd32-q1") {
		t.Errorf("chart lacks the case")
	}
}

// TestAltFlag: --alt takes NAME=PATH, repeatedly, and refuses a name that
// is already a target's or given twice.
func TestAltFlag(t *testing.T) {
	var alts []altBuild
	f := altFlag{&alts}
	for _, v := range []string{"base=/x/thinblk", "locked=/y/thinblk"} {
		if err := f.Set(v); err != nil {
			t.Fatalf("Set(%q): %v", v, err)
		}
	}
	if len(alts) != 2 || alts[0] != (altBuild{"base", "/x/thinblk"}) || alts[1].name != "locked" {
		t.Fatalf("alts %+v", alts)
	}
	for _, v := range []string{"base=/z", "qsd=/z", "thinblk=/z", "noequals", "=/z", "a=", "a,b=/z"} {
		if err := f.Set(v); err == nil {
			t.Errorf("Set(%q): no error", v)
		}
	}
	c := config{alts: alts}
	if got := strings.Join(c.deviceOrder(), ","); got != "thinblk,base,locked,qsd,null,fio" {
		t.Errorf("device order %s", got)
	}
}

// TestThinTarget runs the thin-volume comparison at a tiny size and checks
// every row was measured on both sides and the metadata cost was read.
func TestThinTarget(t *testing.T) {
	dir := t.TempDir()
	bin := testenv.Thinblk(t)
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

// TestPrintTableNull: the null target gets its own columns and the
// thinblk/null ratio, between qemu-storage-daemon's and fio's.
func TestPrintTableNull(t *testing.T) {
	c := config{cases: []bench.Case{{Op: bench.RandRead, BlockSize: 4096, QueueDepth: 32, Queues: 1}},
		targets: map[string]bool{"thinblk": true, "qsd": true, "null": true, "fio": true}, repeat: 1, cache: "direct"}
	name := c.cases[0].Name()
	var out bytes.Buffer
	printTable(&out, c, []bench.Result{
		{Target: "thinblk", Case: name, IOPS: 1000, MeanUs: 32, P99Us: 50, ServerCPUUs: 3, DriverCPUUs: 2},
		{Target: "qsd", Case: name, IOPS: 500, MeanUs: 64, P99Us: 90},
		{Target: "null", Case: name, IOPS: 4000, MeanUs: 8, P99Us: 12, ServerCPUUs: 0.5, DriverCPUUs: 1.5},
		{Target: "fio", Case: name, IOPS: 2000, MeanUs: 16, P99Us: 20},
	})
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	header, row := strings.Fields(lines[len(lines)-2]), strings.Fields(lines[len(lines)-1])
	want := map[string]string{"null IOPS": "4000", "thinblk/qsd": "2.00", "thinblk/fio": "0.50", "thinblk/null": "0.25"}
	// Header cells may hold a space ("null IOPS"): map them by position.
	cols := []string{}
	for i := 0; i < len(header); i++ {
		if header[i] != "case" && i+1 < len(header) && header[i+1] == "IOPS" {
			cols = append(cols, header[i]+" IOPS")
			i++
			continue
		}
		cols = append(cols, header[i])
	}
	if len(cols) != len(row) {
		t.Fatalf("%d columns, %d cells:\n%s", len(cols), len(row), out.String())
	}
	for i, col := range cols {
		if w, ok := want[col]; ok {
			if row[i] != w {
				t.Errorf("%s = %s, want %s\n%s", col, row[i], w, out.String())
			}
			delete(want, col)
		}
	}
	if len(want) != 0 {
		t.Errorf("columns missing: %v\n%s", want, out.String())
	}
}

// TestDurationFlag: a duration fio cannot run for (0, negative, under its
// millisecond unit) is refused before anything starts; fio ran for ever.
func TestDurationFlag(t *testing.T) {
	for _, d := range []string{"0", "-1s", "500us"} {
		dir := t.TempDir()
		var out, errOut strings.Builder
		err := run([]string{"--dir", dir, "--targets", "fio", "--duration", d}, &out, &errOut)
		if err == nil || !strings.Contains(err.Error(), "--duration") {
			t.Errorf("--duration %s: %v, want an error naming --duration", d, err)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("--duration %s: the refused run made %d files", d, len(entries))
		}
	}
}

// TestStrayArgument: a word that is not a flag stops Go's flag parsing, so
// the flags after it were ignored; it is refused instead.
func TestStrayArgument(t *testing.T) {
	dir := t.TempDir()
	var out, errOut strings.Builder
	err := run([]string{"--dir", dir, "--targets", "null", "thinblk", "--repeat", "3"}, &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), `unexpected argument "thinblk"`) {
		t.Errorf("a stray argument: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("the refused run made %d files", len(entries))
	}
}
