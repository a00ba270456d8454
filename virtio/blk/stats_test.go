package blk

import (
	"testing"
	"time"
	"unsafe"
)

// TestQueueStatsPadded: a queue's counters share no cache line with
// whatever the allocator puts next to them (another queue's counters).
func TestQueueStatsPadded(t *testing.T) {
	var s queueStats
	start := unsafe.Offsetof(s.ops)
	tail := unsafe.Sizeof(s) - start - unsafe.Sizeof(s.ops)
	if start < 64 || tail < 64 {
		t.Fatalf("queueStats pads %d bytes before its counters and %d after; want 64 each", start, tail)
	}
}

func TestQueueStatsRecord(t *testing.T) {
	var s queueStats
	s.record(OpRead, StatusOK, 4096, 10000)
	s.record(OpRead, StatusIOErr, 4096, 20000)
	s.record(OpDiscard, StatusUnsupp, 0, 3000)
	var st Stats
	s.addTo(&st)
	s.addTo(&st) // two queues' worth
	r, d := st.Ops[OpRead], st.Ops[OpDiscard]
	if r.Completed != 2 || r.Bytes != 8192 || r.IOErrors != 2 || r.Latency.Count() != 4 || d.Unsupported != 2 || d.Latency.Count() != 2 {
		t.Fatalf("read %+v, discard %+v", r, d)
	}
}

// BenchmarkRecord is what the statistics add to each request on the
// io_uring path: the counters and the histogram (the clock is read once
// per pass over the ring and once per completion batch: BenchmarkNow).
func BenchmarkRecord(b *testing.B) {
	var s queueStats
	for i := 0; b.Loop(); i++ {
		s.record(OpRead, StatusOK, 4096, time.Duration(i&0xffff)*100)
	}
}

// BenchmarkNow is one clock read.
func BenchmarkNow(b *testing.B) {
	var sum time.Duration
	for b.Loop() {
		sum += now()
	}
	_ = sum
}
