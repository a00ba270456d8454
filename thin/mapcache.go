package thin

import (
	"math/bits"
	"slices"

	"github.com/thinblk/thinblk/pebblemeta"
)

// The map cache holds committed map entries by region: regionBlocks
// consecutive blocks of one layer, loaded together with one bounded Pebble
// iteration. A region also knows which of its blocks have no entry, so a
// write that allocates, or a read of an unwritten block, asks Pebble at
// most once per region instead of once per block: a Get of an absent key
// still searches the memtables and every level (it was 11% of the CPU of
// allocating 4 KiB writes).

const (
	regionShift  = 6
	regionBlocks = 1 << regionShift
	// regionCost is what a region costs beyond its entries, in entries
	// (its header and map slot are about four entries' worth of memory).
	regionCost = 4
)

type regionKey struct{ layer, region uint64 }

func regionOf(k mapKey) (regionKey, uint) {
	return regionKey{k.layer, k.vb >> regionShift}, uint(k.vb & (regionBlocks - 1))
}

// mapRegion is the committed map of one region: present has a bit per
// block with an entry, entries holds those entries in block order.
type mapRegion struct {
	present uint64
	entries []pebblemeta.Entry
}

func (r *mapRegion) get(i uint) pebblemeta.Entry {
	bit := uint64(1) << i
	if r.present&bit == 0 {
		return pebblemeta.Entry{}
	}
	return r.entries[bits.OnesCount64(r.present&(bit-1))]
}

// set records block i's committed entry (none if e has no flags) and
// returns the change in the number of entries held.
func (r *mapRegion) set(i uint, e pebblemeta.Entry) int {
	bit := uint64(1) << i
	idx := bits.OnesCount64(r.present & (bit - 1))
	has := r.present&bit != 0
	switch {
	case e.Flags == 0 && has:
		r.entries = slices.Delete(r.entries, idx, idx+1)
		r.present &^= bit
		return -1
	case e.Flags == 0:
		return 0
	case has:
		r.entries[idx] = e
		return 0
	default:
		r.entries = slices.Insert(r.entries, idx, e)
		r.present |= bit
		return 1
	}
}

// mapCache is a bounded set of regions. Its cost (regions times
// regionCost plus entries) stays within max; an arbitrary region is
// evicted to make room (Go's map iteration starts at a random place).
type mapCache struct {
	regions map[regionKey]*mapRegion
	cost    int
	max     int // < 0: nothing is kept
	// recent is a direct-mapped front for regions: a hit costs an index
	// and a compare instead of a map lookup (which was 3% of the CPU of
	// 4 KiB reads). A slot is cleared when its region leaves regions.
	recent [recentSlots]recentSlot
}

const recentSlots = 4096

type recentSlot struct {
	k regionKey
	r *mapRegion
}

func recentIndex(k regionKey) int {
	return int((k.region ^ k.layer*0x9e3779b97f4a7c15) % recentSlots)
}

func newMapCache(max int) *mapCache {
	return &mapCache{regions: map[regionKey]*mapRegion{}, max: max}
}

// get returns the cached region k, or nil.
func (c *mapCache) get(k regionKey) *mapRegion {
	s := &c.recent[recentIndex(k)]
	if s.r != nil && s.k == k {
		return s.r
	}
	r := c.regions[k]
	if r != nil {
		*s = recentSlot{k, r}
	}
	return r
}

// drop removes region k.
func (c *mapCache) drop(k regionKey, r *mapRegion) {
	c.cost -= regionCost + len(r.entries)
	delete(c.regions, k)
	if s := &c.recent[recentIndex(k)]; s.r == r {
		*s = recentSlot{}
	}
}

func (c *mapCache) add(k regionKey, r *mapRegion) {
	if c.max < 0 {
		return
	}
	c.cost += regionCost + len(r.entries)
	c.regions[k] = r
	c.trim(k)
}

// update records a newly committed entry in its region if that region is
// loaded (one that is not reads it from the store when needed).
func (c *mapCache) update(k mapKey, e pebblemeta.Entry) {
	rk, i := regionOf(k)
	if r := c.get(rk); r != nil {
		c.cost += r.set(i, e)
		c.trim(rk)
	}
}

// trim evicts regions other than keep until the cost is within max.
func (c *mapCache) trim(keep regionKey) {
	for c.cost > c.max && len(c.regions) > 1 {
		for k, r := range c.regions {
			if k == keep {
				continue
			}
			c.drop(k, r)
			break
		}
	}
}

// forgetLayer drops every region of layer.
func (c *mapCache) forgetLayer(layer uint64) {
	for k, r := range c.regions {
		if k.layer == layer {
			c.drop(k, r)
		}
	}
}
