package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"

	"github.com/thinblk/thinblk/internal/latency"
	"github.com/thinblk/thinblk/internal/unixsock"
	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/thin"
	"github.com/thinblk/thinblk/virtio/blk"
)

// serveStats is everything a serve reports about itself at one moment:
// the single source of both the Prometheus exporter (--metrics) and QMP's
// query-volume-stats.
type serveStats struct {
	Volumes []volumeStats
	Pool    *poolStats // nil for --raw
}

type volumeStats struct {
	Name string
	IO   blk.Stats
	// Connected: a front-end is connected now; Connections: how many
	// have been served (the first, then each reconnection).
	Connected       bool
	Connections     uint64
	WaitingForSpace int
	Space           *thin.VolumeStatus // pool volumes only
}

type poolStats struct {
	Status           thin.PoolStatus
	ProvisionedBytes uint64 // sum over the volumes
	Metrics          thin.Metrics
}

// stats gathers a pool serve's numbers.
func (e *exports) stats() serveStats {
	st := e.pool.Status()
	m := e.pool.Metrics()
	ps := &poolStats{Status: st.Pool, Metrics: m}
	space := map[string]*thin.VolumeStatus{}
	for i := range st.Volumes {
		ps.ProvisionedBytes += st.Volumes[i].ProvisionedBytes
		space[st.Volumes[i].Name] = &st.Volumes[i]
	}
	e.mu.Lock()
	vols := make([]volumeStats, 0, len(e.byName))
	for name, x := range e.byName {
		vols = append(vols, volumeStats{
			Name: name, IO: x.dev.Stats(),
			Connected: x.srv.Connected(), Connections: x.srv.Connections(),
			WaitingForSpace: m.WaitingForSpace[name], Space: space[name],
		})
	}
	e.mu.Unlock()
	slices.SortFunc(vols, func(a, b volumeStats) int { return strings.Compare(a.Name, b.Name) })
	return serveStats{Volumes: vols, Pool: ps}
}

// Metric names follow node_exporter's diskstats where they fit
// (node_disk_reads_completed_total, node_disk_read_bytes_total,
// node_disk_io_now, ...), in base units (bytes, seconds).
const namespace = "thinblk"

var (
	volumeLabel = []string{"volume"}
	poolLabel   = []string{"pool"}

	descVolume = func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "volume", name), help, append([]string{"volume"}, labels...), nil)
	}
	descPool = func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "pool", name), help, poolLabel, nil)
	}

	// Per request type: completed with OK, and their bytes.
	opCompleted = map[blk.Op]*prometheus.Desc{
		blk.OpRead:        descVolume("reads_completed_total", "Reads completed successfully."),
		blk.OpWrite:       descVolume("writes_completed_total", "Writes completed successfully."),
		blk.OpDiscard:     descVolume("discards_completed_total", "Discards completed successfully."),
		blk.OpWriteZeroes: descVolume("write_zeroes_completed_total", "Write-zeroes requests completed successfully."),
		blk.OpFlush:       descVolume("flush_requests_total", "Flushes completed successfully."),
	}
	opBytes = map[blk.Op]*prometheus.Desc{
		blk.OpRead:        descVolume("read_bytes_total", "Bytes read by successful reads."),
		blk.OpWrite:       descVolume("written_bytes_total", "Bytes written by successful writes."),
		blk.OpDiscard:     descVolume("discarded_bytes_total", "Bytes discarded by successful discards."),
		blk.OpWriteZeroes: descVolume("zeroed_bytes_total", "Bytes zeroed by successful write-zeroes requests."),
	}
	descErrors   = descVolume("request_errors_total", "Requests that completed with an error status (ioerr: VIRTIO_BLK_S_IOERR, unsupp: VIRTIO_BLK_S_UNSUPP), by request type (op).", "op", "status")
	descIONow    = descVolume("io_now", "Requests taken from the rings and not yet completed.")
	descLatency  = descVolume("request_duration_seconds", "Time from taking a request off the ring to completing it, every completed request (failed ones too), by request type (op).", "op")
	descWaiting  = descVolume("requests_waiting_for_space", "Requests waiting now for the pool to have space (no-space policy queue or pause).")
	descVolSize  = descVolume("size_bytes", "Virtual size of the volume.")
	descVolMap   = descVolume("mapped_bytes", "Bytes of the volume mapped to pool blocks (its own).")
	descVolProv  = descVolume("provisioned_bytes", "Bytes of the volume provisioned (WRITE_ZEROES without unmap): later writes there never fail for lack of space.")
	descVolRes   = descVolume("reserved_bytes", "Pool space reserved for the volume (provisioned blocks not yet written, copies of shared provisioned blocks, reserve mode).")
	descConnRaw  = prometheus.NewDesc("thinblk_frontend_connected", "1 while a vhost-user front-end (QEMU) is connected to the volume's socket.", volumeLabel, nil)
	descReconn   = prometheus.NewDesc("thinblk_frontend_reconnects_total", "Front-end connections after the first (QEMU reconnecting, VM restarts).", volumeLabel, nil)
	descSize     = descPool("size_bytes", "Size of the pool.")
	descAlloc    = descPool("allocated_bytes", "Pool space allocated to volumes (releasing blocks included).")
	descReserved = descPool("reserved_bytes", "Pool space reserved (promised to volumes, not yet allocated).")
	descFree     = descPool("free_bytes", "Pool space neither allocated nor reserved: allocated + reserved + free = size.")
	descProv     = descPool("provisioned_bytes", "Bytes provisioned over all volumes.")
	descRelease  = descPool("releasing_bytes", "Freed blocks whose release is not yet durable or whose space is being punched out of the data file.")
	descLowWater = descPool("low_water_bytes", "The low-water mark: free space below it is logged and raises BLOCK_POOL_LOW_WATER.")
	descBelowLow = descPool("below_low_water", "1 while free space is below the low-water mark.")
	descOOS      = descPool("out_of_space", "1 while the pool is out of space: a write found no unreserved space and none appeared since.")
	descMeta     = descPool("metadata_bytes", "Bytes of the pool's Pebble metadata store on disk.")
	descCommits  = descPool("commits_total", "Metadata commits (data file sync and Pebble batch).")
	descCommitT  = descPool("commit_duration_seconds", "Duration of metadata commits: what a guest's FLUSH waits for.")
)

// statsCollector exposes serveStats to Prometheus, read at scrape time:
// the hot path only adds to per-queue counters.
type statsCollector struct{ gather func() serveStats }

func (c statsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range opCompleted {
		ch <- d
	}
	for _, d := range opBytes {
		ch <- d
	}
	for _, d := range []*prometheus.Desc{descErrors, descIONow, descLatency, descWaiting, descVolSize, descVolMap,
		descVolProv, descVolRes, descConnRaw, descReconn, descSize, descAlloc, descReserved, descFree, descProv,
		descRelease, descLowWater, descBelowLow, descOOS, descMeta, descCommits, descCommitT} {
		ch <- d
	}
}

func (c statsCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.gather()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, v := range s.Volumes {
		for op, d := range opCompleted {
			counter(d, v.IO.Ops[op].Completed, v.Name)
		}
		for op, d := range opBytes {
			counter(d, v.IO.Ops[op].Bytes, v.Name)
		}
		for op := range blk.NumOps {
			o := &v.IO.Ops[op]
			counter(descErrors, o.IOErrors, v.Name, op.String(), "ioerr")
			counter(descErrors, o.Unsupported, v.Name, op.String(), "unsupp")
			ch <- newHistogram(descLatency, &o.Latency, v.Name, op.String())
		}
		gauge(descIONow, float64(v.IO.InFlight), v.Name)
		gauge(descConnRaw, b2f(v.Connected), v.Name)
		counter(descReconn, max(v.Connections, 1)-1, v.Name)
		if v.Space != nil {
			gauge(descWaiting, float64(v.WaitingForSpace), v.Name)
			gauge(descVolSize, float64(v.Space.SizeBytes), v.Name)
			gauge(descVolMap, float64(v.Space.MappedBytes), v.Name)
			gauge(descVolProv, float64(v.Space.ProvisionedBytes), v.Name)
			gauge(descVolRes, float64(v.Space.ReservedBytes), v.Name)
		}
	}
	if p := s.Pool; p != nil {
		name := p.Status.Dir
		gauge(descSize, float64(p.Status.SizeBytes), name)
		gauge(descAlloc, float64(p.Status.AllocatedBytes), name)
		gauge(descReserved, float64(p.Status.ReservedBytes), name)
		gauge(descFree, float64(p.Status.FreeBytes), name)
		gauge(descProv, float64(p.ProvisionedBytes), name)
		gauge(descRelease, float64(p.Status.ReleasingBytes), name)
		gauge(descLowWater, float64(p.Status.LowWaterBytes), name)
		gauge(descBelowLow, b2f(p.Status.BelowLowWater), name)
		gauge(descOOS, b2f(p.Metrics.OutOfSpace), name)
		gauge(descMeta, float64(p.Status.MetadataBytes), name)
		counter(descCommits, p.Metrics.Commits.Count(), name)
		ch <- newHistogram(descCommitT, &p.Metrics.Commits, name)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// histogramMetric is a histogram with both layouts: native buckets
// (schema 2) for scrapers that ask for them (protobuf), and classic
// buckets at powers of two, exact sums of the native ones, for the rest.
type histogramMetric struct {
	desc *prometheus.Desc
	pb   *dto.Metric
}

func (m histogramMetric) Desc() *prometheus.Desc { return m.desc }

func (m histogramMetric) Write(out *dto.Metric) error {
	out.Label, out.Histogram = m.pb.Label, m.pb.Histogram
	return nil
}

func newHistogram(desc *prometheus.Desc, s *latency.Snapshot, labels ...string) prometheus.Metric {
	count := s.Count()
	classic, err := prometheus.NewConstHistogram(desc, count, s.SumSeconds, s.Cumulative(), labels...)
	if err != nil {
		return prometheus.NewInvalidMetric(desc, err)
	}
	var pb dto.Metric
	if err := classic.Write(&pb); err != nil {
		return prometheus.NewInvalidMetric(desc, err)
	}
	schema, zeroThreshold, zero := int32(latency.Schema), latency.ZeroThreshold, s.Zero
	h := pb.Histogram
	h.Schema, h.ZeroThreshold, h.ZeroCount = &schema, &zeroThreshold, &zero
	h.PositiveSpan, h.PositiveDelta = nativeSpans(s)
	return histogramMetric{desc: desc, pb: &pb}
}

// nativeSpans encodes the non-empty buckets as spans of consecutive keys
// and count deltas, as the protobuf native histogram wants them.
func nativeSpans(s *latency.Snapshot) ([]*dto.BucketSpan, []int64) {
	var spans []*dto.BucketSpan
	var deltas []int64
	var prevCount int64
	nextKey := 0 // the key after the last span's end
	for i, c := range s.Counts {
		if c == 0 {
			continue
		}
		key := latency.MinKey + 1 + i
		if len(spans) > 0 && key == nextKey {
			*spans[len(spans)-1].Length++
		} else {
			offset := int32(key)
			if len(spans) > 0 {
				offset = int32(key - nextKey)
			}
			one := uint32(1)
			spans = append(spans, &dto.BucketSpan{Offset: &offset, Length: &one})
		}
		deltas = append(deltas, int64(c)-prevCount)
		prevCount = int64(c)
		nextKey = key + 1
	}
	if len(spans) == 0 {
		// No observation yet: an empty span still marks the histogram
		// as native.
		var offset int32
		var length uint32
		spans = []*dto.BucketSpan{{Offset: &offset, Length: &length}}
	}
	return spans, deltas
}

// parseMetricsAddr checks --metrics: "HOST:PORT" (TCP; an empty host is
// every address) or "unix:PATH".
func parseMetricsAddr(s string) (network, addr string, err error) {
	if path, ok := strings.CutPrefix(s, "unix:"); ok {
		if path == "" {
			return "", "", fmt.Errorf("--metrics %q: empty socket path", s)
		}
		return "unix", path, nil
	}
	if strings.Contains(s, "://") {
		return "", "", fmt.Errorf("--metrics %q: want HOST:PORT or unix:PATH, not a URL (the path is /metrics)", s)
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", "", fmt.Errorf("--metrics %q: want HOST:PORT (e.g. 127.0.0.1:9470) or unix:PATH: %v", s, err)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		return "", "", fmt.Errorf("--metrics %q: port %q is not a number from 0 to 65535", s, port)
	}
	if strings.ContainsAny(host, "/ ") {
		return "", "", fmt.Errorf("--metrics %q: bad host %q", s, host)
	}
	return "tcp", s, nil
}

// startMetrics serves /metrics on addr until stop is called.
func startMetrics(addr string, mode os.FileMode, gather func() serveStats, log *slog.Logger) (stop func(), err error) {
	network, where, err := parseMetricsAddr(addr)
	if err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		statsCollector{gather: gather},
	)
	var ln net.Listener
	cleanup := func() {}
	if network == "unix" {
		uln, fi, err := unixsock.Listen(where, mode)
		if err != nil {
			return nil, fmt.Errorf("metrics: %w", err)
		}
		ln, cleanup = uln, func() { unixsock.Remove(where, fi) }
	} else if ln, err = net.Listen("tcp", where); err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "thinblk serve: metrics at /metrics")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	shown := ln.Addr().String()
	if network == "unix" {
		shown = "unix:" + where
	}
	log.Info("serving metrics", "addr", shown, "path", "/metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		cleanup()
	}, nil
}

// The QMP view of the same numbers: query-volume-stats.
type (
	opStatsJSON struct {
		Completed         uint64  `json:"completed"`
		Bytes             uint64  `json:"bytes"`
		IOErrors          uint64  `json:"io_errors"`
		Unsupported       uint64  `json:"unsupported"`
		LatencyCount      uint64  `json:"latency_count"`
		LatencySumSeconds float64 `json:"latency_sum_seconds"`
	}
	volumeStatsJSON struct {
		Name            string                 `json:"name"`
		Ops             map[string]opStatsJSON `json:"ops"`
		InFlight        int                    `json:"in_flight"`
		WaitingForSpace int                    `json:"waiting_for_space"`
		Connected       bool                   `json:"connected"`
		Reconnects      uint64                 `json:"reconnects"`
	}
)

func volumeStatsReply(s serveStats, names []string) (map[string]any, error) {
	out := []volumeStatsJSON{}
	for _, v := range s.Volumes {
		if len(names) > 0 && !slices.Contains(names, v.Name) {
			continue
		}
		j := volumeStatsJSON{Name: v.Name, Ops: map[string]opStatsJSON{}, InFlight: v.IO.InFlight,
			WaitingForSpace: v.WaitingForSpace, Connected: v.Connected, Reconnects: max(v.Connections, 1) - 1}
		for op := range blk.NumOps {
			o := &v.IO.Ops[op]
			j.Ops[op.String()] = opStatsJSON{Completed: o.Completed, Bytes: o.Bytes, IOErrors: o.IOErrors,
				Unsupported: o.Unsupported, LatencyCount: o.Latency.Count(), LatencySumSeconds: o.Latency.SumSeconds}
		}
		out = append(out, j)
	}
	for _, n := range names {
		if !slices.ContainsFunc(out, func(j volumeStatsJSON) bool { return j.Name == n }) {
			return nil, fmt.Errorf("no volume %q is exported", n)
		}
	}
	return map[string]any{"volumes": out}, nil
}

// registerStatsCommand adds query-volume-stats to the control socket.
func registerStatsCommand(s *qmp.Server, ex *exports) {
	s.Register("query-volume-stats", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a struct {
			Names []string `json:"names,omitempty"`
		}
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		return volumeStatsReply(ex.stats(), a.Names)
	})
}
