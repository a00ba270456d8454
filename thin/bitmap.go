package thin

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strings"
)

// chunkBlocks is how many blocks one persisted bitmap chunk covers (512
// bytes): small enough that a commit after scattered allocations rewrites
// little, large enough that a big pool has few keys.
const (
	chunkWords  = 64
	chunkBlocks = chunkWords * 64
	chunkBytes  = chunkWords * 8
)

// bitmap is a set of block numbers below size, with a population count
// and per-chunk counts so that a search for a clear bit skips full chunks.
type bitmap struct {
	words      []uint64
	chunkCount []uint32 // set bits per chunk
	size       uint64   // number of valid bits
	count      uint64   // set bits
}

func newBitmap(size uint64) *bitmap {
	b := &bitmap{}
	b.grow(size)
	return b
}

func (b *bitmap) grow(size uint64) {
	if size < b.size {
		return
	}
	nw := (size + 63) / 64
	nw = (nw + chunkWords - 1) / chunkWords * chunkWords
	if uint64(len(b.words)) < nw {
		w := make([]uint64, nw)
		copy(w, b.words)
		b.words = w
		c := make([]uint32, nw/chunkWords)
		copy(c, b.chunkCount)
		b.chunkCount = c
	}
	b.size = size
}

func (b *bitmap) test(i uint64) bool { return b.words[i/64]&(1<<(i%64)) != 0 }

func (b *bitmap) set(i uint64) {
	w, m := i/64, uint64(1)<<(i%64)
	if b.words[w]&m == 0 {
		b.words[w] |= m
		b.count++
		b.chunkCount[w/chunkWords]++
	}
}

func (b *bitmap) clear(i uint64) {
	w, m := i/64, uint64(1)<<(i%64)
	if b.words[w]&m != 0 {
		b.words[w] &^= m
		b.count--
		b.chunkCount[w/chunkWords]--
	}
}

// findClear returns a clear bit at or after from (wrapping around), or
// false when every bit is set.
func (b *bitmap) findClear(from uint64) (uint64, bool) { return b.findClearExcept(from) }

// or sets every bit set in o (of no larger size).
func (b *bitmap) or(o *bitmap) {
	for w, x := range o.words {
		if x == 0 {
			continue
		}
		added := x &^ b.words[w]
		if added != 0 {
			n := uint32(bits.OnesCount64(added))
			b.words[w] |= x
			b.count += uint64(n)
			b.chunkCount[w/chunkWords] += n
		}
	}
}

// andNot clears every bit set in o.
func (b *bitmap) andNot(o *bitmap) {
	for w, x := range o.words {
		if x == 0 || w >= len(b.words) {
			continue
		}
		cleared := b.words[w] & x
		if cleared != 0 {
			n := uint32(bits.OnesCount64(cleared))
			b.words[w] &^= x
			b.count -= uint64(n)
			b.chunkCount[w/chunkWords] -= n
		}
	}
}

// appendChunk appends chunk idx in its persisted form (little-endian
// words) with the bits set in any of exclude cleared.
func (b *bitmap) appendChunk(dst []byte, idx uint64, exclude ...*bitmap) []byte {
	for w := idx * chunkWords; w < (idx+1)*chunkWords; w++ {
		x := b.words[w]
		for _, e := range exclude {
			if w < uint64(len(e.words)) {
				x &^= e.words[w]
			}
		}
		dst = binary.LittleEndian.AppendUint64(dst, x)
	}
	return dst
}

// appendChunkOr appends chunk idx in its persisted form with the bits set
// in any of also added.
func (b *bitmap) appendChunkOr(dst []byte, idx uint64, also ...*bitmap) []byte {
	for w := idx * chunkWords; w < (idx+1)*chunkWords; w++ {
		x := b.words[w]
		for _, e := range also {
			if w < uint64(len(e.words)) {
				x |= e.words[w]
			}
		}
		dst = binary.LittleEndian.AppendUint64(dst, x)
	}
	return dst
}

// reset clears every bit.
func (b *bitmap) reset() {
	if b.count == 0 {
		return
	}
	clear(b.words)
	clear(b.chunkCount)
	b.count = 0
}

// loadChunk sets bits from a persisted chunk; it reports false when the
// chunk has the wrong length or bits beyond size.
func (b *bitmap) loadChunk(idx uint64, data []byte) bool {
	if len(data) != chunkBytes || idx >= uint64(len(b.chunkCount)) {
		return false
	}
	ok := true
	for k := uint64(0); k < chunkWords; k++ {
		x := binary.LittleEndian.Uint64(data[k*8:])
		for x != 0 {
			bit := uint64(bits.TrailingZeros64(x))
			x &= x - 1
			i := (idx*chunkWords+k)*64 + bit
			if i >= b.size {
				ok = false
				continue
			}
			b.set(i)
		}
	}
	return ok
}

// setRun sets bits [first, first+n).
func (b *bitmap) setRun(first, n uint64) {
	for i := first; i < first+n; i++ {
		b.set(i)
	}
}

func (b *bitmap) clearRun(first, n uint64) {
	for i := first; i < first+n; i++ {
		b.clear(i)
	}
}

// runs calls fn for every run of consecutive set bits, in order, until fn
// returns false.
func (b *bitmap) runs(fn func(first, n uint64) bool) {
	var start, n uint64
	for w, x := range b.words {
		if x == 0 {
			if n > 0 && !fn(start, n) {
				return
			}
			n = 0
			continue
		}
		for bit := uint64(0); bit < 64; bit++ {
			i := uint64(w)*64 + bit
			if x&(1<<bit) != 0 {
				if n == 0 {
					start = i
				}
				n++
			} else if n > 0 {
				if !fn(start, n) {
					return
				}
				n = 0
			}
		}
	}
	if n > 0 {
		fn(start, n)
	}
}

// String lists the set bits as runs (FIRST or FIRST-LAST), for traces.
func (b *bitmap) String() string {
	var parts []string
	b.runs(func(first, n uint64) bool {
		if n == 1 {
			parts = append(parts, fmt.Sprint(first))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", first, first+n-1))
		}
		return true
	})
	return strings.Join(parts, ",")
}

// findClearExcept is findClear over the union of b and others (same
// size): a block clear in all of them. Full chunks of b are skipped.
func (b *bitmap) findClearExcept(from uint64, others ...*bitmap) (uint64, bool) {
	if b.count >= b.size {
		return 0, false
	}
	if from >= b.size {
		from = 0
	}
	nchunks := (b.size + chunkBlocks - 1) / chunkBlocks
	start := from / chunkBlocks
	for n := uint64(0); n <= nchunks; n++ {
		c := (start + n) % nchunks
		if uint64(b.chunkCount[c]) == chunkBlocks {
			continue
		}
		lo := c * chunkBlocks
		if n == 0 {
			lo = from
		}
		hi := min((c+1)*chunkBlocks, b.size)
		for i := lo; i < hi; {
			w := b.words[i/64] | (uint64(1)<<(i%64) - 1)
			for _, o := range others {
				w |= o.words[i/64]
			}
			if w != ^uint64(0) {
				j := i/64*64 + uint64(bits.TrailingZeros64(^w))
				if j < hi {
					return j, true
				}
				break
			}
			i = (i/64 + 1) * 64
		}
	}
	return 0, false
}

// findSet returns a set bit at or after from (wrapping around), or false
// when none is set.
func (b *bitmap) findSet(from uint64) (uint64, bool) {
	if b.count == 0 {
		return 0, false
	}
	if from >= b.size {
		from = 0
	}
	nchunks := (b.size + chunkBlocks - 1) / chunkBlocks
	start := from / chunkBlocks
	for n := uint64(0); n <= nchunks; n++ {
		c := (start + n) % nchunks
		if b.chunkCount[c] == 0 {
			continue
		}
		lo := c * chunkBlocks
		if n == 0 {
			lo = from
		}
		hi := min((c+1)*chunkBlocks, b.size)
		for i := lo; i < hi; {
			w := b.words[i/64] &^ (uint64(1)<<(i%64) - 1)
			if w != 0 {
				j := i/64*64 + uint64(bits.TrailingZeros64(w))
				if j < hi {
					return j, true
				}
				break
			}
			i = (i/64 + 1) * 64
		}
	}
	return 0, false
}
