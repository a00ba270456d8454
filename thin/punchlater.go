package thin

import (
	"errors"
	"time"
)

// Punching that a release's budget cut short goes on later, a budget at a
// time, from the background loop: freed blocks give their host space back
// even when nothing reuses them (a trim of a large, fragmented volume
// frees more than one release can punch in its budget).
//
// The blocks wait in p.unpunched. Memory only: after a restart they keep
// their host space until reused, as every freed block did before. A pass
// takes a run of them that is still free, not a spare and not being
// backed, marks it in p.punching, which allocation skips, punches it
// without the pool lock and then marks it zeroed. Free blocks have no
// reader: the release that freed them waited for the requests that could
// still aim at them.

// leaveUnpunchedLocked records the blocks of released that punching did
// not reach: neither in punched nor kept as spares.
func (p *Pool) leaveUnpunchedLocked(released *bitmap, punched [][2]uint64, keep []uint64) {
	if p.noPunch.Load() {
		return
	}
	p.unpunched.or(released)
	for _, r := range punched {
		p.unpunched.clearRun(r[0], r[1])
	}
	for _, b := range keep {
		p.unpunched.clear(b)
	}
}

// punchLater punches unpunched free blocks for at most budget and returns
// how many it punched.
func (p *Pool) punchLater(budget time.Duration) uint64 {
	var done uint64
	deadline := time.Now().Add(budget)
	var from uint64
	for !p.noPunch.Load() && time.Now().Before(deadline) {
		p.mu.Lock()
		first, n := p.nextPunchRunLocked(from)
		if n == 0 {
			p.mu.Unlock()
			return done
		}
		p.punching.setRun(first, n)
		p.mu.Unlock()

		err := p.data.PunchHole(int64(first)<<p.shift, int64(n)<<p.shift)

		p.mu.Lock()
		p.punching.clearRun(first, n)
		// Punched or not, the run leaves the set: a failure is not
		// retried every pass (the blocks are reused with zero padding).
		p.unpunched.clearRun(first, n)
		if err == nil {
			p.zeroed.setRun(first, n)
		}
		p.mu.Unlock()
		if err != nil {
			if errors.Is(err, errors.ErrUnsupported) {
				p.noPunch.Store(true)
			} else {
				p.log.Warn("punching freed blocks out of the data file failed; they are reused with zero padding",
					"pool", p.dir, "block", first, "blocks", n, "err", err)
			}
			return done
		}
		done += n
		from = first + n
	}
	return done
}

// nextPunchRunLocked finds, from block from on, the next run of at most
// punchChunk unpunched blocks that are free, not spares and not being
// backed. Unpunched blocks that are none of these any more (reused, or
// made spares: both keep their host space) leave the set on the way.
func (p *Pool) nextPunchRunLocked(from uint64) (first, n uint64) {
	for {
		b, ok := p.unpunched.findSet(from)
		if !ok || b < from {
			return 0, 0
		}
		if p.alloc.test(b) || p.spare.test(b) || p.backing.test(b) {
			p.unpunched.clear(b)
			from = b + 1
			continue
		}
		first, n = b, 1
		for e := b + 1; n < p.tune.punchChunk && e < p.unpunched.size && p.unpunched.test(e) &&
			!p.alloc.test(e) && !p.spare.test(e) && !p.backing.test(e); e++ {
			n++
		}
		return first, n
	}
}
