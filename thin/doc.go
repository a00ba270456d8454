// Package thin is a thin-provisioned block pool: a data file carved into
// fixed-size blocks, plus a Pebble store (package pebblemeta) holding every
// volume's block map and the pool's space accounting. Volumes are virtual:
// space is taken when the guest first writes a block, given back by
// DISCARD / WRITE_ZEROES+unmap, and reserved ahead of time by
// WRITE_ZEROES without unmap (provisioning), which is a promise that later
// writes there never fail for lack of space.
//
// # Using it
//
//	thin.Create(dir, thin.CreateOptions{Size: 20 << 30})     // once
//	p, err := thin.Open(dir, thin.OpenOptions{Logger: log}) // exclusive
//	p.CreateVolume("vm1", 100<<30)
//	v, _ := p.Volume("vm1") // *Volume implements blockdev.Storage
//	v.WriteAt(bufs, off); v.Flush(); ...
//	p.Status(); p.Check(progress); p.Grow(size); p.Watch(fn); p.Close()
//
// A pool directory holds thinblk.data (the blocks), thinblk.meta/ (Pebble)
// and thinblk.lock (held while open; a second opener gets ErrLocked), and
// while open thinblk.intent.N (intent.go).
//
// Management operations (CreateVolume, ResizeVolume, DeleteVolume, Grow)
// are durable when they return. Watch callbacks then see them in commit
// order, outside the pool's locks. DeleteVolume is the only operation that
// walks a map (the deleted volume's, in batches, outside the pool lock).
// Check commits, then walks everything in a Pebble snapshot of that
// commit, so I/O and commits go on while it runs.
//
// # Metadata (pebblemeta keys)
//
//	"f"                  format version (newer formats are refused)
//	"p"                  pool record: block size, size, policies, counters
//	"v" NAME             volume record: head layer, size, mapped/provisioned/reserved/
//	                     chain-provisioned counters, kind, origin, reserve mode,
//	                     a read-only snapshot's stream id (send.go)
//	"m" LAYER(8) VB(8)   map entry: flags (mapped, provisioned) + physical block
//	"b" CHUNK(8)         allocation bitmap, 4096 blocks (512 bytes) per key
//	"s" CHUNK(8)         spare set (free blocks kept allocated on the host), same layout
//
// A map entry is "mapped" (owns physical block PBlock), "provisioned" (a
// sticky bit set by WRITE_ZEROES without unmap) or both; provisioned and
// not mapped is a reservation. No entry means unmapped and unprovisioned:
// reads return zeros. Maps are keyed by layer, not by volume name; today
// every volume has one layer of its own (see Snapshots for why).
//
// # Space accounting
//
// In memory the pool keeps the allocation bitmap (1 bit per pool block;
// blocks owned, being filled, or freed but not yet reusable), the pool
// counters (allocated = mapped entries, reserved = reservations) and each
// volume's counters. Every map change goes through one function that
// adjusts all counters, so accounting is exact and O(1) per block:
// free = size - bitmap population - reservations (+ reservations being
// consumed by in-flight fills), and Status reports allocated + reserved +
// free = size at every moment. A write needing k new blocks takes them
// all or fails/waits as a whole; a block with a reservation converts it
// into an allocation and cannot fail. Provisioning counts the blocks of the
// range that have no entry, and reserves them all or nothing.
//
// # I/O and durability
//
// Map changes are not committed per request. They collect in a pending
// set (read through by lookups, bounded by OpenOptions.MaxPending) and are
// committed by Flush, by a background ticker, when too many are pending,
// or when a writer needs freed space. A commit is:
//
//  1. cut: under the pool lock, the pending map changes, volume and pool
//     records and dirty bitmap chunks go into one Pebble batch;
//  2. fdatasync of the data file;
//  3. the batch commits with sync;
//  4. once every request started before has finished, blocks freed in
//     this cut are punched out of the data file, then become allocatable
//     (under the I/O gate). This release phase runs on a goroutine of its
//     own: a FLUSH returns after step 3. Until it ends the blocks stay
//     allocated (shown as releasing; a writer that needs them waits), the
//     next commit with blocks to free waits for it, and bitmap chunks cut
//     meanwhile leave those blocks out as well.
//
// Step 2 before 3 makes a new block's data durable before the mapping that
// points to it. A block's first write is published into the pending set
// only after its data is written (other requests touching that block wait
// for it), so a cut never contains a mapping whose data is still in
// flight; the bitmap chunks in a cut leave out such blocks, and also the
// blocks freed in that cut. Step 4 after 3 means a discarded block is
// never reused before its release is durable, so after a crash no old map
// can point at another volume's new data; the I/O gate (a RWMutex held
// shared by every request) also guarantees that no read or write still
// aimed at the freed block lands after it was handed out. A power loss
// loses at most the changes after the last commit; a killed process loses
// none that completed (the intent log, intent.go, replayed on the same
// boot); Flush returns only after a
// commit that began after every request completed before it. A commit
// error fails the pool (every later request errors) rather than letting
// memory and disk diverge.
//
// A new block is written whole (the write's bytes plus zeros), so a
// partial first write reads the rest of the block as zeros and never
// exposes a previous owner's data. Blocks that read as zeros need no
// padding: those never written (the pool record keeps ZeroFrom, a mark
// that no block at or above it was ever written, raised durably ahead of
// allocation by 32768 blocks in a background commit, before any block
// above it is handed out, so a crash cannot leave stale data above it),
// and freed blocks punched in step 4 since the pool opened (a punch is
// made durable by the data fdatasync of the commit that maps the block
// again, before that mapping). Zeroing a range of a mapped block
// (discard heads and tails, provisioning of mapped blocks) uses
// fallocate(ZERO_RANGE).
//
// Memory is bounded: map entries are read through Pebble (its block cache,
// OpenOptions.CacheSize) and a bounded cache of decoded entries, loaded by
// regions of 64 blocks (OpenOptions.MapCacheEntries, mapcache.go); the
// pending set is bounded by MaxPending; the bitmaps cost 1 bit per pool
// block (x4 while a commit releases blocks, with the punched set). A volume with 10 million mapped blocks needs no per-block
// memory.
//
// Out of space: with NoSpaceError the request fails at once (after
// committing, if discarded blocks only wait for their release); with
// NoSpaceQueue it waits, without holding the I/O gate or the pool lock,
// until space appears (grow, discard, delete) or NoSpaceTimeout passes.
// Events are logged (rate-limited), and low-water crossings once per
// crossing.
//
// Guest calls that provision (virtio-blk WRITE_ZEROES with unmap=0): in
// Linux, fallocate(FALLOC_FL_ZERO_RANGE) on the block device
// (`fallocate -z`) and the BLKZEROOUT ioctl (`blkdiscard -z`) both issue
// blkdev_issue_zeroout with BLKDEV_ZERO_NOUNMAP, which virtio_blk sends
// without the unmap flag; FALLOC_FL_PUNCH_HOLE (`fallocate -p`) and
// BLKDISCARD send WRITE_ZEROES+unmap or DISCARD.
//
// # Snapshots and clones (issue 4)
//
// Snapshots share map state by layers instead of copying maps, so
// creation is O(1) (CreateSnapshot, CreateSnapshots for a consistency
// group taken under the exclusive I/O gate, all or none):
//
//   - A layer is a map (the "m" LAYER keys). A layer with a parent or a
//     frozen one has an "l" LAYER record (parent, frozen, and for a frozen
//     layer its mapped/provisioned/reserved counters; an unfrozen layer's
//     counters are its volume's). Parents are older layers, so walks end.
//     Lookups walk head -> parent -> ... and take the first entry found.
//   - Snapshot of V: V's head layer L is frozen (V's counters move to L's
//     record); V gets a new empty head under L; a read-only snapshot
//     (kind snapshot) points at L itself, a clone (kind clone) gets its
//     own new empty head under L. Records only, no map walk. A snapshot of
//     a read-only snapshot shares its layer.
//   - A physical block is owned by exactly one map entry (in the layer
//     where it was written), so the allocation bitmap stays a plain set
//     and Check's "owned once" invariant holds; no reference counts.
//   - Copy-on-write: a write to a block whose entry is found in an
//     ancestor layer allocates a new block in the head, reading the rest
//     of a partially written block from the shared one; the provisioned
//     bit is copied (sticky across CoW). A whole-block discard of a shared
//     block writes a hole entry (FlagHole: reads as zeros, hides the
//     ancestors'); whole-block provisioning writes a reservation; partial
//     discard or provisioning of a shared block first copies it (by
//     writing zeros through WriteAt) and plans again, so a shared block is
//     never zeroed in place.
//   - Delete (DeleteVolume, for every kind, in any order): a volume's or
//     clone's own head is released by a walk of its committed map in
//     batches, outside the pool lock and the I/O gate (no one reads it);
//     a frozen layer that nothing needs any more goes the same way. A
//     frozen layer needed only by one child is merged with it, the
//     smaller into the larger (child entries win, the overridden ones are
//     released): deleting the last snapshot of a big volume merges the
//     volume's head, i.e. what changed since, into the frozen layer. The
//     layers above are pruned: entries no volume can read any more
//     (every path down overrides them) are released; the candidates are
//     the entries of the smallest child (and its smallest child, down to
//     a volume), not the whole layer. Merges and prunes run under the
//     pool lock and the exclusive I/O gate, costing what the sharers
//     changed; all of a delete lands in one commit, so a crash leaves the
//     state before or after it. Measured (make bench, snapshot target):
//     deleting the snapshots and clones of a volume with 10 million
//     mapped blocks takes at most about 70 ms each.
//
// A write that copies a block, and a whole-block discard or provisioning
// that hides it (a hole or a reservation entry), make the frozen entry it
// overrides unreadable when it was the last sharer reading it; that entry
// is then released at once (dropIfUnreadLocked), so a block every sharer
// has rewritten, discarded or provisioned over does not stay allocated
// until the next delete's prune. Repeated
// snapshots of one volume lengthen its chain (one lookup per layer per
// block; no background merge yet). Read-only snapshots refuse writes,
// discards, write-zeroes and resize with ErrReadOnly. Status reports a
// snapshot's or clone's own head counters, and its kind and origin.
//
// Reservations across snapshots (reserve.go): each writable volume keeps
// ChainProv, the number of blocks whose deciding entry up its layer chain
// is provisioned; ChainProv - Provisioned of them are shared through
// frozen layers and each gets one reserved block for the copy its next
// write makes. A snapshot or clone computes what it must reserve from
// counters (O(1)) and fails with ErrNoSpace, changing nothing, when the
// pool cannot; a copy-on-write of a provisioned block consumes its
// reservation; a discard of a shared provisioned block and the folding
// of a deleted snapshot's layer into its only reader give reservations
// back. Reserve mode (SetReserveMode) reserves every block of a volume's
// virtual size it does not own. The pool's reserved space is the heads'
// reservation entries plus these, and Check recomputes both.
//
// # The promise against the host (host.go, issue 12)
//
// The data file is sparse, so a block's space on the host is taken when
// it is first written, from whatever the host file system has left then.
// Invariants, so that promised space never needs new host space:
//
//   - a provisioned mapped block is allocated on the host whole
//     (fallocate, KEEP_SIZE) before the write-zeroes that provisions it
//     changes the map, and is never punched while mapped (only released
//     blocks are punched);
//   - spare blocks >= reserved blocks: every reservation (provisioned
//     not written, copy-on-write of a shared provisioned block, reserve
//     mode) has a spare, a free block allocated on the host and kept out
//     of unreserved allocation; a write that consumes a reservation takes
//     a spare. Whatever reserves more (provisioning, a snapshot, reserve
//     mode on, growing a reserve-mode volume) first allocates the spares
//     it lacks on the host, or fails with ErrNoSpace and changes nothing.
//     A discard in reserve mode reserves its block again: the released
//     block (allocated whole) is its spare, recorded as one by the commit
//     that releases it, so no committed state has more reservations than
//     spares; a reserved write waits for the release phase to make it a
//     spare rather than take new space.
//
// Spares are free blocks, so allocated + reserved + free = size is
// unchanged. Spares beyond the reservations are trimmed by the next
// commit (released and punched like freed blocks). The spare set is
// persisted with each commit ("s" CHUNK, with the blocks being filled from
// it) and allocated on the host again at Open (an allocation not yet
// synced may be lost in a crash); a host that cannot back it then leaves
// the pool usable, logged, and Check failing. Check verifies spares >=
// reservations, that no spare is owned, and with FIEMAP that spares and
// provisioned mapped blocks are allocated on the host. A write that gets
// ENOSPC from the host follows the no-space policy like a full pool.
//
// Commits need host space too (Pebble's log, flushes, compactions), also
// those of promised writes: the metadata store keeps headroom on its file
// system and gives it up to Pebble on ENOSPC; until it is restored, data
// sharing that file system gets no new host space (no-space policy).
//
// # Where the code is
//
// The Pool's state is grouped by concern, one struct per concern in the
// file that works on it, all under the pool's one mutex (pool.go):
//
//	pool.go       create, open, close; the Pool and its groups
//	commit.go     commits (Flush, the background committer) and release phases
//	punchlater.go punching freed blocks a release left unpunched
//	blockmap.go   map lookups and changes (pending over committed, fills)
//	mapcache.go   the bounded cache of committed map entries
//	alloc.go      block allocation, free space, waiting for space, Grow
//	host.go       the promise against the host: spares backing reservations
//	hostspace.go  the host's free space: watched, waited for; the metadata's headroom
//	reserve.go    reservations across snapshots, reserve mode
//	catalogue.go  volumes: create, resize, delete, look up
//	snapshot.go   snapshots, clones and their layers
//	send.go       snapshot streams out; receive.go, in
//	events.go     events for watchers
//	status.go     Status; metrics.go, Metrics
//	volume.go     a volume's synchronous I/O; async.go its io_uring path
//	gate.go       the I/O gate held exclusively
//	intent.go     the intent log (map changes since the last commit)
//	datafile.go   the data file; check.go, Check
package thin
