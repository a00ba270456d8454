package thin

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/thinblk/thinblk/pebblemeta"
	"github.com/thinblk/thinblk/stream"
)

// Send and receive (issue 15): a read-only snapshot travels to another
// pool as a stream (package stream), whole or as the changes since an
// older snapshot of the same lineage.
//
// What changed between two snapshots comes from the layered map: the
// snapshot's view is its layer chain, and the older snapshot sits on one
// of its ancestor layers (snapshots of one volume freeze its head layer by
// layer). Every block written, discarded or provisioned since has an entry
// in one of the layers between the two, and no other block does; merges
// and prunes after deletes only move entries between those layers or
// drop ones no view reads. So an incremental stream walks those layers'
// entries only: its cost follows the change, not the volume.
//
// A snapshot's identity across pools is its stream id (VolumeRecord.
// StreamID, random at creation): a received snapshot gets the sender's,
// so an incremental stream names its base by id and the receiver refuses
// one whose base it does not have, or has under another id.

// ErrStreamBase is what receive fails with when an incremental stream's
// base does not match what the pool holds (errors.Is).
var ErrStreamBase = errors.New("stream base does not match")

func newStreamID() [16]byte {
	var id [16]byte
	for id == ([16]byte{}) {
		if _, err := rand.Read(id[:]); err != nil {
			panic(fmt.Sprintf("thin: no random source for a stream id: %v", err)) // crypto/rand does not fail on Linux
		}
	}
	return id
}

// SendOptions configure Send.
type SendOptions struct {
	// Base makes the stream incremental: only what changed since this
	// older snapshot of the same lineage.
	Base string
	// Progress, when set, is called after each record with the block
	// bytes sent so far and the total.
	Progress func(done, total uint64)
}

// sendPlan is what a send walks: the snapshot's volume and the layers
// whose entries it sends, nearest first.
type sendPlan struct {
	h      stream.Header
	layers []uint64
	view   *pebblemeta.Snapshot
	vol    *Volume
}

// Send writes snapshot snap (a read-only snapshot) to w as a stream: all
// of it, or with o.Base what changed since that snapshot. It reads a
// consistent picture of the map while I/O to other volumes goes on.
func (p *Pool) Send(w io.Writer, snap string, o SendOptions) (stream.Header, error) {
	pl, err := p.planSend(snap, o.Base)
	if err != nil {
		return stream.Header{}, err
	}
	defer pl.view.Close()
	// Count first, so that the header says what follows (a receiver
	// reserves its space from it), then send: both walks read the same
	// frozen metadata.
	if err := pl.walk(func(r sendRun) error {
		switch r.typ {
		case stream.TypeData:
			pl.h.DataBlocks += r.count
			if r.prov {
				pl.h.ProvisionedDataBlocks += r.count
			}
		case stream.TypeProvision:
			pl.h.ProvisionBlocks += r.count
		case stream.TypeDiscard:
			pl.h.DiscardBlocks += r.count
		}
		return nil
	}); err != nil {
		return pl.h, fmt.Errorf("send %s: %w", snap, err)
	}
	sw, err := stream.NewWriter(w, pl.h)
	if err != nil {
		return pl.h, fmt.Errorf("send %s: %w", snap, err)
	}
	bs := uint64(p.blockSize)
	total := pl.h.DataBytes()
	// Blocks are read into a frame with room for the record around them:
	// written with one call, not copied again.
	buf := make([]byte, stream.DataHeadroom+pl.h.RunBlocks()*bs+stream.DataTailroom)
	var sent uint64
	err = pl.walk(func(r sendRun) error {
		var err error
		switch r.typ {
		case stream.TypeData:
			n := min((r.first+r.count)*bs, pl.h.VolumeSize) - r.first*bs
			// The snapshot's blocks are read through its volume: the map
			// walk above is a frozen picture, and the read holds the I/O
			// gate, so a block freed meanwhile (the snapshot deleted) is an
			// error here, never another volume's data.
			data := buf[stream.DataHeadroom : stream.DataHeadroom+n]
			if err = pl.vol.ReadAt([][]byte{data}, int64(r.first*bs)); err == nil {
				err = sw.DataFrame(r.first, r.count, r.prov, buf[:stream.DataHeadroom+n+stream.DataTailroom])
			}
			sent += n
		case stream.TypeProvision:
			err = sw.Provision(r.first, r.count)
		case stream.TypeDiscard:
			err = sw.Discard(r.first, r.count)
		}
		if err == nil && o.Progress != nil {
			o.Progress(sent, total)
		}
		return err
	})
	if err == nil {
		err = sw.Close()
	}
	if err != nil {
		return pl.h, fmt.Errorf("send %s: %w", snap, err)
	}
	return pl.h, nil
}

// planSend finds the snapshot (and base) and freezes the metadata to walk.
func (p *Pool) planSend(snap, base string) (*sendPlan, error) {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	p.mu.Lock()
	err := p.usableLocked()
	s, b := p.vols[snap], p.vols[base]
	switch {
	case err != nil:
	case s == nil:
		err = fmt.Errorf("send %s: %w", snap, ErrNoVolume)
	case s.rec.Kind != pebblemeta.KindSnapshot:
		err = fmt.Errorf("send %s: %w: it is a %s; send a read-only snapshot of it (thinblk snapshot create)", snap, ErrInvalid, kindName(s.rec.Kind))
	case base != "" && b == nil:
		err = fmt.Errorf("send %s --from %s: %w", snap, base, ErrNoVolume)
	case base != "" && b.rec.Kind != pebblemeta.KindSnapshot:
		err = fmt.Errorf("send %s --from %s: %w: the base must be a read-only snapshot, it is a %s", snap, base, ErrInvalid, kindName(b.rec.Kind))
	}
	if err != nil {
		p.mu.Unlock()
		return nil, err
	}
	pl := &sendPlan{h: stream.Header{BlockSize: uint32(p.blockSize), VolumeSize: s.rec.Size, Name: snap}}
	// The layers whose entries decide what is sent: the whole chain, or
	// those between the snapshot and its base.
	stop := uint64(0)
	if base != "" {
		stop = b.rec.Layer
	}
	for l := s.rec.Layer; l != stop; l = p.parentLocked(l) {
		if l == 0 {
			p.mu.Unlock()
			return nil, fmt.Errorf("send %s --from %s: %w: %s is not an older snapshot of %s's lineage", snap, base, ErrInvalid, base, snap)
		}
		pl.layers = append(pl.layers, l)
	}
	// Snapshots from before stream ids get theirs now (committed below).
	for _, v := range []*volState{s, b} {
		if v != nil && v.rec.StreamID == ([16]byte{}) {
			v.rec.StreamID = newStreamID()
			p.dirtyVols[v] = struct{}{}
			p.metaDirty = true
		}
	}
	pl.h.ID = s.rec.StreamID
	if base != "" {
		pl.h.Incremental, pl.h.BaseName, pl.h.BaseID = true, base, b.rec.StreamID
	}
	p.mu.Unlock()
	if pl.vol, err = p.Volume(snap); err != nil {
		return nil, fmt.Errorf("send %s: %w", snap, err)
	}
	// Commit pending map changes (a frozen layer's entries may still be
	// pending), then freeze that state.
	if err := p.commitLocked(); err != nil {
		return nil, err
	}
	pl.view = p.store.Snapshot()
	return pl, nil
}

// sendRun is a run of consecutive blocks of one kind.
type sendRun struct {
	typ          byte
	first, count uint64
	prov         bool
}

// sendWindow is how many blocks a walk resolves at a time: memory stays
// bounded whatever the volume's size.
const sendWindow = 1 << 16

// walk calls fn with the runs to send, in block order.
func (pl *sendPlan) walk(fn func(sendRun) error) error {
	nblocks := pl.h.Blocks()
	var cur sendRun
	flush := func() error {
		if cur.count == 0 {
			return nil
		}
		r := cur
		cur.count = 0
		return fn(r)
	}
	runMax := pl.h.RunBlocks()
	decided := make(map[uint64]pebblemeta.Entry, 1024)
	var vbs []uint64
	for lo := uint64(0); lo < nblocks; lo += sendWindow {
		hi := min(lo+sendWindow, nblocks)
		clear(decided)
		vbs = vbs[:0]
		for _, l := range pl.layers {
			err := pl.view.MapRange(l, lo, hi, func(vb uint64, e pebblemeta.Entry) error {
				if _, ok := decided[vb]; !ok {
					decided[vb] = e
					vbs = append(vbs, vb)
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
		sort.Slice(vbs, func(i, j int) bool { return vbs[i] < vbs[j] })
		for _, vb := range vbs {
			e := decided[vb]
			r := sendRun{first: vb, count: 1, prov: e.Provisioned()}
			switch {
			case e.Mapped():
				r.typ = stream.TypeData
			case e.Reserved():
				r.typ, r.prov = stream.TypeProvision, false
			case pl.h.Incremental:
				r.typ, r.prov = stream.TypeDiscard, false // a hole hiding the base's block
			default:
				continue // a hole with nothing under it: the new volume reads zeros anyway
			}
			if cur.count > 0 && cur.typ == r.typ && cur.prov == r.prov && cur.first+cur.count == vb &&
				(r.typ != stream.TypeData || cur.count < runMax) {
				cur.count++
				continue
			}
			if err := flush(); err != nil {
				return err
			}
			cur = r
		}
	}
	return flush()
}
