package vhostuser

import (
	"errors"
	"sync"
	"time"
)

// maxFrontEnds is how many front-ends one device serves at once: a live
// migration on one host connects the destination's QEMU (started with
// -incoming) to the same socket while the source's is still served. The
// destination reads the config space at once and starts its rings only
// after the source has stopped its own.
const maxFrontEnds = 2

// deviceShare arbitrates one Device between the sessions of its
// front-ends: one session at a time runs rings (the device has one set of
// queues), and a config change is announced to every front-end that asked
// for notifications.
type deviceShare struct {
	dev Device

	mu        sync.Mutex
	ringOwner *session      // the session with rings running, or nil
	released  chan struct{} // closed (and replaced) when ringOwner is released
	notifiers map[*session]func() error
}

// endingOwnerWait bounds how long a new session waits for the rings of a
// session whose front-end is gone: its rings stop once the requests they
// serve complete (those waiting for space are withdrawn, or drained during
// a migration), which takes as long as the slowest storage request.
const endingOwnerWait = 30 * time.Second

func newDeviceShare(dev Device) *deviceShare {
	return &deviceShare{dev: dev, notifiers: map[*session]func() error{}, released: make(chan struct{})}
}

// acquireRings lets s run rings unless another session does. A session
// whose front-end has gone (its socket closed, as when QEMU reconnects at
// once after a back-end restart or a socket error) is ending: s waits for
// it to stop its rings, up to endingOwnerWait, instead of being refused as
// a second front-end running rings at the same time.
func (d *deviceShare) acquireRings(s *session) bool {
	deadline := time.Now().Add(endingOwnerWait)
	logged := false
	for {
		d.mu.Lock()
		owner, released := d.ringOwner, d.released
		if owner == nil || owner == s {
			d.ringOwner = s
			d.mu.Unlock()
			if logged {
				s.log.Info("the previous front-end's session stopped its rings: this one runs them")
			}
			return true
		}
		d.mu.Unlock()
		wait := time.Until(deadline)
		if !owner.ending() || wait <= 0 {
			return false
		}
		if !logged {
			logged = true
			s.log.Info("waiting for the previous front-end's session to stop its rings (its socket is closed)")
		}
		t := time.NewTimer(wait)
		select {
		case <-released:
		case <-t.C:
		}
		t.Stop()
	}
}

// releaseRings frees the device's rings for another session; s calls it
// once none of its rings runs.
func (d *deviceShare) releaseRings(s *session) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ringOwner == s {
		d.ringOwner = nil
		close(d.released)
		d.released = make(chan struct{})
	}
}

// setNotifier registers (or, with nil, removes) s's config-change
// notification and gives the device one function that notifies every
// registered front-end.
func (d *deviceShare) setNotifier(s *session, notify func() error) {
	d.mu.Lock()
	if notify == nil {
		delete(d.notifiers, s)
	} else {
		d.notifiers[s] = notify
	}
	var fn func() error
	if len(d.notifiers) > 0 {
		fn = d.notifyAll
	}
	d.mu.Unlock()
	d.dev.SetConfigChangeNotifier(fn)
}

func (d *deviceShare) notifyAll() error {
	d.mu.Lock()
	fns := make([]func() error, 0, len(d.notifiers))
	for _, fn := range d.notifiers {
		fns = append(fns, fn)
	}
	d.mu.Unlock()
	if len(fns) == 0 {
		// A notifier kept past the last front-end's disconnect.
		return errBackendClosed
	}
	var errs []error
	for _, fn := range fns {
		errs = append(errs, fn())
	}
	return errors.Join(errs...)
}
