package thin

// exclusiveHold is the I/O gate held exclusively plus the pool lock, as a
// management operation or a release phase takes them. release gives both
// back once; deferred as well, it also does so when the section panics (a
// bug that a QMP handler recovers), which would otherwise leave every
// volume of the pool waiting for the gate.
type exclusiveHold struct {
	p    *Pool
	held bool
}

func (p *Pool) holdExclusive() exclusiveHold {
	p.ioGate.Lock()
	p.mu.Lock()
	return exclusiveHold{p: p, held: true}
}

func (h *exclusiveHold) release() {
	if h.held {
		h.held = false
		h.p.mu.Unlock()
		h.p.ioGate.Unlock()
	}
}

// testHookHeld, if set (by tests), runs inside management operations while
// they hold the gate exclusively, with the operation's name.
var testHookHeld func(op string)

func (h *exclusiveHold) hook(op string) {
	if testHookHeld != nil {
		testHookHeld(op)
	}
}
