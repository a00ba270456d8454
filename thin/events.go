package thin

import (
	"fmt"
	"sort"
	"sync"
)

// eventQueue is the pool's events on their way to watchers. Guarded by
// the pool's mu, but for deliverMu.
type eventQueue struct {
	watchers  map[int]func(Event)
	nextWatch int
	events    []Event // committed changes not yet delivered to watchers
	// deliverMu is held by the one goroutine delivering (deliver), without
	// mu: a watcher may call back into the pool.
	deliverMu sync.Mutex
}

// EventType says what changed.
type EventType int

const (
	VolumeCreated EventType = iota + 1
	VolumeDeleted
	VolumeResized
	PoolGrown
	// Space events (not commits): a request found no unreserved space
	// (Volume is its volume), space appeared after that, and the free
	// space crossed the low-water mark down or up. Free is the free
	// space in bytes then.
	OutOfSpace
	SpaceAvailable
	LowWater
	AboveLowWater
	// PoolFailed: a commit failed and the pool refuses every request
	// until it is opened again; Reason says why.
	PoolFailed
)

func (t EventType) String() string {
	switch t {
	case VolumeCreated:
		return "volume-created"
	case VolumeDeleted:
		return "volume-deleted"
	case VolumeResized:
		return "volume-resized"
	case PoolGrown:
		return "pool-grown"
	case OutOfSpace:
		return "out-of-space"
	case SpaceAvailable:
		return "space-available"
	case LowWater:
		return "low-water"
	case AboveLowWater:
		return "above-low-water"
	case PoolFailed:
		return "pool-failed"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event tells a watcher about a committed change, or a change of the
// pool's free space.
type Event struct {
	Type   EventType
	Volume string // empty for pool events
	Size   uint64 // new size in bytes (volume or pool)
	Free   uint64 // free bytes, for space events
	Reason string // why, for PoolFailed
	// Host is set on space events about the data file's host file
	// system rather than the pool (Free is then the host's free bytes).
	Host bool
}

// Watch registers fn to be called after each committed volume or pool
// change. Calls come in commit order, one at a time, from whichever
// goroutine made a change (not necessarily this one's); fn may call the
// pool. It returns a function that unregisters fn.
func (p *Pool) Watch(fn func(Event)) (stop func()) {
	p.mu.Lock()
	id := p.nextWatch
	p.nextWatch++
	p.watchers[id] = fn
	p.mu.Unlock()
	return func() {
		p.mu.Lock()
		delete(p.watchers, id)
		p.mu.Unlock()
	}
}

func (p *Pool) notify(ev Event) {
	p.mu.Lock()
	p.events = append(p.events, ev)
	p.mu.Unlock()
}

// deliver hands queued events to the watchers, in order, one goroutine at
// a time. Called after the change's locks are released, so a watcher may
// call back into the pool; if another goroutine is delivering, it will
// deliver ours too.
func (p *Pool) deliver() {
	for {
		if !p.deliverMu.TryLock() {
			return
		}
		for {
			p.mu.Lock()
			evs := p.events
			p.events = nil
			ids := make([]int, 0, len(p.watchers))
			for id := range p.watchers {
				ids = append(ids, id)
			}
			sort.Ints(ids)
			fns := make([]func(Event), 0, len(ids))
			for _, id := range ids {
				fns = append(fns, p.watchers[id])
			}
			p.mu.Unlock()
			if len(evs) == 0 {
				break
			}
			for _, ev := range evs {
				for _, fn := range fns {
					fn(ev)
				}
			}
		}
		p.deliverMu.Unlock()
		p.mu.Lock()
		more := len(p.events) > 0
		p.mu.Unlock()
		if !more {
			return
		}
	}
}

// notifyAsyncLocked queues a space event and delivers it from another
// goroutine: space events arise on I/O paths, where a watcher (which may
// call out to QEMU, say) must not hold up the request.
func (p *Pool) notifyAsyncLocked(ev Event) {
	p.events = append(p.events, ev)
	go p.deliver()
}
