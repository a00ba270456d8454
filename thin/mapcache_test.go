package thin

import (
	"math/rand/v2"
	"testing"

	"github.com/thinblk/thinblk/pebblemeta"
)

// measure recomputes the cache's cost from its regions, failing t when the
// running count disagrees.
func (c *mapCache) measure(t testing.TB) int {
	t.Helper()
	cost := 0
	for _, r := range c.regions {
		cost += regionCost + len(r.entries)
	}
	if cost != c.cost {
		t.Fatalf("map cache counts cost %d, holds %d", c.cost, cost)
	}
	for i, s := range c.recent {
		if s.r != nil && c.regions[s.k] != s.r {
			t.Fatalf("recent slot %d holds region %+v, which the cache does not", i, s.k)
		}
	}
	return cost
}

// TestMapRegionAgainstMap: random sets and gets of a region agree with a
// plain map of its blocks.
func TestMapRegionAgainstMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	var r mapRegion
	want := map[uint]pebblemeta.Entry{}
	for step := range 5000 {
		i := uint(rng.IntN(regionBlocks))
		e := pebblemeta.Entry{}
		if rng.IntN(3) > 0 {
			e = pebblemeta.Entry{Flags: pebblemeta.FlagMapped, PBlock: rng.Uint64N(1000)}
		}
		_, had := want[i]
		d := r.set(i, e)
		if e.Flags == 0 {
			delete(want, i)
		} else {
			want[i] = e
		}
		_, has := want[i]
		if wantD := map[[2]bool]int{{false, true}: 1, {true, false}: -1}[[2]bool{had, has}]; d != wantD {
			t.Fatalf("step %d: set returned %d, want %d", step, d, wantD)
		}
		if len(r.entries) != len(want) {
			t.Fatalf("step %d: %d entries, want %d", step, len(r.entries), len(want))
		}
		for j := uint(0); j < regionBlocks; j++ {
			if got := r.get(j); got != want[j] {
				t.Fatalf("step %d: block %d = %+v, want %+v", step, j, got, want[j])
			}
		}
	}
}

// TestMapCacheBounded: the cost stays within the limit whatever is added
// and updated, and a disabled cache keeps nothing.
func TestMapCacheBounded(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	c := newMapCache(100)
	for range 2000 {
		// Far apart regions too, so that recent slots collide.
		k := mapKey{layer: rng.Uint64N(3) + 1, vb: rng.Uint64N(4096) + rng.Uint64N(3)*recentSlots*regionBlocks}
		rk, _ := regionOf(k)
		if c.regions[rk] == nil && rng.IntN(2) == 0 {
			c.add(rk, &mapRegion{})
		}
		c.update(k, pebblemeta.Entry{Flags: pebblemeta.FlagMapped, PBlock: k.vb})
		if got, want := c.get(rk), c.regions[rk]; got != want {
			t.Fatalf("get(%+v) = %p, the map holds %p", rk, got, want)
		}
		if got := c.measure(t); got > 100 && len(c.regions) > 1 {
			t.Fatalf("cost %d over 100 with %d regions", got, len(c.regions))
		}
	}
	c.forgetLayer(1)
	for k := range c.regions {
		if k.layer == 1 {
			t.Fatalf("region %+v of a forgotten layer still cached", k)
		}
	}
	c.measure(t)
	off := newMapCache(-1)
	off.add(regionKey{1, 0}, &mapRegion{})
	if len(off.regions) != 0 {
		t.Fatal("a disabled cache kept a region")
	}
}
