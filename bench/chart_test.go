package bench

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"strings"
	"testing"
)

// TestWriteChart draws two cases for four targets and checks that the SVG
// parses and holds every series (its legend entry and one mark per
// measured cell in each panel), and that a failed cell is left out.
func TestWriteChart(t *testing.T) {
	cases := []string{"randread-4k-qd1-q1", "randread-4k-qd32-q1"}
	targets := []string{"thinblk", "qsd", "null", "fio"}
	var results []Result
	for ti, tg := range targets {
		for ci, c := range cases {
			r := Result{Target: tg, Case: c, IOPS: float64(1000 * (ti + 1) * (ci + 1)), P99Us: float64(50 * (ti + 1))}
			if tg == "qsd" && ci == 1 {
				r = Result{Target: tg, Case: c, Err: "failed"}
			}
			results = append(results, r)
		}
	}
	var buf bytes.Buffer
	if err := WriteChart(&buf, "test run", cases, targets, results); err != nil {
		t.Fatal(err)
	}
	svg := buf.String()
	// Well-formed XML.
	dec := xml.NewDecoder(strings.NewReader(svg))
	for {
		if _, err := dec.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("SVG does not parse: %v", err)
		}
	}
	for _, want := range []string{"<svg", "test run", "IOPS", "p99 latency", cases[0], cases[1]} {
		if !strings.Contains(svg, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	for _, tg := range targets {
		if n := strings.Count(svg, ">"+chartLabels[tg]+"<"); n != 1 {
			t.Errorf("legend entry %q appears %d times, want 1", chartLabels[tg], n)
		}
	}
	// Marks: circles (thinblk), rings (null) are drawn as arcs; count the
	// marks of one colour instead. thinblk: 2 cases x 2 panels + 1 legend
	// mark; qsd: 1 case x 2 panels + 1 legend mark.
	count := func(tg string) int {
		r, g, b, _ := chartStyles[tg].color.RGBA()
		return strings.Count(svg, fmt.Sprintf("fill:#%02X%02X%02X", r>>8, g>>8, b>>8))
	}
	if thin, qsd := count("thinblk"), count("qsd"); thin != 5 || qsd != 3 {
		t.Errorf("filled marks: thinblk %d (want 5), qsd %d (want 3: its failed cell left out)", thin, qsd)
	}
	if err := WriteChart(io.Discard, "", nil, targets, results); err == nil {
		t.Errorf("no error without cases")
	}
	if err := WriteChart(io.Discard, "", []string{"other"}, targets, results); err == nil {
		t.Errorf("no error when no result matches")
	}
}
