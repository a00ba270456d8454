package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/thinblk/thinblk/thin"
)

// A pool that failed (thin's fault model tests make it) says so on QMP
// with BLOCK_POOL_FAILED and in status --json.
func TestPoolFailedEventAndStatus(t *testing.T) {
	name, data, ok := failureEvent("/srv/pool", thin.Event{Type: thin.PoolFailed, Reason: "fdatasync data: input/output error"})
	if got, _ := json.Marshal(data); !ok || name != "BLOCK_POOL_FAILED" ||
		string(got) != `{"pool":"/srv/pool","reason":"fdatasync data: input/output error"}` {
		t.Fatalf("%v %s %s", ok, name, got)
	}
	if _, _, ok := failureEvent("/srv/pool", thin.Event{Type: thin.LowWater}); ok {
		t.Fatal("a space event mapped to a failure")
	}
	js, _ := json.Marshal(thin.Status{Pool: thin.PoolStatus{Failed: "pool /srv/pool: pool failed"}})
	if !strings.Contains(string(js), `"failed":"pool /srv/pool: pool failed"`) {
		t.Fatalf("status --json: %s", js)
	}
	if js, _ := json.Marshal(thin.Status{}); strings.Contains(string(js), `"failed"`) {
		t.Fatalf("a serving pool's status shows a failure: %s", js)
	}
}
