// Package bench measures vhost-user-blk back-ends from the host side,
// through the project's front-end driver (vhostuser/frontend), and the
// host file itself through fio, so that thinblk, qemu-storage-daemon and
// the physical reference are compared in one run on one file.
package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/vhostuser/frontend"
	"github.com/thinblk/thinblk/virtio/blk"
)

// Op is an access pattern.
type Op string

const (
	RandRead  Op = "randread"
	RandWrite Op = "randwrite"
	SeqRead   Op = "read"
	SeqWrite  Op = "write"
)

// Case is one measurement: pattern, block size, queue depth per queue,
// number of queues (fio: jobs).
type Case struct {
	Op         Op
	BlockSize  int
	QueueDepth int
	Queues     int
	// FlushEvery, if set, sends a FLUSH after every FlushEvery writes on
	// each queue (as a filesystem's journal commits would). Flushes are
	// not counted as operations; their time is part of the run.
	FlushEvery int
}

// Name is a short, stable identifier such as "randread-4k-qd32-q1".
func (c Case) Name() string {
	bs := fmt.Sprintf("%dk", c.BlockSize>>10)
	if c.BlockSize >= 1<<20 {
		bs = fmt.Sprintf("%dm", c.BlockSize>>20)
	}
	name := fmt.Sprintf("%s-%s-qd%d-q%d", c.Op, bs, c.QueueDepth, c.Queues)
	if c.FlushEvery > 0 {
		name += fmt.Sprintf("-flush%d", c.FlushEvery)
	}
	return name
}

// DefaultCases are the cases: 4 KiB random read and write at QD
// 1, 32 and 128 on 1 and 2 queues, and 1 MiB sequential read and write.
func DefaultCases() []Case {
	var cs []Case
	for _, op := range []Op{RandRead, RandWrite} {
		for _, q := range []int{1, 2} {
			for _, qd := range []int{1, 32, 128} {
				cs = append(cs, Case{Op: op, BlockSize: 4096, QueueDepth: qd, Queues: q})
			}
		}
	}
	cs = append(cs, Case{Op: SeqRead, BlockSize: 1 << 20, QueueDepth: 8, Queues: 1},
		Case{Op: SeqWrite, BlockSize: 1 << 20, QueueDepth: 8, Queues: 1})
	return cs
}

// Result is one case measured on one target.
type Result struct {
	Target string  `json:"target"`
	Case   string  `json:"case"`
	Ops    int64   `json:"ops"`
	IOPS   float64 `json:"iops"`
	MBps   float64 `json:"mb_per_s"`
	MeanUs float64 `json:"lat_mean_us"`
	P50Us  float64 `json:"lat_p50_us"`
	P99Us  float64 `json:"lat_p99_us"`
	// ServerCPUUs is the back-end's CPU time per request (user+system,
	// all threads), where known.
	ServerCPUUs float64 `json:"server_cpu_us_per_op,omitempty"`
	// DriverCPUUs is this process's CPU time per request: the front-end
	// driver's cost (and the back-end's too when it runs in-process).
	DriverCPUUs float64 `json:"driver_cpu_us_per_op,omitempty"`
	// ServerSwitches is the back-end's context switches per request
	// (voluntary and not, all threads): how often its threads sleep and
	// wake per request, which load changes less than time does.
	ServerSwitches float64 `json:"server_switches_per_op,omitempty"`
	Err            string  `json:"error,omitempty"`
}

// DriverOptions tune RunDriver.
type DriverOptions struct {
	Duration time.Duration
	// Span is the byte range of the disk the case touches (default: all).
	Span int64
	// NoIndirect sends three ring descriptors per request instead of one
	// indirect table (Linux guests use indirect tables when offered, as
	// both back-ends do); queue sizes then grow to fit.
	NoIndirect bool
	Seed       uint64
}

// RunDriver runs case c against the vhost-user-blk back-end at sock for
// opts.Duration: on each queue one goroutine keeps c.QueueDepth requests
// in flight, resubmitting each as it completes.
func RunDriver(ctx context.Context, sock string, c Case, opts DriverOptions) (Result, error) {
	qsize := uint16(256)
	descs := 1
	if opts.NoIndirect {
		descs = 3
	}
	for int(qsize) < c.QueueDepth*descs {
		qsize *= 2
	}
	mem := uint64(c.Queues*c.QueueDepth*c.BlockSize) + 16<<20
	mem = (mem + 1<<20 - 1) &^ (1<<20 - 1)
	d, err := frontend.Dial(ctx, sock, frontend.Options{NumQueues: c.Queues, QueueSize: qsize, MemSize: mem})
	if err != nil {
		return Result{}, err
	}
	defer d.Close()
	span := int64(d.Capacity())
	if opts.Span > 0 && opts.Span < span {
		span = opts.Span
	}
	if span < int64(c.BlockSize)*int64(c.Queues) {
		return Result{}, fmt.Errorf("disk of %d bytes too small for %s", span, c.Name())
	}
	type qres struct {
		lat []int64
		err error
	}
	res := make([]qres, c.Queues)
	var wg sync.WaitGroup
	cpu0 := processCPU()
	start := time.Now()
	stopAt := start.Add(opts.Duration)
	for qi := 0; qi < c.Queues; qi++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat, err := runQueue(d, d.Queue(qi), c, span, stopAt, !opts.NoIndirect, opts.Seed+uint64(qi))
			res[qi] = qres{lat, err}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []int64
	for _, r := range res {
		if r.err != nil {
			return Result{}, r.err
		}
		all = append(all, r.lat...)
	}
	r := summarize(c, all, elapsed)
	if r.Ops > 0 {
		r.DriverCPUUs = float64((processCPU() - cpu0).Microseconds()) / float64(r.Ops)
	}
	return r, nil
}

// processCPU is this process's user+system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func summarize(c Case, lat []int64, elapsed time.Duration) Result {
	r := Result{Case: c.Name(), Ops: int64(len(lat))}
	if len(lat) == 0 {
		return r
	}
	r.IOPS = float64(len(lat)) / elapsed.Seconds()
	r.MBps = r.IOPS * float64(c.BlockSize) / 1e6
	var sum int64
	for _, l := range lat {
		sum += l
	}
	slices.Sort(lat)
	r.MeanUs = float64(sum) / float64(len(lat)) / 1e3
	r.P50Us = float64(lat[len(lat)/2]) / 1e3
	r.P99Us = float64(lat[min(len(lat)-1, len(lat)*99/100)]) / 1e3
	return r
}

// runQueue keeps c.QueueDepth requests in flight on q until stopAt, then
// drains, and returns every completed request's latency in nanoseconds.
func runQueue(d *frontend.Disk, q *frontend.Queue, c Case, span int64, stopAt time.Time, indirect bool, seed uint64) ([]int64, error) {
	rng := rand.New(rand.NewPCG(seed, 0x7468696e))
	blocks := span / int64(c.BlockSize)
	// Sequential streams: each queue walks its own share of the disk.
	share := blocks / int64(c.Queues)
	seqBase := int64(q.Index()) * share
	seqNext := int64(0)
	nextOffset := func() uint64 {
		var b int64
		switch c.Op {
		case RandRead, RandWrite:
			b = rng.Int64N(blocks)
		default:
			b = seqBase + seqNext%share
			seqNext++
		}
		return uint64(b * int64(c.BlockSize) / blk.SectorSize)
	}
	typ := uint32(blk.TypeIn)
	if c.Op == RandWrite || c.Op == SeqWrite {
		typ = blk.TypeOut
	}
	reqs := make([]*frontend.Req, c.QueueDepth)
	for i := range reqs {
		r, err := q.NewReq(1)
		if err != nil {
			return nil, err
		}
		buf, err := d.Memory().Alloc(uint64(c.BlockSize), 4096)
		if err != nil {
			return nil, err
		}
		for j := range buf.Bytes {
			buf.Bytes[j] = byte(j*7 + i)
		}
		r.Type, r.Data, r.Indirect = typ, []frontend.Buffer{buf}, indirect
		reqs[i] = r
	}
	var flush *frontend.Req
	if c.FlushEvery > 0 {
		var err error
		if flush, err = q.NewReq(0); err != nil {
			return nil, err
		}
		flush.Type, flush.Indirect = blk.TypeFlush, indirect
	}
	flushInFlight, sinceFlush := false, 0
	lat := make([]int64, 0, 1<<16)
	base := time.Now()
	now := func() int64 { return int64(time.Since(base)) }
	for _, r := range reqs {
		r.Sector, r.User = nextOffset(), now()
	}
	if err := q.Submit(reqs...); err != nil {
		return nil, err
	}
	inFlight := len(reqs)
	done := make([]*frontend.Req, 0, len(reqs))
	stopping := false
	for inFlight > 0 {
		var err error
		if done, err = q.Wait(done[:0], 10*time.Second); err != nil {
			return nil, fmt.Errorf("%s: %w", c.Name(), err)
		}
		t := now()
		inFlight -= len(done)
		n := 0
		for _, r := range done {
			if r.Status != blk.StatusOK {
				return nil, fmt.Errorf("%s: request type %d at sector %d: status %d", c.Name(), r.Type, r.Sector, r.Status)
			}
			if r == flush {
				flushInFlight = false
				continue
			}
			lat = append(lat, t-r.User)
			done[n] = r
			n++
		}
		done = done[:n]
		if !stopping && time.Now().After(stopAt) {
			stopping = true
		}
		if stopping {
			continue
		}
		for _, r := range done {
			r.Sector, r.User = nextOffset(), t
		}
		sinceFlush += len(done)
		if flush != nil && sinceFlush >= c.FlushEvery && !flushInFlight {
			sinceFlush = 0
			flushInFlight = true
			done = append(done, flush)
		}
		if err := q.Submit(done...); err != nil {
			return nil, err
		}
		inFlight += len(done)
	}
	return lat, nil
}
