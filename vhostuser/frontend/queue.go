package frontend

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
)

// ErrTimeout is returned when the back-end does not complete requests in
// time.
var ErrTimeout = errors.New("timed out waiting for the back-end")

// Segment is one descriptor of a raw chain.
type Segment struct {
	Buf   Buffer
	Write bool // device-writable
	// Len overrides len(Buf.Bytes) when non-zero, to describe buffers
	// that are not what they claim (conformance tests).
	Len uint32
	// Flags are extra descriptor flags (e.g. reserved bits); NEXT and
	// WRITE are set by the driver.
	Flags uint16
}

// Req is one virtio-blk request. Allocate it with Queue.NewReq, fill in
// Type, Sector and Data (or Raw), Submit it, and read Status once Reap
// returned it. A Req can be reused after it completed.
type Req struct {
	Type   uint32
	Ioprio uint32
	Sector uint64
	// Data are the data buffers: device-readable for OUT, DISCARD and
	// WRITE_ZEROES, device-writable for IN and GET_ID (and for unknown
	// types when DataWritable is set).
	Data         []Buffer
	DataWritable bool
	// Raw, when non-nil, is sent as the whole chain instead of
	// header+Data+status; Status is then not filled in.
	Raw []Segment
	// Indirect sends the chain as one indirect descriptor (requires
	// INDIRECT_DESC).
	Indirect bool
	// User is free for the caller (e.g. a submit timestamp).
	User int64

	// Results, valid after completion.
	Status  byte
	UsedLen uint32

	q        *Queue
	hdr      Buffer // 16-byte header, then the status byte at offset 16
	table    Buffer // indirect descriptor table
	inFlight bool
	done     bool
}

// Header returns the request header buffer (16 bytes, guest memory), for
// raw chains that want to use it.
func (r *Req) Header() Buffer { return r.hdr.Slice(0, blk.RequestHeaderSize) }

// StatusBuf returns the one-byte status buffer in guest memory.
func (r *Req) StatusBuf() Buffer {
	return r.hdr.Slice(blk.RequestHeaderSize, blk.RequestHeaderSize+1)
}

// WriteHeader encodes Type, Ioprio and Sector into the header buffer.
func (r *Req) WriteHeader() {
	h := r.hdr.Bytes
	binary.LittleEndian.PutUint32(h[0:], r.Type)
	binary.LittleEndian.PutUint32(h[4:], r.Ioprio)
	binary.LittleEndian.PutUint64(h[8:], r.Sector)
}

// Done reports whether the request has completed.
func (r *Req) Done() bool { return r.done }

// Free returns the request's guest memory. It must not be in flight.
func (r *Req) Free() {
	if r.inFlight || r.q == nil {
		return
	}
	r.q.d.mem.Free(r.hdr)
	if r.table.Bytes != nil {
		r.q.d.mem.Free(r.table)
	}
	r.q = nil
}

// Queue is one virtqueue of a Disk. Its methods are safe for concurrent
// use, but one goroutine should own the requests it submits: Reap returns
// whichever requests completed.
type Queue struct {
	d     *Disk
	index int

	mu       sync.Mutex
	ring     *ring
	kick     *os.File
	kickFd   int // kick's descriptor, non-blocking (created EFD_NONBLOCK)
	call     *os.File
	inflight []*Req // by head descriptor
	scratch  []desc
	one      [8]byte
	callBuf  [8]byte
	kicks    uint64
	waits    uint64
}

// Index is the queue's index.
func (q *Queue) Index() int { return q.index }

// Size is the number of descriptors in the ring.
func (q *Queue) Size() int { return int(q.ring.size) }

// NewReq allocates a request with its header, status byte and room for an
// indirect table of maxSegs data segments.
func (q *Queue) NewReq(maxSegs int) (*Req, error) {
	hdr, err := q.d.mem.Alloc(32, 16)
	if err != nil {
		return nil, err
	}
	r := &Req{q: q, hdr: hdr}
	if q.d.indirect {
		if r.table, err = q.d.mem.Alloc(uint64(maxSegs+2)*virtio.DescSize, 16); err != nil {
			q.d.mem.Free(hdr)
			return nil, err
		}
	}
	return r, nil
}

func (q *Queue) buildChain(r *Req) []desc {
	ds := q.scratch[:0]
	if r.Raw != nil {
		for _, s := range r.Raw {
			d := desc{addr: s.Buf.Addr, len: uint32(len(s.Buf.Bytes)), flags: s.Flags}
			if s.Len != 0 {
				d.len = s.Len
			}
			if s.Write {
				d.flags |= virtio.DescFlagWrite
			}
			ds = append(ds, d)
		}
		q.scratch = ds
		return ds
	}
	r.WriteHeader()
	r.hdr.Bytes[blk.RequestHeaderSize] = 0xff // so a status never written shows
	ds = append(ds, desc{addr: r.hdr.Addr, len: blk.RequestHeaderSize})
	var dflags uint16
	if r.Type == blk.TypeIn || r.Type == blk.TypeGetID || r.DataWritable {
		dflags = virtio.DescFlagWrite
	}
	for _, b := range r.Data {
		ds = append(ds, desc{addr: b.Addr, len: uint32(len(b.Bytes)), flags: dflags})
	}
	ds = append(ds, desc{addr: r.hdr.Addr + blk.RequestHeaderSize, len: 1, flags: virtio.DescFlagWrite})
	q.scratch = ds
	return ds
}

// Submit adds requests to the available ring, publishes them together and
// kicks the back-end if it asked for it.
func (q *Queue) Submit(reqs ...*Req) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.submitLocked(reqs)
}

func (q *Queue) submitLocked(reqs []*Req) error {
	var err error
	added := 0
	for _, r := range reqs {
		if r.inFlight {
			err = fmt.Errorf("queue %d: request already in flight", q.index)
			break
		}
		if r.q != q {
			err = fmt.Errorf("queue %d: request belongs to another queue", q.index)
			break
		}
		ds := q.buildChain(r)
		if r.Indirect {
			if !q.d.indirect {
				err = fmt.Errorf("queue %d: indirect descriptors not negotiated", q.index)
				break
			}
			need := uint64(len(ds)) * virtio.DescSize
			if uint64(len(r.table.Bytes)) < need {
				if r.table.Bytes != nil {
					q.d.mem.Free(r.table)
					r.table = Buffer{}
				}
				if r.table, err = q.d.mem.Alloc(need, 16); err != nil {
					break
				}
			}
			for i, d := range ds {
				var next uint16
				if i+1 < len(ds) {
					d.flags |= virtio.DescFlagNext
					next = uint16(i + 1)
				}
				putDesc(r.table.Bytes, i, d, next)
			}
			ds = append(ds[:0], desc{addr: r.table.Addr, len: uint32(need), flags: virtio.DescFlagIndirect})
		}
		var head uint16
		if head, err = q.ring.add(ds); err != nil {
			err = fmt.Errorf("queue %d: %w", q.index, err)
			break
		}
		r.inFlight, r.done, r.Status, r.UsedLen = true, false, 0, 0
		q.inflight[head] = r
		added++
	}
	if added > 0 && q.ring.publish() {
		q.kicks++
		if _, werr := unix.Write(q.kickFd, q.one[:]); werr != nil && werr != unix.EAGAIN {
			return errors.Join(err, fmt.Errorf("queue %d: kick: %w", q.index, werr))
		}
	}
	return err
}

// AvailIdx is the number of chains the driver made available so far
// (modulo 2^16): what the back-end reports from GET_VRING_BASE once it
// took them all.
func (q *Queue) AvailIdx() uint16 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ring.availIdx
}

// Free is the number of free descriptors.
func (q *Queue) Free() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ring.numFree()
}

// InFlight is the number of submitted requests not yet reaped.
func (q *Queue) InFlight() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return int(q.ring.size) - q.ring.numFree()
}

// reapLocked appends every completed request to done.
func (q *Queue) reapLocked(done []*Req) ([]*Req, error) {
	for {
		head, n, ok, err := q.ring.pop()
		if err != nil {
			return done, fmt.Errorf("queue %d: %w", q.index, err)
		}
		if !ok {
			return done, nil
		}
		r := q.inflight[head]
		q.inflight[head] = nil
		r.inFlight, r.done, r.UsedLen = false, true, n
		if r.Raw == nil {
			r.Status = r.hdr.Bytes[blk.RequestHeaderSize]
		}
		done = append(done, r)
	}
}

// Reap appends the requests completed so far to done without waiting.
func (q *Queue) Reap(done []*Req) ([]*Req, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.reapLocked(done)
}

// Wait appends completed requests to done, waiting up to timeout (0: the
// disk's default) for at least one.
func (q *Queue) Wait(done []*Req, timeout time.Duration) ([]*Req, error) {
	if timeout <= 0 {
		timeout = q.d.opts.Timeout
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.waitLocked(done, time.Now().Add(timeout))
}

func (q *Queue) waitLocked(done []*Req, deadline time.Time) ([]*Req, error) {
	start := len(done)
	for {
		var err error
		if done, err = q.reapLocked(done); err != nil || len(done) > start {
			return done, err
		}
		if q.ring.size == uint16(q.ring.numFree()) {
			return done, fmt.Errorf("queue %d: wait with no request in flight", q.index)
		}
		if q.ring.armInterrupt() {
			continue
		}
		if err := q.waitCall(deadline); err != nil {
			return done, err
		}
	}
}

// waitCall sleeps until the back-end signals the call eventfd. The lock is
// held: a queue has one waiter at a time.
func (q *Queue) waitCall(deadline time.Time) error {
	q.waits++
	if err := q.call.SetReadDeadline(deadline); err != nil {
		return fmt.Errorf("queue %d: %w", q.index, err)
	}
	_, err := q.call.Read(q.callBuf[:])
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("queue %d: %d descriptors in flight (%s): %w", q.index, int(q.ring.size)-q.ring.numFree(), q.ring.state(), ErrTimeout)
	}
	if err != nil {
		return fmt.Errorf("queue %d: read call eventfd: %w", q.index, err)
	}
	return nil
}

// Do submits one request and waits for it to complete. The queue is held
// meanwhile; requests of others that complete are marked done but not
// returned to anyone, so do not mix Do with Submit/Wait on one queue.
func (q *Queue) Do(r *Req) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.submitLocked([]*Req{r}); err != nil {
		return err
	}
	deadline := time.Now().Add(q.d.opts.Timeout)
	var done []*Req
	for !r.done {
		var err error
		if done, err = q.waitLocked(done[:0], deadline); err != nil {
			return fmt.Errorf("request type %d sector %d: %w", r.Type, r.Sector, err)
		}
	}
	return nil
}

// Stats are counters of notifications.
type Stats struct{ Kicks, Waits uint64 }

// Stats reports how many kicks were sent and how often Wait slept.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return Stats{q.kicks, q.waits}
}

func newEventfd() (*os.File, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return os.NewFile(uintptr(fd), "eventfd"), nil
}
