package vhostuser

import (
	"errors"
	"sync"
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
	ringOwner *session // the session with rings running, or nil
	notifiers map[*session]func() error
}

func newDeviceShare(dev Device) *deviceShare {
	return &deviceShare{dev: dev, notifiers: map[*session]func() error{}}
}

// acquireRings lets s run rings unless another session does.
func (d *deviceShare) acquireRings(s *session) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ringOwner != nil && d.ringOwner != s {
		return false
	}
	d.ringOwner = s
	return true
}

// releaseRings frees the device's rings for another session; s calls it
// once none of its rings runs.
func (d *deviceShare) releaseRings(s *session) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ringOwner == s {
		d.ringOwner = nil
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
