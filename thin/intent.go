package thin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/thinblk/thinblk/pebblemeta"
)

// The intent log keeps the map changes made since the last metadata
// commit where a killed process cannot lose them: every change is written
// (not synced) to a file of the pool directory before the request that
// made it completes, so it sits in the OS page cache next to the data it
// maps, which a process kill does not lose either. Opening the pool on the
// same boot replays it over the committed state and commits the result;
// after a reboot (a power loss, when the page cache may have lost the
// data too) it is dropped, and the pool is as of its last commit, as a
// disk's volatile cache is after a power loss: only what a completed FLUSH
// covered is promised.
//
// Pebble's own WAL cannot serve here: a batch committed without sync stays
// in the LogWriter's user-space buffer until a sync or a full 32 KiB block
// writes it out, so a kill loses it; with sync, every allocating write
// would wait for an fsync (and the data's fdatasync before it).
//
// Files: thinblk.intent.GEN, one per commit generation. A cut rotates to
// the next generation under the pool lock; a file is removed once the
// commit of its cut is durable. Replay reads them in generation order;
// replaying a file whose cut was in fact committed (a kill between the
// commit and the removal) only repeats changes the state already has, and
// a block freed in a generation is never reused within it.
//
//	header: magic [8]byte "thinINT1", boot id [40]byte (NUL-padded), generation u64
//	record: layer u64, vb u64, pblock u64, flags u8, pad [3]byte, crc32c u32 of the 28 bytes before
//
// A record of layer 0 (no layer has that id) with vb intentSpare says
// pblock became a spare (host.go): backSpares host-allocates spares for
// the reservations a request is about to make, and the spare set is
// otherwise only in the commit, so a replayed reservation would have none
// and, on a full host, could not get one. A spare a write consumed needs
// no record: the map record that takes the block takes it out of the set.
const (
	intentPrefix     = "thinblk.intent."
	intentMagic      = "thinINT1"
	intentHeaderSize = 8 + 40 + 8
	intentRecordSize = 32
	intentSpare      = 1 // vb of a layer-0 record: pblock became a spare
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// bootID identifies the running kernel: the page cache outlives a process
// only within one boot.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// intentLog is the pool's open intent file. Guarded by Pool.mu.
type intentLog struct {
	fs   vfs.FS
	dir  string
	boot string
	gen  uint64
	f    vfs.File
	buf  []byte // records not yet written
	// failed is the first write error (f may then be nil): requests whose
	// records it could not take commit before they complete, and the
	// next commit starts a new log (see Pool.intentWriteLocked and
	// Pool.restartIntentLocked).
	failed error
}

func intentPath(fs vfs.FS, dir string, gen uint64) string {
	return fs.PathJoin(dir, intentPrefix+strconv.FormatUint(gen, 10))
}

// openIntent starts generation gen.
func openIntent(fs vfs.FS, dir, boot string, gen uint64) (*intentLog, error) {
	f, err := fs.Create(intentPath(fs, dir, gen), vfs.WriteCategoryUnspecified)
	if err != nil {
		return nil, fmt.Errorf("intent log: %w", err)
	}
	hdr := make([]byte, intentHeaderSize)
	copy(hdr, intentMagic)
	copy(hdr[8:48], boot)
	binary.LittleEndian.PutUint64(hdr[48:], gen)
	if _, err := f.Write(hdr); err != nil {
		f.Close()
		// A file without its header would stop the replay of later ones.
		_ = fs.Remove(intentPath(fs, dir, gen))
		return nil, fmt.Errorf("intent log: %w", err)
	}
	return &intentLog{fs: fs, dir: dir, boot: boot, gen: gen, f: f}, nil
}

// add queues the record of one map change.
func (l *intentLog) add(k mapKey, e pebblemeta.Entry) {
	var r [intentRecordSize]byte
	binary.LittleEndian.PutUint64(r[0:], k.layer)
	binary.LittleEndian.PutUint64(r[8:], k.vb)
	binary.LittleEndian.PutUint64(r[16:], e.PBlock)
	r[24] = e.Flags
	binary.LittleEndian.PutUint32(r[28:], crc32.Checksum(r[:28], crc32c))
	l.buf = append(l.buf, r[:]...)
}

// addSpare queues the record of a new spare block.
func (l *intentLog) addSpare(b uint64) {
	l.add(mapKey{0, intentSpare}, pebblemeta.Entry{PBlock: b})
}

// write hands the queued records to the OS (one system call, no sync).
func (l *intentLog) write() error {
	if len(l.buf) == 0 || l.failed != nil {
		l.buf = l.buf[:0]
		return l.failed
	}
	_, err := l.f.Write(l.buf)
	l.buf = l.buf[:0]
	if err != nil {
		l.failed = fmt.Errorf("intent log %s: %w", intentPath(l.fs, l.dir, l.gen), err)
	}
	return l.failed
}

// rotate starts the next generation and returns the old one, still open,
// for retire once its cut is durable. Records queued and not written
// (requests write theirs before they complete, under the pool lock that
// the cut holds) are dropped: their changes are in the cut.
func (l *intentLog) rotate() (old *intentLog, err error) {
	l.buf = l.buf[:0]
	n, err := openIntent(l.fs, l.dir, l.boot, l.gen+1)
	if err != nil {
		return nil, err
	}
	old = &intentLog{fs: l.fs, dir: l.dir, gen: l.gen, f: l.f}
	*l = *n
	return old, nil
}

// retire closes and removes a generation whose cut is durable.
func (l *intentLog) retire() error {
	if l.f == nil {
		return nil // never created (see failedIntent)
	}
	l.f.Close()
	l.f = nil
	err := l.fs.Remove(intentPath(l.fs, l.dir, l.gen))
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	return err
}

// failedIntent stands for generation gen when its file could not be
// started (a full host): nothing is logged until a commit restarts it.
func failedIntent(fs vfs.FS, dir, boot string, gen uint64, err error) *intentLog {
	return &intentLog{fs: fs, dir: dir, boot: boot, gen: gen, failed: err}
}

// intentFiles lists the generations present in dir, oldest first.
func intentFiles(fs vfs.FS, dir string) ([]uint64, error) {
	names, err := fs.List(dir)
	if err != nil {
		return nil, err
	}
	var gens []uint64
	for _, n := range names {
		if s, ok := strings.CutPrefix(n, intentPrefix); ok {
			if g, err := strconv.ParseUint(s, 10, 64); err == nil {
				gens = append(gens, g)
			}
		}
	}
	slices.Sort(gens)
	return gens, nil
}

// readIntent returns the records of one file, in order. A torn or
// damaged tail (its checksum wrong) ends the file: records are written in
// order, so what precedes it is whole.
func readIntent(fs vfs.FS, dir string, gen uint64, boot string) (recs []intentRecord, sameBoot bool, err error) {
	f, err := fs.Open(intentPath(fs, dir, gen))
	if err != nil {
		return nil, false, err
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, false, err
	}
	if len(b) < intentHeaderSize || string(b[:8]) != intentMagic || binary.LittleEndian.Uint64(b[48:]) != gen {
		return nil, false, errors.New("not an intent log of this generation")
	}
	if strings.TrimRight(string(b[8:48]), "\x00") != boot || boot == "" {
		return nil, false, nil
	}
	for r := b[intentHeaderSize:]; len(r) >= intentRecordSize; r = r[intentRecordSize:] {
		if crc32.Checksum(r[:28], crc32c) != binary.LittleEndian.Uint32(r[28:]) {
			break
		}
		recs = append(recs, intentRecord{
			k: mapKey{binary.LittleEndian.Uint64(r[0:]), binary.LittleEndian.Uint64(r[8:])},
			e: pebblemeta.Entry{Flags: r[24], PBlock: binary.LittleEndian.Uint64(r[16:])},
		})
	}
	return recs, true, nil
}

type intentRecord struct {
	k mapKey
	e pebblemeta.Entry
}

// intentWriteLocked writes the queued intent records before the request
// that made them completes. Records the log cannot take (it failed: on a
// full host, ENOSPC) count in unloggedSeq, and the request commits before
// it completes (commitUnlogged): an acknowledged write must outlive a
// kill, and a provisioned one must not fail for want of host space, which
// the commit has (the metadata's headroom) and the log may not.
func (p *Pool) intentWriteLocked() {
	if p.intent == nil || len(p.intent.buf) == 0 {
		return
	}
	if err := p.intent.write(); err != nil {
		p.unloggedSeq.Add(1)
		if time.Since(p.intentErrLog) > time.Minute {
			p.intentErrLog = time.Now()
			p.log.Error("intent log cannot be written: requests that change the map commit before they complete until it can", "pool", p.dir, "err", err)
		}
	}
}

// commitUnlogged commits when map changes the intent log could not take
// are not durable yet; requests call it before they complete.
func (p *Pool) commitUnlogged() error {
	if p.unloggedSeq.Load() <= p.unloggedDurable.Load() {
		return nil
	}
	return p.commit()
}

// restartIntentLocked follows a durable commit: a failed log's changes are
// all in it, so its file goes and a new generation starts (or stays
// failed, for the next commit to try again).
func (p *Pool) restartIntentLocked() {
	l := p.intent
	if l == nil || l.failed == nil {
		return
	}
	_ = l.retire()
	n, err := openIntent(l.fs, l.dir, l.boot, l.gen+1)
	if err != nil {
		p.intent = failedIntent(l.fs, l.dir, l.boot, l.gen+1, err)
		return
	}
	p.intent = n
	p.log.Info("intent log written again", "pool", p.dir)
}

// replayIntent applies the intent logs left by a process that did not
// close the pool, commits the result and starts a new log. Called by open
// before anything else uses the pool.
func (p *Pool) replayIntent(fs vfs.FS, boot string) error {
	gens, err := intentFiles(fs, p.dir)
	if err != nil {
		return fmt.Errorf("intent log: %w", err)
	}
	applied, dropped := 0, 0
	stop := false
	for _, g := range gens {
		recs, same, err := readIntent(fs, p.dir, g, boot)
		switch {
		case err != nil:
			p.log.Error("intent log unreadable: map changes after the last commit are lost", "pool", p.dir, "generation", g, "err", err)
			stop = true
		case !same:
			p.log.Warn("intent log from an earlier boot dropped: the pool is as of its last commit (what a completed FLUSH covered)", "pool", p.dir, "generation", g)
			stop = true
		}
		for _, r := range recs {
			if stop {
				dropped++
				continue
			}
			if err := p.applyIntentLocked(r); err != nil {
				p.log.Error("intent log record does not fit the committed state: it and the later ones are dropped (run check)",
					"pool", p.dir, "generation", g, "layer", r.k.layer, "block", r.k.vb, "err", err)
				stop = true
				dropped++
				continue
			}
			applied++
		}
	}
	if applied > 0 {
		p.log.Info("map changes completed before the process ended replayed from the intent log", "pool", p.dir, "changes", applied, "dropped", dropped)
		// The data they map is in the page cache, not yet synced: the
		// commit syncs it (open set dataDirty) before the mappings.
		if err := p.commitLocked(); err != nil {
			return fmt.Errorf("commit the replayed intent log: %w", err)
		}
	}
	next := uint64(1)
	if len(gens) > 0 {
		next = gens[len(gens)-1] + 1
	}
	if p.intent, err = openIntent(fs, p.dir, boot, next); err != nil {
		// A full host must not keep the pool from opening: requests
		// commit instead until a commit restarts the log.
		p.log.Error("intent log cannot be started: requests that change the map commit before they complete until it can", "pool", p.dir, "err", err)
		p.intent = failedIntent(fs, p.dir, boot, next, err)
	}
	for _, g := range gens {
		if err := fs.Remove(intentPath(fs, p.dir, g)); err != nil {
			return fmt.Errorf("intent log: %w", err)
		}
	}
	return nil
}

// applyIntentLocked makes one logged map change again, with the block
// bookkeeping the original request did: the new entry's block taken, the
// old entry's block freed (reusable after the next commit).
func (p *Pool) applyIntentLocked(r intentRecord) error {
	if r.k.layer == 0 && r.k.vb == intentSpare {
		b := r.e.PBlock
		if b >= p.rec.SizeBlocks {
			return fmt.Errorf("spare block %d beyond the pool", b)
		}
		// Taken since (a file whose cut was committed, replayed again):
		// the state has it already.
		if !p.alloc.test(b) && !p.pend.test(b) {
			p.setSpareLocked(b)
		}
		return nil
	}
	if r.k.layer == 0 || p.heads[r.k.layer] == nil && p.layers[r.k.layer] == nil {
		return errors.New("no such layer")
	}
	if r.e.Mapped() && r.e.PBlock >= p.rec.SizeBlocks {
		return fmt.Errorf("block %d beyond the pool", r.e.PBlock)
	}
	old, err := p.lookupLocked(r.k)
	if err != nil {
		return err
	}
	if old == r.e {
		return nil
	}
	takes := r.e.Mapped() && (!old.Mapped() || old.PBlock != r.e.PBlock)
	if takes && (p.alloc.test(r.e.PBlock) || p.pend.test(r.e.PBlock)) {
		return fmt.Errorf("block %d is not free", r.e.PBlock)
	}
	ancProv := false
	if parent := p.parentLocked(r.k.layer); parent != 0 {
		a, _, err := p.resolveLocked(parent, r.k.vb)
		if err != nil {
			return err
		}
		ancProv = a.Provisioned()
	}
	if old.Mapped() && (!r.e.Mapped() || old.PBlock != r.e.PBlock) {
		p.releaseLocked(old.PBlock)
	}
	if takes {
		if p.spare.test(r.e.PBlock) {
			// A fill from a spare stays a spare on disk until a commit
			// after its publication: the write consumed it.
			p.clearSpareLocked(r.e.PBlock)
		}
		p.alloc.set(r.e.PBlock)
		p.dirtyChunks[r.e.PBlock/chunkBlocks] = struct{}{}
	}
	p.setEntryLocked(r.k.layer, r.k.vb, old, r.e, ancProv)
	return nil
}
