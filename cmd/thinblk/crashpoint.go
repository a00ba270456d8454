package main

import (
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/thinblk/thinblk/virtio"
)

// crashEnv names a point of the request path at which serve kills itself
// with SIGKILL, for crash-recovery tests: POINT:N dies the Nth time any
// queue reaches POINT (virtio.CrashFetched, CrashUsedElement or
// CrashUsedIndex). Unset in production: the points then cost a nil check.
const crashEnv = "THINBLK_TEST_CRASH_AT"

func setCrashPoint(spec string, log *slog.Logger) error {
	if spec == "" {
		return nil
	}
	point, nth, ok := strings.Cut(spec, ":")
	n, err := strconv.ParseInt(nth, 10, 64)
	switch {
	case !ok || err != nil || n < 1:
		return fmt.Errorf("%s=%q: want POINT:N with N >= 1", crashEnv, spec)
	case point != virtio.CrashFetched && point != virtio.CrashUsedElement && point != virtio.CrashUsedIndex:
		return fmt.Errorf("%s=%q: unknown point %q", crashEnv, spec, point)
	}
	log.Warn("test crash point armed: serve kills itself there", "point", point, "nth", n)
	var count atomic.Int64
	virtio.SetCrashHook(func(p string) {
		if p == point && count.Add(1) == n {
			syscall.Kill(syscall.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way: do not go on
		}
	})
	return nil
}
