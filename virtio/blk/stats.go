package blk

import (
	"sync/atomic"
	"time"

	"github.com/thinblk/thinblk/internal/latency"
)

// Op is a request type as the statistics count it.
type Op uint8

// The request types counted apart; OpOther is every other type and every
// malformed request (no readable header, no status byte, a broken chain).
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpDiscard
	OpWriteZeroes
	OpGetID
	OpOther
	NumOps
)

var opNames = [NumOps]string{"read", "write", "flush", "discard", "write_zeroes", "get_id", "other"}

func (o Op) String() string {
	if o < NumOps {
		return opNames[o]
	}
	return "invalid"
}

func opOf(typ uint32) Op {
	switch typ {
	case TypeIn:
		return OpRead
	case TypeOut:
		return OpWrite
	case TypeFlush:
		return OpFlush
	case TypeDiscard:
		return OpDiscard
	case TypeWriteZeroes:
		return OpWriteZeroes
	case TypeGetID:
		return OpGetID
	}
	return OpOther
}

// OpStats are one request type's counts, over every queue of a device
// since it was created.
type OpStats struct {
	// Completed counts requests that completed with VIRTIO_BLK_S_OK;
	// Bytes their data (read into, or written, discarded or zeroed in
	// the disk).
	Completed uint64
	Bytes     uint64
	// IOErrors and Unsupported count requests that completed with
	// VIRTIO_BLK_S_IOERR and VIRTIO_BLK_S_UNSUPP.
	IOErrors    uint64
	Unsupported uint64
	// Latency holds every completed request, failed ones included: from
	// the moment the queue took it off the ring to its completion.
	Latency latency.Snapshot
}

// Stats are a device's request counts.
type Stats struct {
	Ops [NumOps]OpStats
	// InFlight is the number of requests taken from the rings and not yet
	// completed.
	InFlight int
}

// opCounters are one type's counters in one queue.
type opCounters struct {
	completed, bytes      atomic.Uint64
	ioErrors, unsupported atomic.Uint64
	latency               latency.Histogram
}

// queueStats are one queue's counters. Only that queue's goroutines (its
// runner's workers, its storage's completion goroutine) write them, with
// plain atomic adds; a scrape sums the queues. Padding keeps another
// queue's counters (or anything else) off their cache lines.
type queueStats struct {
	_   [64]byte
	ops [NumOps]opCounters
	_   [64]byte
}

func (s *queueStats) record(op Op, status byte, bytes uint64, took time.Duration) {
	c := &s.ops[op]
	switch status {
	case StatusOK:
		c.completed.Add(1)
		if bytes != 0 {
			c.bytes.Add(bytes)
		}
	case StatusUnsupp:
		c.unsupported.Add(1)
	default:
		c.ioErrors.Add(1)
	}
	c.latency.Observe(took)
}

func (s *queueStats) addTo(st *Stats) {
	for i := range s.ops {
		c, o := &s.ops[i], &st.Ops[i]
		o.Completed += c.completed.Load()
		o.Bytes += c.bytes.Load()
		o.IOErrors += c.ioErrors.Load()
		o.Unsupported += c.unsupported.Load()
		c.latency.AddTo(&o.Latency)
	}
}

// epoch anchors now: time.Since on a time with a monotonic reading costs
// one clock read (time.Now costs two).
var epoch = time.Now()

func now() time.Duration { return time.Since(epoch) }

// Stats returns the device's request counts, summed over its queues (those
// that ever ran: a ring the front-end never started has none).
func (d *Device) Stats() Stats {
	var st Stats
	for i := range d.stats {
		if s := d.stats[i].Load(); s != nil {
			s.addTo(&st)
		}
	}
	st.InFlight = d.InFlight()
	return st
}
