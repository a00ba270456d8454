package pebblemeta

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"
)

// Headroom: host space the store keeps for itself, in files of its own
// next to Pebble's, and gives up to Pebble when the file system is full.
// Pebble needs new space for its log, flushes and compactions as the pool
// goes on committing, even when only promised writes go on (a provisioned
// block written changes its map entry); on a full file system a commit
// that cannot write the log fails the store, and with it every later
// request, promised ones included. The headroom makes that need none of
// the space others take: Pebble's file system is wrapped (vfs.OnDiskFull)
// so that an ENOSPC removes one piece and the write is retried once; the
// owner (thin) restores the pieces when the host has space again, and
// meanwhile gives no new host space to anything else of the pool.
//
// It is kept in pieces so that one full-disk episode gives up only what
// it needs, not all of it to whoever else writes to the file system.
const headroomPieces = 4

const headroomPrefix = "thinblk-headroom."

type headroom struct {
	fs      vfs.FS // unwrapped: removing a piece must not wait for itself
	dir     string
	piece   int64
	mu      sync.Mutex // serializes release and restore
	missing atomic.Int32
	none    atomic.Bool // the file system cannot keep headroom
	onUsed  func()
}

func newHeadroom(fs vfs.FS, dir string, total int64, onUsed func()) *headroom {
	if total <= 0 {
		return nil
	}
	return &headroom{fs: fs, dir: dir, piece: max(1, total/headroomPieces), onUsed: onUsed}
}

func (h *headroom) name(i int) string {
	return h.fs.PathJoin(h.dir, fmt.Sprintf("%s%d", headroomPrefix, i))
}

func (h *headroom) present(i int) bool {
	fi, err := h.fs.Stat(h.name(i))
	return err == nil && fi.Size() >= h.piece
}

// release is the disk-full callback: Pebble's writes wait while it runs,
// so it only removes a piece.
func (h *headroom) release() {
	h.mu.Lock()
	released := false
	for i := headroomPieces - 1; i >= 0 && !released; i-- {
		if h.present(i) && h.fs.Remove(h.name(i)) == nil {
			released = true
			h.missing.Add(1)
		}
	}
	h.mu.Unlock()
	if released && h.onUsed != nil {
		h.onUsed()
	}
}

// restore allocates the missing pieces on the host. A file system that
// cannot allocate ahead (no fallocate, or an in-memory test file system)
// keeps no headroom: nil, and nothing missing.
func (h *headroom) restore() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var missing int32
	var err error
	for i := range headroomPieces {
		if h.present(i) {
			continue
		}
		if err == nil {
			err = h.allocate(h.name(i))
			if err == errNoHeadroom {
				h.missing.Store(0)
				h.none.Store(true)
				return nil
			}
		}
		if err != nil {
			missing++
		}
	}
	h.missing.Store(missing)
	if err != nil {
		return fmt.Errorf("metadata headroom: %d of %d pieces of %d bytes missing: %w", missing, headroomPieces, h.piece, err)
	}
	return nil
}

var errNoHeadroom = fmt.Errorf("file system cannot keep headroom")

func (h *headroom) allocate(name string) error {
	f, err := h.fs.Create(name, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	fd := f.Fd()
	if fd == vfs.InvalidFd {
		f.Close()
		h.fs.Remove(name)
		return errNoHeadroom
	}
	err = unix.Fallocate(int(fd), 0, 0, h.piece)
	if err == unix.EOPNOTSUPP {
		err = errNoHeadroom
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		h.fs.Remove(name) // a failed fallocate may have taken part of it
	}
	return err
}

// bytes is the headroom held now.
func (h *headroom) bytes() int64 {
	return int64(headroomPieces-int(h.missing.Load())) * h.piece
}

// RestoreHeadroom allocates what the store's headroom lacks (after the
// file system filled up, or at open); it fails, keeping what it could,
// when the host has no space for it.
func (s *Store) RestoreHeadroom() error {
	if s.headroom == nil {
		return nil
	}
	return s.headroom.restore()
}

// HeadroomShort reports whether part of the headroom was given up to
// Pebble (or could not be allocated) and is not restored yet.
func (s *Store) HeadroomShort() bool {
	return s.headroom != nil && s.headroom.missing.Load() > 0
}

// Headroom reports the headroom held now and the headroom wanted, in
// bytes (0, 0 without one).
func (s *Store) Headroom() (have, want int64) {
	if s.headroom == nil || s.headroom.none.Load() {
		return 0, 0
	}
	return s.headroom.bytes(), headroomPieces * s.headroom.piece
}
