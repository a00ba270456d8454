package thin

import (
	"errors"
	"testing"
	"time"
)

// TestNoSpaceRecheckAfterRelease: a write planned while the space it
// needs was still being released (ErrNoSpace), whose release then ends
// before the request looks at the no-space policy, must plan again, not
// fail: the space is there. Under load the release phase ended in that
// window and TestModelAsync failed with "no space left in the thin pool".
func TestNoSpaceRecheckAfterRelease(t *testing.T) {
	p, _ := newPool(t, 16, CreateOptions{})
	v := mustVolume(t, p, "v", 64*bs4k)
	write(t, v, 0, pattern(16*bs4k, 1)) // the pool is full
	if err := v.Discard(0, 4*bs4k); err != nil {
		t.Fatal(err)
	}
	// The release phase of the next commit waits for requests under way:
	// hold the I/O gate as one would.
	p.ioGate.RLock()
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	_, _, err := v.planWrite(32*bs4k, 4*bs4k)
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("plan while the freed blocks are being released: %v, want ErrNoSpace", err)
	}
	p.ioGate.RUnlock()
	settle(p) // the release ends before the request applies the policy
	var deadline time.Time
	if err := p.waitForSpace(&deadline, "write", "v", err, nil); err != nil {
		t.Fatalf("no-space policy after the space was released: %v, want a retry", err)
	}
	write(t, v, 32*bs4k, pattern(4*bs4k, 2))
	checkAccounting(t, p)
}
