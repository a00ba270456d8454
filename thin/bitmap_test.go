package thin

import (
	"math/rand/v2"
	"testing"
)

func TestBitmapFindClear(t *testing.T) {
	const size = 3*chunkBlocks + 100 // last chunk partial
	b := newBitmap(size)
	rng := rand.New(rand.NewPCG(7, 7))
	ref := make([]bool, size)
	for i := range 4000 {
		from := uint64(rng.IntN(size + 10))
		got, ok := b.findClear(from)
		// Reference: first clear bit at or after from, wrapping.
		var want uint64
		found := false
		for k := range uint64(size) {
			j := (min(from, size) + k) % size
			if from >= size {
				j = k
			}
			if !ref[j] {
				want, found = j, true
				break
			}
		}
		if ok != found || (ok && got != want) {
			t.Fatalf("step %d: findClear(%d) = %d,%v want %d,%v", i, from, got, ok, want, found)
		}
		if ok && rng.IntN(10) < 7 {
			b.set(got)
			ref[got] = true
		} else {
			c := uint64(rng.IntN(size))
			b.clear(c)
			ref[c] = false
		}
	}
	n := uint64(0)
	for _, x := range ref {
		if x {
			n++
		}
	}
	if b.count != n {
		t.Fatalf("count %d want %d", b.count, n)
	}
	// Persisted chunks round-trip, and bits beyond size are refused.
	c := newBitmap(size)
	for idx := range uint64(4) {
		if !c.loadChunk(idx, b.appendChunk(nil, idx)) {
			t.Fatalf("chunk %d refused", idx)
		}
	}
	for i := range uint64(size) {
		if b.test(i) != c.test(i) {
			t.Fatalf("bit %d differs after round trip", i)
		}
	}
	bad := make([]byte, chunkBytes)
	bad[chunkBytes-1] = 0x80
	if newBitmap(size).loadChunk(3, bad) {
		t.Fatal("chunk with a bit beyond the pool accepted")
	}
	// Full bitmap.
	for i := range uint64(size) {
		b.set(i)
	}
	if _, ok := b.findClear(0); ok {
		t.Fatal("found a clear bit in a full bitmap")
	}
}
