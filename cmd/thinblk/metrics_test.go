package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/thinblk/thinblk/internal/latency"
	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/vhostuser/frontend"
	"github.com/thinblk/thinblk/virtio/blk"

	"github.com/thinblk/thinblk/internal/testenv"
)

// metricsServe is a `thinblk serve ... --metrics ADDR` process.
type metricsServe struct {
	cmd    *exec.Cmd
	logs   *testenv.Buffer
	client *http.Client
	base   string // URL without the path
}

// startMetricsServe starts serve with args, waits for the socket sock and
// for the metrics listener, and returns how to scrape it.
func startMetricsServe(t *testing.T, bin, sock string, args ...string) *metricsServe {
	t.Helper()
	cmd, logs := startServe(t, bin, args...)
	waitForSocket(t, sock)
	s := &metricsServe{cmd: cmd, logs: logs}
	addrRE := regexp.MustCompile(`msg="serving metrics" addr=(\S+)`)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if m := addrRE.FindStringSubmatch(logs.String()); m != nil {
			addr := m[1]
			if path, ok := strings.CutPrefix(addr, "unix:"); ok {
				s.client = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, "unix", path)
				}}}
				s.base = "http://thinblk"
			} else {
				s.client, s.base = http.DefaultClient, "http://"+addr
			}
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not log its metrics address:\n%s", logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// scrape fetches /metrics in the text format and parses it with the
// Prometheus text parser.
func (s *metricsServe) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := s.client.Get(s.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, b)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse the exposition: %v", err)
	}
	return fams
}

// scrapeProto fetches /metrics as delimited protobuf, as a Prometheus
// server that takes native histograms asks for it.
func (s *metricsServe) scrapeProto(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	req, _ := http.NewRequest("GET", s.base+"/metrics", nil)
	req.Header.Set("Accept", `application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited`)
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	dec := expfmt.NewDecoder(resp.Body, expfmt.ResponseFormat(resp.Header))
	fams := map[string]*dto.MetricFamily{}
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decode protobuf exposition (%s): %v", resp.Header.Get("Content-Type"), err)
		}
		fams[mf.GetName()] = &mf
	}
	return fams
}

// value finds the sample of family name whose labels include want
// (label=value pairs); ok is false if there is none.
func value(fams map[string]*dto.MetricFamily, name string, want ...string) (v float64, ok bool) {
	m := find(fams, name, want...)
	if m == nil {
		return 0, false
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue(), true
	case m.Gauge != nil:
		return m.Gauge.GetValue(), true
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount()), true
	}
	return 0, false
}

func find(fams map[string]*dto.MetricFamily, name string, want ...string) *dto.Metric {
	mf := fams[name]
	if mf == nil {
		return nil
	}
next:
	for _, m := range mf.Metric {
		for _, kv := range want {
			k, v, _ := strings.Cut(kv, "=")
			found := false
			for _, lp := range m.Label {
				if lp.GetName() == k && lp.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		return m
	}
	return nil
}

// expectation is one sample the workload determines exactly.
type expectation struct {
	name   string
	labels []string
	want   float64
}

// issued tallies what the workload sent, by type: the exporter must
// report exactly these.
type issued struct {
	ok, bytes     [blk.NumOps]uint64
	ioerr, unsupp [blk.NumOps]uint64
}

func (w *issued) expectations(volume string) []expectation {
	vl := "volume=" + volume
	var e []expectation
	add := func(name string, v uint64, labels ...string) {
		e = append(e, expectation{name, append([]string{vl}, labels...), float64(v)})
	}
	add("thinblk_volume_reads_completed_total", w.ok[blk.OpRead])
	add("thinblk_volume_read_bytes_total", w.bytes[blk.OpRead])
	add("thinblk_volume_writes_completed_total", w.ok[blk.OpWrite])
	add("thinblk_volume_written_bytes_total", w.bytes[blk.OpWrite])
	add("thinblk_volume_discards_completed_total", w.ok[blk.OpDiscard])
	add("thinblk_volume_discarded_bytes_total", w.bytes[blk.OpDiscard])
	add("thinblk_volume_write_zeroes_completed_total", w.ok[blk.OpWriteZeroes])
	add("thinblk_volume_zeroed_bytes_total", w.bytes[blk.OpWriteZeroes])
	add("thinblk_volume_flush_requests_total", w.ok[blk.OpFlush])
	for op := range blk.NumOps {
		add("thinblk_volume_request_errors_total", w.ioerr[op], "op="+op.String(), "status=ioerr")
		add("thinblk_volume_request_errors_total", w.unsupp[op], "op="+op.String(), "status=unsupp")
		add("thinblk_volume_request_duration_seconds", w.ok[op]+w.ioerr[op]+w.unsupp[op], "op="+op.String())
	}
	return e
}

// runWorkload sends a known mix over two queues, failing requests
// included, and tallies it.
func runWorkload(t *testing.T, d *frontend.Disk, w *issued) {
	t.Helper()
	capSectors := d.Capacity() / blk.SectorSize
	before := *w
	exec := func(op blk.Op, typ uint32, sector uint64, data []byte, bytes uint64) {
		t.Helper()
		st, err := d.Exec(typ, sector, data)
		if err != nil {
			t.Fatalf("%v request: %v", op, err)
		}
		switch st {
		case blk.StatusOK:
			w.ok[op]++
			w.bytes[op] += bytes
		case blk.StatusIOErr:
			w.ioerr[op]++
		case blk.StatusUnsupp:
			w.unsupp[op]++
		}
	}
	for i := range 10 {
		exec(blk.OpWrite, blk.TypeOut, uint64(i)*128, bytes.Repeat([]byte{byte(i)}, 4096), 4096)
	}
	for i := range 3 {
		exec(blk.OpWrite, blk.TypeOut, 4096+uint64(i)*128, make([]byte, 65536), 65536)
	}
	for i := range 7 {
		exec(blk.OpRead, blk.TypeIn, uint64(i)*16, make([]byte, 8192), 8192)
	}
	for range 4 {
		exec(blk.OpFlush, blk.TypeFlush, 0, nil, 0)
	}
	seg := func(sector uint64, sectors, flags uint32) []byte {
		return frontend.EncodeSegments(frontend.DiscardSegment{Sector: sector, NumSectors: sectors, Flags: flags})
	}
	exec(blk.OpDiscard, blk.TypeDiscard, 0, seg(8192, 2048, 0), 1<<20)
	exec(blk.OpDiscard, blk.TypeDiscard, 0, seg(16384, 2048, 0), 1<<20)
	exec(blk.OpWriteZeroes, blk.TypeWriteZeroes, 0, seg(24576, 256, 0), 128<<10)
	exec(blk.OpWriteZeroes, blk.TypeWriteZeroes, 0, seg(32768, 256, blk.DiscardFlagUnmap), 128<<10)
	exec(blk.OpGetID, blk.TypeGetID, 0, make([]byte, blk.IDBytes), blk.IDBytes)
	// Requests that fail, on purpose: reads and a write past the end
	// (IOERR), a discard with the unmap flag and an unknown type (UNSUPP).
	exec(blk.OpRead, blk.TypeIn, capSectors, make([]byte, 4096), 0)
	exec(blk.OpRead, blk.TypeIn, capSectors-1, make([]byte, 4096), 0)
	exec(blk.OpWrite, blk.TypeOut, capSectors, make([]byte, 4096), 0)
	exec(blk.OpDiscard, blk.TypeDiscard, 0, seg(0, 128, blk.DiscardFlagUnmap), 0)
	exec(blk.OpOther, 99, 0, nil, 0)
	if w.ioerr[blk.OpRead]-before.ioerr[blk.OpRead] != 2 || w.ioerr[blk.OpWrite]-before.ioerr[blk.OpWrite] != 1 ||
		w.unsupp[blk.OpDiscard]-before.unsupp[blk.OpDiscard] != 1 || w.unsupp[blk.OpOther]-before.unsupp[blk.OpOther] != 1 {
		t.Fatalf("the failing requests did not fail as meant: %+v", *w)
	}
}

// checkExpectations compares a scrape with the workload, exactly.
func checkExpectations(t *testing.T, fams map[string]*dto.MetricFamily, exps []expectation) {
	t.Helper()
	for _, e := range exps {
		got, ok := value(fams, e.name, e.labels...)
		if !ok {
			t.Errorf("%s%v: not in the scrape", e.name, e.labels)
		} else if got != e.want {
			t.Errorf("%s%v = %v, want %v", e.name, e.labels, got, e.want)
		}
	}
}

// checkNative: the protobuf exposition carries the latency histograms as
// native histograms (schema 2) whose buckets add up to their count.
func checkNative(t *testing.T, fams map[string]*dto.MetricFamily, volume string) {
	t.Helper()
	m := find(fams, "thinblk_volume_request_duration_seconds", "volume="+volume, "op=write")
	if m == nil || m.Histogram == nil {
		t.Fatal("no write latency histogram in the protobuf exposition")
	}
	h := m.Histogram
	if h.GetSchema() != 2 || len(h.PositiveSpan) == 0 {
		t.Fatalf("write latency: schema %d, %d spans: not a native histogram", h.GetSchema(), len(h.PositiveSpan))
	}
	var n, count int64
	for _, d := range h.PositiveDelta {
		count += d
		n += count
	}
	if uint64(n)+h.GetZeroCount() != h.GetSampleCount() || len(h.Bucket) == 0 {
		t.Errorf("write latency: native buckets hold %d (+%d zero), count %d, %d classic buckets", n, h.GetZeroCount(), h.GetSampleCount(), len(h.Bucket))
	}
	if h.GetSampleSum() <= 0 || math.IsNaN(h.GetSampleSum()) {
		t.Errorf("write latency sum %v", h.GetSampleSum())
	}
}

// TestServeMetricsRaw: serve --raw with --metrics on TCP; a known workload
// through the Go front-end on two queues, and the scrape agrees exactly.
func TestServeMetricsRaw(t *testing.T) {
	bin := buildThinblk(t)
	dir := t.TempDir()
	img := newImage(t, dir, 64<<20)
	sock := filepath.Join(dir, "disk.sock")
	s := startMetricsServe(t, bin, sock, "--raw", img, "--socket", sock, "--metrics", "127.0.0.1:0")
	fams := s.scrape(t)
	if v, ok := value(fams, "thinblk_frontend_connected", "volume=disk.img"); !ok || v != 0 {
		t.Errorf("before any front-end: connected %v (present %v), want 0", v, ok)
	}
	for _, family := range []string{"go_goroutines", "process_resident_memory_bytes"} {
		if fams[family] == nil {
			t.Errorf("no %s: the Go runtime and process collectors are missing", family)
		}
	}
	var w issued
	for round := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		d, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		runWorkload(t, d, &w)
		fams = s.scrape(t)
		checkExpectations(t, fams, w.expectations("disk.img"))
		for name, want := range map[string]float64{"thinblk_frontend_connected": 1, "thinblk_frontend_reconnects_total": float64(round)} {
			if v, _ := value(fams, name, "volume=disk.img"); v != want {
				t.Errorf("round %d: %s = %v, want %v", round, name, v, want)
			}
		}
		d.Close()
		// The server notices the front-end is gone before it takes the
		// next one (a second connection meanwhile is refused).
		deadline := time.Now().Add(10 * time.Second)
		for v, _ := value(s.scrape(t), "thinblk_frontend_connected", "volume=disk.img"); v != 0; v, _ = value(s.scrape(t), "thinblk_frontend_connected", "volume=disk.img") {
			if time.Now().After(deadline) {
				t.Fatal("thinblk_frontend_connected stays 1 after the front-end closed")
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	checkNative(t, s.scrapeProto(t), "disk.img")
}

// TestServeMetricsPool: a pool serve with --metrics on a unix socket: the
// volume counters agree exactly with the workload, pool space agrees with
// status, QMP's query-volume-stats gives the same numbers, and a write
// waiting for space shows until the pool grows.
func TestServeMetricsPool(t *testing.T) {
	bin := buildThinblk(t)
	dir := t.TempDir()
	pool := filepath.Join(dir, "pool")
	mustThinblk(t, "pool", "create", pool, "--size", "4M", "--block-size", "64K", "--no-space", "queue", "--no-space-timeout", "60s")
	mustThinblk(t, "volume", "create", pool, "vm1", "--size", "64M")
	sock := filepath.Join(pool, "vm1.sock")
	s := startMetricsServe(t, bin, sock, pool, "--metrics", "unix:"+filepath.Join(dir, "metrics.sock"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var w issued
	runWorkload(t, d, &w)
	fams := s.scrape(t)
	checkExpectations(t, fams, w.expectations("vm1"))

	st := statusJSON(t, pool)
	pl := "pool=" + st.Pool.Dir
	for name, want := range map[string]uint64{
		"thinblk_pool_size_bytes": st.Pool.SizeBytes, "thinblk_pool_allocated_bytes": st.Pool.AllocatedBytes,
		"thinblk_pool_reserved_bytes": st.Pool.ReservedBytes, "thinblk_pool_free_bytes": st.Pool.FreeBytes,
		"thinblk_pool_provisioned_bytes": st.Volumes[0].ProvisionedBytes,
	} {
		if v, ok := value(fams, name, pl); !ok || v != float64(want) {
			t.Errorf("%s = %v (present %v), status says %d", name, v, ok, want)
		}
	}
	if v, _ := value(fams, "thinblk_volume_mapped_bytes", "volume=vm1"); v != float64(st.Volumes[0].MappedBytes) || v == 0 {
		t.Errorf("thinblk_volume_mapped_bytes = %v, status says %d", v, st.Volumes[0].MappedBytes)
	}
	if v, _ := value(fams, "thinblk_pool_commits_total", pl); v < 1 {
		t.Errorf("thinblk_pool_commits_total = %v after 4 flushes that followed writes", v)
	}

	// QMP: the same numbers.
	c, err := qmp.Dial(ctx, filepath.Join(pool, defaultControlSoc))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var reply struct {
		Volumes []volumeStatsJSON `json:"volumes"`
	}
	if err := c.Execute(ctx, "query-volume-stats", map[string]any{"names": []string{"vm1"}}, &reply); err != nil {
		t.Fatal(err)
	}
	if len(reply.Volumes) != 1 || !reply.Volumes[0].Connected {
		t.Fatalf("query-volume-stats: %+v", reply)
	}
	for op := range blk.NumOps {
		got := reply.Volumes[0].Ops[op.String()]
		want := opStatsJSON{Completed: w.ok[op], Bytes: w.bytes[op], IOErrors: w.ioerr[op], Unsupported: w.unsupp[op],
			LatencyCount: w.ok[op] + w.ioerr[op] + w.unsupp[op], LatencySumSeconds: got.LatencySumSeconds}
		if got != want {
			t.Errorf("query-volume-stats %s: %+v, want %+v", op, got, want)
		}
	}
	if err := c.Execute(ctx, "query-volume-stats", map[string]any{"names": []string{"nope"}}, &reply); err == nil {
		t.Error("query-volume-stats for a volume that is not exported succeeded")
	}

	// Fill the pool; the next write that needs a block waits for space.
	free := st.Pool.FreeBytes
	fill := make([]byte, 64<<10)
	off := int64(8 << 20)
	for ; free > 0; free -= 64 << 10 {
		if _, err := d.WriteAt(fill, off); err != nil {
			t.Fatal(err)
		}
		w.ok[blk.OpWrite]++
		w.bytes[blk.OpWrite] += 64 << 10
		off += 64 << 10
	}
	waited := make(chan error, 1)
	go func() {
		_, err := d.WriteAt(fill, off)
		waited <- err
	}()
	waitFor := func(what string, name, label string, want float64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			v, _ := value(s.scrape(t), name, label)
			if v == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s{%s} = %v, want %v", what, name, label, v, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitFor("write into a full pool", "thinblk_volume_requests_waiting_for_space", "volume=vm1", 1)
	waitFor("write into a full pool", "thinblk_pool_out_of_space", pl, 1)
	if v, _ := value(s.scrape(t), "thinblk_volume_io_now", "volume=vm1"); v != 1 {
		t.Errorf("thinblk_volume_io_now = %v with one write waiting, want 1", v)
	}
	mustThinblk(t, "pool", "grow", pool, "--size", "8M")
	if err := <-waited; err != nil {
		t.Fatalf("the waiting write failed after pool grow: %v", err)
	}
	w.ok[blk.OpWrite]++
	w.bytes[blk.OpWrite] += 64 << 10
	fams = s.scrape(t)
	checkExpectations(t, fams, append(w.expectations("vm1"),
		expectation{"thinblk_volume_requests_waiting_for_space", []string{"volume=vm1"}, 0},
		expectation{"thinblk_pool_out_of_space", []string{pl}, 0},
		expectation{"thinblk_pool_size_bytes", []string{pl}, 8 << 20}))
	checkNative(t, s.scrapeProto(t), "vm1")
	t.Run("monitoring files", func(t *testing.T) { checkMonitoringFiles(t, fams) })
}

// checkMonitoringFiles: every metric the Grafana dashboard's panels and the
// alert rules query is one this serve really exposes (histogram series by
// their family).
func checkMonitoringFiles(t *testing.T, fams map[string]*dto.MetricFamily) {
	var exprs []string
	b, err := os.ReadFile("../../monitoring/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash any
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || k == "definition") {
					exprs = append(exprs, s)
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dash)
	panels := 0
	for _, p := range dash.(map[string]any)["panels"].([]any) {
		if p.(map[string]any)["type"] != "row" {
			panels++
		}
	}
	if panels < 10 || len(exprs) < panels {
		t.Fatalf("dashboard: %d panels, %d queries: not the dashboard this test expects", panels, len(exprs))
	}
	rules, err := os.ReadFile("../../monitoring/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	alerts := 0
	for _, line := range strings.Split(string(rules), "\n") {
		if e, ok := strings.CutPrefix(strings.TrimSpace(line), "expr:"); ok {
			exprs = append(exprs, e)
			alerts++
		}
	}
	if alerts < 4 {
		t.Fatalf("alerts.yml: %d expressions", alerts)
	}
	nameRE := regexp.MustCompile(`\b(?:thinblk|go|process)_[a-z0-9_]+`)
	used := map[string]bool{}
	for _, e := range exprs {
		for _, name := range nameRE.FindAllString(e, -1) {
			used[name] = true
		}
	}
	for name := range used {
		if fams[name] != nil {
			continue
		}
		base := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			base = strings.TrimSuffix(base, suffix)
		}
		if mf := fams[base]; mf != nil && base != name && mf.GetType() == dto.MetricType_HISTOGRAM {
			continue
		}
		t.Errorf("the monitoring files query %s, which serve does not expose", name)
	}
	t.Logf("%d metric names in %d dashboard and alert queries, all served", len(used), len(exprs))
}

func TestServeMetricsFlagErrors(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"unix:", "empty socket path"},
		{"127.0.0.1", "want HOST:PORT"},
		{"http://127.0.0.1:9470", "not a URL"},
		{"127.0.0.1:http", "not a number"},
		{"127.0.0.1:70000", "not a number"},
		{":-1", "not a number"},
	} {
		var stdout, stderr bytes.Buffer
		args := []string{"serve", "--raw", "x.img", "--socket", "x.sock", "--metrics", tc.addr}
		if code := run(args, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("--metrics %q: exit %d, stderr %q; want exit 2 and %q", tc.addr, code, stderr.String(), tc.want)
		}
	}
	// An address that is taken: serve fails at start with the reason.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dir := t.TempDir()
	img := filepath.Join(dir, "d.img")
	os.WriteFile(img, make([]byte, 1<<20), 0o644)
	var stdout, stderr bytes.Buffer
	code := run([]string{"serve", "--raw", img, "--socket", filepath.Join(dir, "s.sock"), "--metrics", ln.Addr().String()}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "metrics: listen tcp") || !strings.Contains(stderr.String(), "address already in use") {
		t.Errorf("--metrics on a taken port: exit %d, stderr %q", code, stderr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "s.sock")); err == nil {
		t.Error("the disk socket is left behind after the metrics listener failed")
	}
}

// decodeNative expands native histogram spans and deltas into counts by
// bucket key.
func decodeNative(spans []*dto.BucketSpan, deltas []int64) map[int]uint64 {
	m := map[int]uint64{}
	key, i := 0, 0
	var count int64
	for n, s := range spans {
		if n == 0 {
			key = int(s.GetOffset())
		} else {
			key += int(s.GetOffset())
		}
		for range s.GetLength() {
			count += deltas[i]
			if count != 0 {
				m[key] = uint64(count)
			}
			i++
			key++
		}
	}
	return m
}

// TestNativeHistogramEncoding: the exporter's spans and deltas say what
// the latency snapshot holds, as client_golang's own constant native
// histogram encodes the same buckets.
func TestNativeHistogramEncoding(t *testing.T) {
	var h latency.Histogram
	for _, d := range []time.Duration{500, 10 * time.Microsecond, 11 * time.Microsecond, 40 * time.Microsecond,
		time.Millisecond, time.Millisecond, 2 * time.Millisecond, 3 * time.Second} {
		h.Observe(d)
	}
	s := h.Snapshot()
	want := s.Buckets()
	m := newHistogram(descLatency, &s, "v", "read")
	var pb dto.Metric
	if err := m.Write(&pb); err != nil {
		t.Fatal(err)
	}
	got := decodeNative(pb.Histogram.PositiveSpan, pb.Histogram.PositiveDelta)
	if fmt.Sprint(got) != fmt.Sprint(want) || pb.Histogram.GetZeroCount() != 1 || pb.Histogram.GetSampleCount() != 8 {
		t.Fatalf("encoded buckets %v (zero %d, count %d), snapshot holds %v (zero 1, count 8)", got, pb.Histogram.GetZeroCount(), pb.Histogram.GetSampleCount(), want)
	}
	pos := map[int]int64{}
	for k, c := range want {
		pos[k] = int64(c)
	}
	ref, err := prometheus.NewConstNativeHistogram(descLatency, s.Count(), s.SumSeconds, pos, nil, s.Zero, latency.Schema, latency.ZeroThreshold, time.Time{}, "v", "read")
	if err != nil {
		t.Fatal(err)
	}
	var rpb dto.Metric
	if err := ref.Write(&rpb); err != nil {
		t.Fatal(err)
	}
	if r := decodeNative(rpb.Histogram.PositiveSpan, rpb.Histogram.PositiveDelta); fmt.Sprint(r) != fmt.Sprint(got) {
		t.Fatalf("client_golang encodes %v, the exporter %v", r, got)
	}
	// Classic buckets: cumulative and exact.
	var prev uint64
	for _, b := range pb.Histogram.Bucket {
		if b.GetCumulativeCount() < prev {
			t.Fatalf("classic buckets not cumulative: %v", pb.Histogram.Bucket)
		}
		prev = b.GetCumulativeCount()
		if b.GetUpperBound() == math.Ldexp(1, -16) && prev != 3 {
			t.Errorf("le=2^-16 s (15.3 us): %d, want 3", prev)
		}
	}
}
