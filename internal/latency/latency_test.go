package latency

import (
	"math"
	"sync"
	"testing"
	"time"
)

// TestKeyBounds: every value lands in the bucket whose bounds hold it, by
// the native histogram definition (2^((k-1)/4), 2^(k/4)].
func TestKeyBounds(t *testing.T) {
	for _, v := range []float64{1e-6, 1.5e-6, 2e-6, 1e-5, 3.3e-4, 1e-3, 0.0123, 0.5, 1, 1.0001, 7, 1000} {
		k := Key(v)
		lo, hi := math.Exp2(float64(k-1)/4), math.Exp2(float64(k)/4)
		if !(v > lo*(1+1e-12) && v <= hi*(1+1e-12)) {
			t.Errorf("Key(%g) = %d: bucket (%g, %g] does not hold it", v, k, lo, hi)
		}
	}
	for e := -20; e <= 13; e++ {
		if k := Key(math.Ldexp(1, e)); k != 4*e {
			t.Errorf("Key(2^%d) = %d, want %d (a power of two closes a bucket)", e, k, 4*e)
		}
	}
}

func TestObserveAndSnapshot(t *testing.T) {
	var h Histogram
	durs := []time.Duration{0, 900 * time.Nanosecond, 954 * time.Nanosecond, 10 * time.Microsecond,
		10 * time.Microsecond, time.Millisecond, 3 * time.Second, 10 * time.Hour}
	var sum time.Duration
	for _, d := range durs {
		h.Observe(d)
		sum += d
	}
	s := h.Snapshot()
	if s.Count() != uint64(len(durs)) {
		t.Fatalf("count %d, want %d", s.Count(), len(durs))
	}
	if s.Zero != 2 {
		t.Errorf("zero bucket %d, want 2 (0 and 900 ns are below %g s)", s.Zero, ZeroThreshold)
	}
	if math.Abs(s.SumSeconds-sum.Seconds()) > 1e-9 {
		t.Errorf("sum %g, want %g", s.SumSeconds, sum.Seconds())
	}
	b := s.Buckets()
	if b[Key(10e-6)] != 2 || b[MaxKey] != 1 {
		t.Errorf("buckets %v: want 2 at key %d (10 us) and the 10 h duration in the top bucket %d", b, Key(10e-6), MaxKey)
	}
	cum := s.Cumulative()
	wantCum := map[float64]uint64{math.Ldexp(1, -17): 3, math.Ldexp(1, -16): 5, math.Ldexp(1, -9): 6, 2: 6, 4: 7, 16: 7}
	for bound, want := range wantCum {
		if cum[bound] != want {
			t.Errorf("cumulative count at %g s: %d, want %d", bound, cum[bound], want)
		}
	}
	var merged Snapshot
	merged.Add(&s)
	h.AddTo(&merged)
	if merged.Count() != 2*uint64(len(durs)) {
		t.Errorf("merged count %d, want %d", merged.Count(), 2*len(durs))
	}
}

// TestConcurrentObserve: concurrent writers lose nothing.
func TestConcurrentObserve(t *testing.T) {
	var h Histogram
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10000 {
				h.Observe(time.Duration(g*1000+i) * time.Microsecond)
			}
		}()
	}
	wg.Wait()
	if s := h.Snapshot(); s.Count() != 40000 {
		t.Fatalf("count %d, want 40000", s.Count())
	}
}

func BenchmarkObserve(b *testing.B) {
	var h Histogram
	for i := 0; b.Loop(); i++ {
		h.Observe(time.Duration(i&0xffff) * 100 * time.Nanosecond)
	}
}
