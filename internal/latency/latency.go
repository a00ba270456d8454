// Package latency is a lock-free histogram of durations with the bucket
// layout of a Prometheus native histogram (schema 2: four buckets per
// doubling), cheap enough for every request: Observe is a float exponent
// split, at most two compares and three atomic adds. A histogram has one
// writer or a few (a queue's goroutines); readers take a Snapshot at any
// time and add snapshots together (one per queue) before exposing them.
package latency

import (
	"math"
	"sync/atomic"
	"time"
)

// Schema is the native histogram schema: bucket k holds durations in
// (2^((k-1)/4), 2^(k/4)] seconds.
const Schema = 2

const (
	perDoubling = 1 << Schema
	// MinKey's upper bound, 2^-20 s (about 0.95 us), is the zero
	// threshold: anything at or below it lands in the zero bucket.
	MinKey = -20 * perDoubling
	// MaxKey's upper bound is 2^13 s (about 2.3 hours); longer durations
	// are counted in it.
	MaxKey  = 13 * perDoubling
	buckets = MaxKey - MinKey
)

// ZeroThreshold is the zero bucket's upper bound in seconds.
var ZeroThreshold = math.Ldexp(1, MinKey/perDoubling)

// bounds are the bucket upper bounds within one doubling, as fractions of
// math.Frexp's [0.5, 1) mantissa: 2^(j/4 - 1) for j = 0..3 (j = 4 is 1).
var bounds = [perDoubling]float64{0.5, math.Exp2(-0.75), math.Exp2(-0.5), math.Exp2(-0.25)}

// zeroNanos: a duration of at most this many nanoseconds is at or below
// ZeroThreshold (2^-20 s = 953.67 ns).
const zeroNanos = 953

// Histogram counts durations. The zero value is ready to use.
type Histogram struct {
	zero    atomic.Uint64
	sumNano atomic.Uint64
	// counts[i] is bucket key MinKey+1+i.
	counts [buckets]atomic.Uint64
}

// Observe records one duration.
func (h *Histogram) Observe(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.sumNano.Add(uint64(d))
	h.bucket(d).Add(1)
}

func (h *Histogram) bucket(d time.Duration) *atomic.Uint64 {
	if d <= zeroNanos {
		return &h.zero
	}
	return &h.counts[min(Key(d.Seconds()), MaxKey)-MinKey-1]
}

// Key returns the native histogram bucket key of v seconds (v > 0): the
// smallest k with v <= 2^(k/4).
func Key(v float64) int {
	frac, exp := math.Frexp(v) // v = frac * 2^exp, frac in [0.5, 1)
	j := perDoubling
	switch {
	case frac <= bounds[0]:
		j = 0
	case frac <= bounds[1]:
		j = 1
	case frac <= bounds[2]:
		j = 2
	case frac <= bounds[3]:
		j = 3
	}
	return j + (exp-1)*perDoubling
}

// Snapshot is a histogram's counts at one moment.
type Snapshot struct {
	Zero       uint64
	SumSeconds float64
	Counts     [buckets]uint64 // bucket key MinKey+1+i
}

// Snapshot reads the histogram. Writers may run meanwhile: each count is
// exact at the moment it was read, and the total is their sum.
func (h *Histogram) Snapshot() Snapshot {
	var s Snapshot
	h.AddTo(&s)
	return s
}

// AddTo adds the histogram's counts to s (merging queues' histograms).
func (h *Histogram) AddTo(s *Snapshot) {
	s.Zero += h.zero.Load()
	s.SumSeconds += time.Duration(h.sumNano.Load()).Seconds()
	for i := range h.counts {
		s.Counts[i] += h.counts[i].Load()
	}
}

// Add adds o to s.
func (s *Snapshot) Add(o *Snapshot) {
	s.Zero += o.Zero
	s.SumSeconds += o.SumSeconds
	for i := range s.Counts {
		s.Counts[i] += o.Counts[i]
	}
}

// Count is the number of observations.
func (s *Snapshot) Count() uint64 {
	n := s.Zero
	for _, c := range s.Counts {
		n += c
	}
	return n
}

// Buckets returns the non-empty buckets by key, as a native histogram
// lists them.
func (s *Snapshot) Buckets() map[int]uint64 {
	m := map[int]uint64{}
	for i, c := range s.Counts {
		if c != 0 {
			m[MinKey+1+i] = c
		}
	}
	return m
}

// ClassicBounds are the upper bounds (seconds) of the classic buckets a
// snapshot also exposes, for scrapers without native histograms: powers
// of two from about 7.6 us to 16 s, each a native bucket boundary, so the
// classic counts are exact sums of native buckets.
var ClassicBounds = func() []float64 {
	var b []float64
	for e := -17; e <= 4; e++ {
		b = append(b, math.Ldexp(1, e))
	}
	return b
}()

// Cumulative returns, for each bound in ClassicBounds, the observations
// at or below it.
func (s *Snapshot) Cumulative() map[float64]uint64 {
	m := make(map[float64]uint64, len(ClassicBounds))
	n := s.Zero
	i := 0
	for _, b := range ClassicBounds {
		limit := Key(b) // the bound is exactly this bucket's upper bound
		for ; i < len(s.Counts) && MinKey+1+i <= limit; i++ {
			n += s.Counts[i]
		}
		m[b] = n
	}
	return m
}
