package thin

import (
	"math"
	"time"
)

// tuning holds a pool's internal limits. They are fields of the pool, not
// package variables, so that a test gives its pool small ones (through
// OpenOptions.tuning) without changing any other pool's.
type tuning struct {
	// rangeLookupMax is the range length (in blocks) up to which rangeLocked
	// looks blocks up one by one instead of iterating the store; tests set
	// it low to drive both paths.
	rangeLookupMax uint64
	// zeroStep is how far ahead of the highest allocated block ZeroFrom is
	// raised at once. The raise starts halfway to the mark, so allocation
	// has zeroStep/2 blocks (1 GiB of 64 KiB blocks; half a second of 4 KiB
	// writes at 30k IOPS) for a background commit to make it durable. After
	// a crash, first partial writes to up to zeroStep blocks are padded.
	zeroStep uint64
	// writeRunMax bounds a vectored write: runs are cut where the data file
	// offset crosses a multiple of it. By default nothing is cut, so the data
	// file sees the writes a raw image would for the same guest requests. The
	// host page cache sizes its folios by the write, and on Linux 6.18 ext4
	// each small buffered write costs in proportion to its folio's size
	// (ext4_block_write_begin walks all of the folio's buffers): with data
	// written in runs of 64 KiB, 128 KiB, 256 KiB and 1 MiB, a random 4 KiB
	// read took 1.3-1.5, 1.28, 1.28 and 1.06 us of CPU, an overwrite 2.5-3.2,
	// 3.3, 3.8 and 5.7 us (BenchmarkCoalesce). Cutting at 64 KiB would make
	// overwrites after large writes cheaper and reads dearer than on a raw
	// image; thinblk leaves that trade to the kernel, as a raw image does.
	writeRunMax int64
	// punchBudget bounds the time one commit's release, or one later
	// pass, spends punching freed blocks; punchChunk the blocks one punch
	// call takes.
	punchBudget time.Duration
	punchChunk  uint64
}

func defaultTuning() tuning {
	return tuning{
		rangeLookupMax: 64,
		zeroStep:       1 << 15,
		writeRunMax:    math.MaxInt64, // nothing is cut
		punchBudget:    time.Second,
		punchChunk:     256,
	}
}
