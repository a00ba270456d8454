package blktrace

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/thinblk/thinblk/virtio/blk"
)

// Mismatch is a read that returned something other than what the disk
// held: the last write to the sector (or zeros, for a sector never written
// or discarded since), with no write to it in flight during the read.
type Mismatch struct {
	Disk   string
	Read   uint64 // the read's ID
	Sector int64  // byte offset of the sector
	Got    uint32 // CRC the read returned
	Want   uint32 // CRC of what the disk held
	// Writer is the ID of the write (0: never written or zeroed since)
	// that left the sector as it should read; WriterDone its completion's
	// sequence number.
	Writer     uint64
	WriterDone uint64
	ReadStart  uint64
	ReadDone   uint64
}

func (m Mismatch) String() string {
	what := "never written, or discarded/zeroed"
	if m.Writer != 0 {
		what = fmt.Sprintf("written by request %d (completed at seq %d)", m.Writer, m.WriterDone)
	}
	return fmt.Sprintf("disk %s: read %d (seq %d-%d) at byte %d (0x%x) returned %s, want %s: %s",
		m.Disk, m.Read, m.ReadStart, m.ReadDone, m.Sector, m.Sector, sumText(m.Got), sumText(m.Want), what)
}

// CheckResult is what Check found.
type CheckResult struct {
	Requests   int        // requests completed
	Reads      int        // reads checked
	Sectors    int        // read sectors compared
	Ambiguous  int        // read sectors skipped: a write to them was in flight
	Bad        int        // read sectors that differ from what the disk held
	Mismatches []Mismatch // the first of them
}

type sectorState struct {
	sum      uint32
	writer   uint64
	doneSeq  uint64
	inflight int32
	// racy: two writes to the sector overlapped in time; its content is
	// one of theirs, unknown until the next write alone.
	racy bool
}

type pending struct {
	op       string
	off, n   int64
	startSeq uint64
	sums     []uint32
}

type diskModel struct {
	sectors map[int64]*sectorState
	open    map[uint64]*pending
	// zeroing holds the discards and write-zeroes in flight (few, but
	// possibly huge: not counted per sector).
	zeroing map[uint64]*pending
}

// zeroingAt reports whether a discard or write-zeroes of sector s is in
// flight.
func (d *diskModel) zeroingAt(s int64) bool {
	for _, z := range d.zeroing {
		if s >= z.off && s < z.off+z.n {
			return true
		}
	}
	return false
}

// each calls fn for every sector of [off, off+n) the model holds.
func (d *diskModel) each(off, n int64, fn func(s int64, st *sectorState)) {
	if n/blk.SectorSize <= int64(len(d.sectors)) {
		for s := off; s < off+n; s += blk.SectorSize {
			if st := d.sectors[s]; st != nil {
				fn(s, st)
			}
		}
		return
	}
	for s, st := range d.sectors {
		if s >= off && s < off+n {
			fn(s, st)
		}
	}
}

// landed records a completed change of the sector: sum is its content,
// or unknown (racy) when the change failed or overlapped another one in
// time (another change completed after this one started, or is still in
// flight), since which landed last cannot be told.
func (st *sectorState) landed(id, seq, startSeq uint64, sum uint32, ok, zeroing bool) {
	st.racy = !ok || st.doneSeq > startSeq || st.inflight > 0 || zeroing
	st.writer, st.doneSeq, st.sum = id, seq, sum
}

// Check replays a trace whose disks started out all zeros (new volumes or
// files) and returns the reads that did not return what the disk held.
// limit bounds the mismatches kept (0: 100).
func Check(r io.Reader, limit int) (*CheckResult, error) {
	if limit <= 0 {
		limit = 100
	}
	res := &CheckResult{}
	disks := map[string]*diskModel{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		f := strings.Fields(sc.Text())
		bad := func(what string) error {
			return fmt.Errorf("trace line %d: %s: %q", lineNo, what, sc.Text())
		}
		if len(f) == 0 {
			continue
		}
		if len(f) < 4 {
			return nil, bad("too few fields")
		}
		if f[2] == "N" {
			continue
		}
		seq, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return nil, bad("sequence number")
		}
		if len(f) < 7 {
			return nil, bad("too few fields")
		}
		id, err := strconv.ParseUint(f[3], 10, 64)
		if err != nil {
			return nil, bad("request id")
		}
		d := disks[f[4]]
		if d == nil {
			d = &diskModel{sectors: map[int64]*sectorState{}, open: map[uint64]*pending{}, zeroing: map[uint64]*pending{}}
			disks[f[4]] = d
		}
		op := f[5]
		switch f[2] {
		case "S":
			off, err1 := strconv.ParseInt(f[6], 10, 64)
			var n int64
			var err2 error
			if len(f) > 7 {
				n, err2 = strconv.ParseInt(f[7], 10, 64)
			}
			if err1 != nil || err2 != nil || off < 0 || n < 0 || n > maxRequest || off%blk.SectorSize != 0 {
				return nil, bad("range")
			}
			p := &pending{op: op, off: off, n: n, startSeq: seq}
			if op == "write" {
				if len(f) < 9 {
					return nil, bad("write without sector sums")
				}
				if p.sums, err = parseSums(f[8]); err != nil {
					return nil, bad(err.Error())
				}
			}
			d.open[id] = p
			if op == "write" {
				for s := off; s < off+n; s += blk.SectorSize {
					d.state(s).inflight++
				}
			} else if modifies(op) {
				d.zeroing[id] = p
			}
		case "D":
			p := d.open[id]
			if p == nil {
				return nil, bad("completion of a request never started")
			}
			delete(d.open, id)
			if f[6] == "declined" {
				undo(d, id, p)
				continue
			}
			res.Requests++
			ok := f[6] == "ok"
			switch {
			case p.op == "read" && ok:
				if len(f) < 8 {
					return nil, bad("read without sector sums")
				}
				sums, err := parseSums(f[7])
				if err != nil {
					return nil, bad(err.Error())
				}
				res.Reads++
				for i, s := 0, p.off; s < p.off+p.n && i < len(sums); i, s = i+1, s+blk.SectorSize {
					st := d.sectors[s]
					want, writer, wdone := zeroCRC, uint64(0), uint64(0)
					if d.zeroingAt(s) {
						res.Ambiguous++
						continue
					}
					if st != nil {
						if st.inflight > 0 || st.racy || st.doneSeq > p.startSeq {
							res.Ambiguous++
							continue
						}
						want, writer, wdone = st.sum, st.writer, st.doneSeq
					}
					res.Sectors++
					if sums[i] == want {
						continue
					}
					res.Bad++
					if len(res.Mismatches) < limit {
						res.Mismatches = append(res.Mismatches, Mismatch{Disk: f[4], Read: id, Sector: s, Got: sums[i], Want: want,
							Writer: writer, WriterDone: wdone, ReadStart: p.startSeq, ReadDone: seq})
					}
				}
			case p.op == "write":
				for i, s := 0, p.off; s < p.off+p.n; i, s = i+1, s+blk.SectorSize {
					st := d.state(s)
					st.inflight--
					sum := zeroCRC
					if i < len(p.sums) {
						sum = p.sums[i]
					}
					st.landed(id, seq, p.startSeq, sum, ok, d.zeroingAt(s))
				}
			case modifies(p.op):
				delete(d.zeroing, id)
				// A discard can cover the whole disk (mkfs): only sectors written
				// before need an update, the rest read as zeros already.
				d.each(p.off, p.n, func(s int64, st *sectorState) {
					st.landed(id, seq, p.startSeq, zeroCRC, ok, d.zeroingAt(s))
				})
			}
		default:
			return nil, bad("event kind")
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("trace: %w", err)
	}
	return res, nil
}

// maxRequest bounds one request's length (virtio-blk allows 2 GiB reads
// and writes, 4 GiB discards with the default segment limit).
const maxRequest = 4 << 30

// modifies reports whether op changes the disk's content.
func modifies(op string) bool {
	return op == "write" || op == "discard" || op == "zeroes" || op == "zeroes-unmap"
}

// undo forgets a declined request (it is started again, synchronously).
func undo(d *diskModel, id uint64, p *pending) {
	delete(d.zeroing, id)
	if p.op == "write" {
		for s := p.off; s < p.off+p.n; s += blk.SectorSize {
			d.state(s).inflight--
		}
	}
}

func (d *diskModel) state(s int64) *sectorState {
	st := d.sectors[s]
	if st == nil {
		st = &sectorState{sum: zeroCRC}
		d.sectors[s] = st
	}
	return st
}
