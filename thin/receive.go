package thin

import (
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/thinblk/thinblk/pebblemeta"
	"github.com/thinblk/thinblk/stream"
)

// ReceiveOptions configure Receive.
type ReceiveOptions struct {
	// Force lets an incremental stream replace what the volume changed
	// since its base snapshot (like zfs receive -F). Without it such a
	// volume is refused.
	Force bool
	// Progress, when set, is called after each record with the block
	// bytes received so far and the total the header announced.
	Progress func(done, total uint64)
}

// Receive reads a stream from r into volume. A full stream creates the
// volume; an incremental one applies to the volume whose latest snapshot
// is the stream's base (by id). Either way the volume then gets a
// read-only snapshot named and identified as the sent one, so that the
// next incremental stream applies. The space the stream needs is
// reserved before anything is written, or Receive fails with ErrNoSpace.
// A stream that turns out bad (stream.ErrBadStream) or any other failure
// leaves nothing half made: no volume after a full stream, the volume back
// on its base snapshot after an incremental one.
func (p *Pool) Receive(r io.Reader, volume string, o ReceiveOptions) (stream.Header, error) {
	sr, err := stream.NewReader(r)
	if err != nil {
		return stream.Header{}, fmt.Errorf("receive %s: %w", volume, err)
	}
	h := sr.Header()
	base, err := p.startReceive(volume, &h, o.Force)
	if err != nil {
		return h, fmt.Errorf("receive %s: %w", volume, err)
	}
	if err := p.applyStream(sr, volume, &h, o.Progress); err != nil {
		if uerr := p.undoReceive(volume, base); uerr != nil {
			err = fmt.Errorf("%w; undoing it failed too: %v", err, uerr)
		}
		return h, fmt.Errorf("receive %s: %w", volume, err)
	}
	// The snapshot ends the hold: what is left of it covers the
	// reservations the snapshot makes (its provisioned blocks become
	// shared), so that they cannot fail for space now.
	err = p.CreateSnapshots([]SnapshotSpec{{Origin: volume, Name: h.Name, streamID: h.ID}})
	if err != nil {
		if uerr := p.undoReceive(volume, base); uerr != nil {
			err = fmt.Errorf("%w; undoing it failed too: %v", err, uerr)
		}
		return h, fmt.Errorf("receive %s: %w", volume, err)
	}
	// The snapshot released what the hold had left beyond its needs.
	if err := p.holdForReceive(volume, 0); err != nil {
		return h, fmt.Errorf("receive %s: %w", volume, err)
	}
	return h, nil
}

// startReceive checks that the stream can apply, creates the volume (full
// stream) and reserves the stream's space. It returns the base snapshot's
// name (incremental).
func (p *Pool) startReceive(volume string, h *stream.Header, force bool) (string, error) {
	if h.BlockSize != uint32(p.blockSize) {
		return "", fmt.Errorf("%w: the stream's block size is %d, this pool's %d (pools must have the same block size)", ErrInvalid, h.BlockSize, p.blockSize)
	}
	if err := pebblemeta.ValidVolumeName(h.Name); err != nil {
		return "", fmt.Errorf("%w: the stream's snapshot name: %v", ErrInvalid, err)
	}
	if err := pebblemeta.ValidVolumeName(volume); err != nil {
		return "", fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if volume == h.Name {
		return "", fmt.Errorf("%w: the volume cannot have the name of the snapshot the stream makes (%s)", ErrInvalid, h.Name)
	}
	// Every data and provision block may need a block; once snapshotted,
	// every provisioned data block needs one more reserved for its copy.
	need := h.DataBlocks + h.ProvisionBlocks + h.ProvisionedDataBlocks
	if !h.Incremental {
		if err := p.receiveFits(volume, h, need); err != nil {
			return "", err
		}
		if err := p.CreateVolume(volume, h.VolumeSize); err != nil {
			return "", err
		}
		if err := p.holdForReceive(volume, need); err != nil {
			if derr := p.DeleteVolume(volume); derr != nil {
				err = fmt.Errorf("%w; deleting the new volume failed: %v", err, derr)
			}
			return "", err
		}
		return "", nil
	}
	base, dirty, err := p.receiveBase(volume, h)
	if err != nil {
		return "", err
	}
	if dirty && !force {
		return "", fmt.Errorf("%w: volume %s changed since snapshot %s; receive --force drops those changes", ErrStreamBase, volume, base)
	}
	if err := p.receiveFits(volume, h, need); err != nil {
		return "", err
	}
	if dirty {
		if err := p.undoReceive(volume, base); err != nil {
			return "", fmt.Errorf("drop volume %s's changes since %s: %w", volume, base, err)
		}
	}
	if err := p.ResizeVolume(volume, h.VolumeSize); err != nil {
		return "", err
	}
	if err := p.holdForReceive(volume, need); err != nil {
		if uerr := p.undoReceive(volume, base); uerr != nil {
			err = fmt.Errorf("%w; undoing the resize failed: %v", err, uerr)
		}
		return "", err
	}
	return base, nil
}

// receiveFits fails when the stream's snapshot name is taken or the pool
// cannot hold need more blocks, before anything changes.
func (p *Pool) receiveFits(volume string, h *stream.Header, need uint64) error {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	if err := p.settleReleasesLocked(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.usableLocked(); err != nil {
		return err
	}
	if p.vols[h.Name] != nil {
		return fmt.Errorf("snapshot %s: %w", h.Name, ErrVolumeExists)
	}
	if !h.Incremental && p.vols[volume] != nil {
		return fmt.Errorf("volume %s: %w (a full stream creates it)", volume, ErrVolumeExists)
	}
	if free := p.freeLocked(); need > free {
		return fmt.Errorf("%w: the stream needs %d blocks (%d bytes), %d are free", ErrNoSpace, need, need*uint64(p.blockSize), free)
	}
	return nil
}

// holdForReceive reserves n blocks for the stream being received into
// volume (0 gives them back): its writes and provisioning take their
// blocks out of this reservation, so no other writer can use the space
// meanwhile.
func (p *Pool) holdForReceive(volume string, n uint64) error {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	if n > 0 {
		if err := p.settleReleasesLocked(); err != nil {
			return err
		}
	}
	// The hold is a reservation like any other: it has its spares on the
	// host (host.go), or the receive fails with "no space" up front.
	var hb hostBacking
	defer hb.done(p)
	for {
		p.mu.Lock()
		v := p.vols[volume]
		if v == nil {
			p.mu.Unlock()
			return fmt.Errorf("volume %s: %w", volume, ErrNoVolume)
		}
		if n > v.recvRes {
			more := n - v.recvRes
			if free := p.freeLocked(); more > free {
				p.mu.Unlock()
				return fmt.Errorf("%w: the stream needs %d blocks (%d bytes), %d are free", ErrNoSpace, n, n*uint64(p.blockSize), free)
			}
			if !p.enoughSparesLocked(&hb, more) {
				p.mu.Unlock()
				if err := p.backFor(&hb, &hostNeed{spares: more}); err != nil {
					return fmt.Errorf("receive into %s: %w", volume, err)
				}
				continue
			}
		}
		v.recvRes = n
		p.reaccountLocked(v)
		if n == 0 {
			p.spaceFreedLocked() // what was held is free again: wake waiting writers
		} else {
			p.noteSpaceLocked()
		}
		p.mu.Unlock()
		return nil
	}
}

// receiveBase finds the snapshot an incremental stream applies to: the
// volume's latest snapshot, which must carry the stream's base id. dirty
// says the volume was changed since (its head has entries, or it grew).
func (p *Pool) receiveBase(volume string, h *stream.Header) (base string, dirty bool, err error) {
	p.flushMu.Lock()
	defer p.flushMu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.usableLocked(); err != nil {
		return "", false, err
	}
	if p.vols[h.Name] != nil {
		return "", false, fmt.Errorf("snapshot %s: %w", h.Name, ErrVolumeExists)
	}
	v := p.vols[volume]
	if v == nil {
		return "", false, fmt.Errorf("%w: volume %s: %w (an incremental stream applies to a volume received before; send the full stream first)", ErrStreamBase, volume, ErrNoVolume)
	}
	if v.rec.Kind == pebblemeta.KindSnapshot {
		return "", false, fmt.Errorf("volume %s: %w", volume, ErrReadOnly)
	}
	var byID, byName, latest *volState
	parent := p.parentLocked(v.rec.Layer)
	for _, s := range p.vols {
		if s.rec.Kind != pebblemeta.KindSnapshot {
			continue
		}
		if s.rec.StreamID == h.BaseID {
			byID = s
		}
		if s.rec.Name == h.BaseName {
			byName = s
		}
		if s.rec.Layer == parent && parent != 0 && (latest == nil || s.rec.StreamID == h.BaseID) {
			latest = s
		}
	}
	id := stream.ID(h.BaseID)
	switch {
	case byID == nil && byName != nil:
		return "", false, fmt.Errorf("%w: snapshot %s here has id %s, the stream's base %s has id %s: it is another snapshot (changed, or of another lineage)",
			ErrStreamBase, byName.rec.Name, stream.ID(byName.rec.StreamID), h.BaseName, id)
	case byID == nil:
		return "", false, fmt.Errorf("%w: this pool has no snapshot %s (id %s) to apply the incremental stream to", ErrStreamBase, h.BaseName, id)
	case latest == nil || latest.rec.StreamID != h.BaseID:
		return "", false, fmt.Errorf("%w: volume %s is not on snapshot %s (id %s): it has another latest snapshot, or none", ErrStreamBase, volume, byID.rec.Name, id)
	}
	// Changed since the base: any entry in the head (committed or
	// pending, holes included), or a new size.
	entries := 0
	if err := p.rangeLocked(v.rec.Layer, 0, math.MaxUint64, func(uint64, pebblemeta.Entry) { entries++ }); err != nil {
		return "", false, err
	}
	return latest.rec.Name, entries > 0 || v.rec.Size != latest.rec.Size, nil
}

// undoReceive removes what a failed receive made: the new volume (full
// stream), or the volume's changes since its base snapshot (incremental:
// the volume becomes a writable clone of the base, as it was when the
// base was taken).
func (p *Pool) undoReceive(volume, base string) error {
	p.holdForReceive(volume, 0)
	if err := p.DeleteVolume(volume); err != nil && !errors.Is(err, ErrNoVolume) {
		return err
	}
	if base == "" {
		return nil
	}
	return p.CreateSnapshot(base, volume, true)
}

// applyStream writes the stream's records into volume.
func (p *Pool) applyStream(sr *stream.Reader, volume string, h *stream.Header, progress func(done, total uint64)) error {
	v, err := p.Volume(volume)
	if err != nil {
		return err
	}
	bs := uint64(p.blockSize)
	span := func(r stream.Record) (int64, int64) {
		off := r.First * bs
		return int64(off), int64(min((r.First+r.Count)*bs, h.VolumeSize) - off)
	}
	for {
		rec, err := sr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		off, n := span(rec)
		switch rec.Type {
		case stream.TypeData:
			// The blocks end as the sender's: provisioned ones reserved
			// first (provisioning zeroes a mapped block, so it cannot
			// come after the data); in an incremental stream, a block of
			// the base that is provisioned and now is not was discarded
			// in between, so discard first (a hole, replaced at once).
			switch {
			case rec.Provisioned:
				err = v.WriteZeroes(off, n, false)
			case h.Incremental:
				err = v.Discard(off, n)
			}
			if err == nil {
				err = v.WriteAt([][]byte{rec.Data}, off)
			}
		case stream.TypeProvision:
			err = v.WriteZeroes(off, n, false)
		case stream.TypeDiscard:
			err = v.Discard(off, n)
		}
		if err != nil {
			return fmt.Errorf("apply %s record for blocks %d+%d: %w", stream.TypeName(rec.Type), rec.First, rec.Count, err)
		}
		if progress != nil {
			progress(sr.DataBytes(), h.DataBytes())
		}
	}
}
