package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/thinblk/thinblk/thin"
)

func TestStatusSaysWhySpaceIsReserved(t *testing.T) {
	st := thin.Status{Volumes: []thin.VolumeStatus{
		{Name: "plain", Kind: "volume", SizeBytes: 1 << 20},
		{Name: "vm", Kind: "volume", SizeBytes: 1 << 30, ReservedBytes: 3 << 20,
			ReservedProvisionedBytes: 1 << 20, ReservedSharedBytes: 2 << 20},
		{Name: "db", Kind: "clone", Origin: "vm", SizeBytes: 1 << 30, ReserveMode: true,
			ReservedBytes: 5 << 20, ReservedReserveModeBytes: 5 << 20},
	}}
	var out bytes.Buffer
	printStatus(&out, st)
	lines := strings.Split(out.String(), "\n")
	want := map[string]string{
		"plain": " -",
		"vm":    "provisioned 1.0 MiB, snapshot copies 2.0 MiB",
		"db":    "reserve mode 5.0 MiB",
	}
	for name, why := range want {
		found := false
		for _, l := range lines {
			if strings.HasPrefix(strings.TrimSpace(l), name+" ") {
				found = true
				if !strings.HasSuffix(l, why) {
					t.Errorf("line for %s: %q, want it to end with %q", name, l, why)
				}
			}
		}
		if !found {
			t.Errorf("no line for %s in\n%s", name, out.String())
		}
	}
}
