package thin

import "github.com/thinblk/thinblk/internal/latency"

// Metrics are the pool's activity counters, beside Status's space: what
// a monitoring system watches.
type Metrics struct {
	// Commits times every metadata commit since the pool was opened (its
	// count is the number of commits): the data file's sync and the
	// Pebble batch, the cost a guest's FLUSH waits for.
	Commits latency.Snapshot
	// OutOfSpace: a request found no unreserved space and none has
	// appeared since.
	OutOfSpace bool
	// WaitingForSpace counts, by volume, the requests waiting now for
	// space to appear (no-space policy queue or pause).
	WaitingForSpace map[string]int
}

// Metrics returns the pool's activity counters.
func (p *Pool) Metrics() Metrics {
	m := Metrics{Commits: p.commits.Snapshot(), WaitingForSpace: map[string]int{}}
	p.mu.Lock()
	defer p.mu.Unlock()
	m.OutOfSpace = p.outOfSpace
	for v, n := range p.spaceWaits {
		m.WaitingForSpace[v] = n
	}
	return m
}

// waitingForSpace counts a request of volume as waiting for space until
// the function it returns is called.
func (p *Pool) waitingForSpace(volume string) (done func()) {
	p.mu.Lock()
	if p.spaceWaits == nil {
		p.spaceWaits = map[string]int{}
	}
	p.spaceWaits[volume]++
	p.mu.Unlock()
	return func() {
		p.mu.Lock()
		if p.spaceWaits[volume]--; p.spaceWaits[volume] <= 0 {
			delete(p.spaceWaits, volume)
		}
		p.mu.Unlock()
	}
}
