// Package blktrace records every request a virtio-blk Storage serves, for
// debugging data corruption reports (`thinblk serve --trace FILE`): the
// start and the completion of each read, write, flush, discard and
// write-zeroes with its range, a CRC-32 of every 512-byte sector the
// request carried (writes at their start, reads at their completion), and
// notes from the storage (a thin volume's resolved blocks). Check replays
// a trace and reports every read that did not return what the last write
// before it left, or zeros where nothing was discarded.
//
// Tracing costs nothing when off: the storage is wrapped only when a trace
// is asked for, and the thin pool's hook is a nil check.
//
// Format, one event a line, fields separated by spaces:
//
//	SEQ MICROS S ID DISK OP OFF LEN [SECTORS]   request started
//	SEQ MICROS D ID DISK OP STATUS [SECTORS]    request completed (STATUS ok or the error)
//	SEQ MICROS N DISK TEXT                      a note from the storage
//
// SEQ orders the events; MICROS is the time since the trace started. OP is
// read, write, flush, discard or zeroes (zeroes-unmap with unmap); OFF and
// LEN are bytes. SECTORS lists the sectors' CRCs in hex, a sector of
// zeros as "z", a run of N equal entries as ENTRY*N, joined with commas.
package blktrace

import (
	"bufio"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/virtio/blk"
)

// Log is an open trace. It is safe for concurrent use.
type Log struct {
	mu     sync.Mutex
	w      *bufio.Writer
	c      io.Closer
	seq    uint64
	nextID uint64
	start  time.Time
	err    error
}

// Create starts a trace in a new file at path (truncating it).
func Create(path string) (*Log, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	return New(f, f), nil
}

// New starts a trace on w; Close closes c (if not nil).
func New(w io.Writer, c io.Closer) *Log {
	return &Log{w: bufio.NewWriterSize(w, 64<<10), c: c, start: time.Now()}
}

// Close writes what is buffered and closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.w.Flush()
	if l.c != nil {
		err = errors.Join(err, l.c.Close())
	}
	return errors.Join(l.err, err)
}

// line writes one event. Lines are flushed at once: the trace matters most
// when the process dies.
func (l *Log) line(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	fmt.Fprintf(l.w, "%d %d ", l.seq, time.Since(l.start).Microseconds())
	fmt.Fprintf(l.w, format, args...)
	l.w.WriteByte('\n')
	if err := l.w.Flush(); err != nil && l.err == nil {
		l.err = err
	}
}

func (l *Log) newID() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nextID++
	return l.nextID
}

// Note records a storage event for disk (e.g. the blocks a thin volume
// resolved a request to).
func (l *Log) Note(disk, text string) {
	l.line("N %s %s", disk, text)
}

// Wrap returns s with every request traced under the name disk. The result
// serves asynchronous queues when s does, and reports s's geometry.
func (l *Log) Wrap(disk string, s blockdev.Storage) blockdev.Storage {
	return &storage{l: l, disk: disk, s: s}
}

type storage struct {
	l    *Log
	disk string
	s    blockdev.Storage
}

func (t *storage) start(op string, off, n int64, bufs [][]byte) uint64 {
	id := t.l.newID()
	if bufs != nil {
		t.l.line("S %d %s %s %d %d %s", id, t.disk, op, off, n, Sectors(bufs))
	} else {
		t.l.line("S %d %s %s %d %d", id, t.disk, op, off, n)
	}
	return id
}

func (t *storage) done(id uint64, op string, err error, bufs [][]byte) {
	st := "ok"
	if err != nil {
		st = strconv.Quote(err.Error())
	}
	if bufs != nil && err == nil {
		t.l.line("D %d %s %s %s %s", id, t.disk, op, st, Sectors(bufs))
	} else {
		t.l.line("D %d %s %s %s", id, t.disk, op, st)
	}
}

func length(bufs [][]byte) int64 {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	return n
}

func (t *storage) Size() uint64 { return t.s.Size() }

func (t *storage) ReadAt(bufs [][]byte, off int64) error {
	id := t.start("read", off, length(bufs), nil)
	err := t.s.ReadAt(bufs, off)
	t.done(id, "read", err, bufs)
	return err
}

func (t *storage) WriteAt(bufs [][]byte, off int64) error {
	id := t.start("write", off, length(bufs), bufs)
	err := t.s.WriteAt(bufs, off)
	t.done(id, "write", err, nil)
	return err
}

func (t *storage) Flush() error {
	id := t.start("flush", 0, 0, nil)
	err := t.s.Flush()
	t.done(id, "flush", err, nil)
	return err
}

func (t *storage) Discard(off, n int64) error {
	id := t.start("discard", off, n, nil)
	err := t.s.Discard(off, n)
	t.done(id, "discard", err, nil)
	return err
}

func (t *storage) WriteZeroes(off, n int64, unmap bool) error {
	op := "zeroes"
	if unmap {
		op = "zeroes-unmap"
	}
	id := t.start(op, off, n, nil)
	err := t.s.WriteZeroes(off, n, unmap)
	t.done(id, op, err, nil)
	return err
}

func (t *storage) Geometry() blockdev.Geometry {
	if g, ok := t.s.(blockdev.GeometryReporter); ok {
		return g.Geometry()
	}
	return blockdev.Geometry{}
}

// OpenQueue traces the asynchronous requests of s's queue; without one
// (s is not asynchronous) the device serves everything synchronously.
func (t *storage) OpenQueue(depth int, done func([]blockdev.Completion)) (blockdev.AsyncQueue, error) {
	as, ok := t.s.(blockdev.AsyncStorage)
	if !ok {
		return nil, fmt.Errorf("trace: storage has no asynchronous queues: %w", errors.ErrUnsupported)
	}
	q := &queue{t: t, reqs: make([]asyncReq, depth)}
	inner, err := as.OpenQueue(depth, func(cs []blockdev.Completion) {
		for _, c := range cs {
			if int(c.Tag) < len(q.reqs) {
				q.mu.Lock()
				r := q.reqs[c.Tag]
				q.reqs[c.Tag].bufs = nil
				q.mu.Unlock()
				var data [][]byte
				if r.op == "read" {
					data = r.bufs
				}
				t.done(r.id, r.op, c.Err, data)
			}
		}
		done(cs)
	})
	if err != nil {
		return nil, err
	}
	q.q = inner
	return q, nil
}

type asyncReq struct {
	id   uint64
	op   string
	bufs [][]byte
}

type queue struct {
	t *storage
	q blockdev.AsyncQueue
	// mu orders a request's record (the submitter's) before its completion
	// (the storage's goroutine, which may run before the submitter returns).
	mu   sync.Mutex
	reqs []asyncReq
}

// begin records the start; a request the storage declines is recorded as
// declined (the device then serves it synchronously, traced again).
func (q *queue) begin(tag uint16, op string, off int64, bufs [][]byte, data bool, run func() error) error {
	if int(tag) >= len(q.reqs) {
		return run()
	}
	var traced [][]byte
	if data {
		traced = bufs
	}
	id := q.t.start(op, off, length(bufs), traced)
	q.mu.Lock()
	q.reqs[tag] = asyncReq{id: id, op: op, bufs: bufs}
	q.mu.Unlock()
	if err := run(); err != nil {
		q.t.l.line("D %d %s %s declined", id, q.t.disk, op)
		q.mu.Lock()
		q.reqs[tag].bufs = nil
		q.mu.Unlock()
		return err
	}
	return nil
}

func (q *queue) ReadAt(tag uint16, bufs [][]byte, off int64) error {
	return q.begin(tag, "read", off, bufs, false, func() error { return q.q.ReadAt(tag, bufs, off) })
}

func (q *queue) WriteAt(tag uint16, bufs [][]byte, off int64) error {
	return q.begin(tag, "write", off, bufs, true, func() error { return q.q.WriteAt(tag, bufs, off) })
}

func (q *queue) Flush(tag uint16) error {
	return q.begin(tag, "flush", 0, nil, false, func() error { return q.q.Flush(tag) })
}

func (q *queue) Submit()      { q.q.Submit() }
func (q *queue) Close() error { return q.q.Close() }

var zeroCRC = crc32.ChecksumIEEE(make([]byte, blk.SectorSize))

// Sectors renders the CRC-32 of every 512-byte sector of bufs (read as
// one run of bytes; a partial last sector is summed as it is).
func Sectors(bufs [][]byte) string {
	var sums []uint32
	var sec [blk.SectorSize]byte
	fill := 0
	for _, b := range bufs {
		for len(b) > 0 {
			n := copy(sec[fill:], b)
			fill += n
			b = b[n:]
			if fill == len(sec) {
				sums = append(sums, crc32.ChecksumIEEE(sec[:]))
				fill = 0
			}
		}
	}
	if fill > 0 {
		sums = append(sums, crc32.ChecksumIEEE(sec[:fill]))
	}
	return formatSums(sums)
}

func sumText(s uint32) string {
	if s == zeroCRC {
		return "z"
	}
	return strconv.FormatUint(uint64(s), 16)
}

func formatSums(sums []uint32) string {
	var sb strings.Builder
	for i := 0; i < len(sums); {
		j := i + 1
		for j < len(sums) && sums[j] == sums[i] {
			j++
		}
		if sb.Len() > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(sumText(sums[i]))
		if j-i > 1 {
			fmt.Fprintf(&sb, "*%d", j-i)
		}
		i = j
	}
	return sb.String()
}

// parseSums reverses formatSums.
func parseSums(s string) ([]uint32, error) {
	var out []uint32
	for _, f := range strings.Split(s, ",") {
		val, count := f, 1
		if i := strings.IndexByte(f, '*'); i >= 0 {
			c, err := strconv.Atoi(f[i+1:])
			if err != nil || c < 1 || c > maxRequest/blk.SectorSize {
				return nil, fmt.Errorf("sector run %q", f)
			}
			val, count = f[:i], c
		}
		sum := zeroCRC
		if val != "z" {
			v, err := strconv.ParseUint(val, 16, 32)
			if err != nil {
				return nil, fmt.Errorf("sector sum %q", f)
			}
			sum = uint32(v)
		}
		for range count {
			out = append(out, sum)
		}
	}
	return out, nil
}
