package qmp

import "testing"

func TestParseVersion(t *testing.T) {
	for v, want := range map[string][3]int{
		"1.2.3":            {1, 2, 3},
		"v1.2.3":           {1, 2, 3},
		"v0.4":             {0, 4, 0},
		"2":                {2, 0, 0},
		"1.2.3-4-gabc1234": {1, 2, 3},
		"1.2-dirty":        {1, 2, 0},
		"5d60142":          {0, 0, 0}, // a commit hash: git describe --always without tags
		"5d60142-dirty":    {0, 0, 0},
		"123456a":          {0, 0, 0},
		"dev":              {0, 0, 0},
		"":                 {0, 0, 0},
		"10.20.30+build.7": {10, 20, 30},
		"1.2.3.4":          {0, 0, 0},
		"1.2.3~rc1":        {1, 2, 3},
		"v7.2.0-rc1-dirty": {7, 2, 0},
	} {
		vi := parseVersion(v)
		if got := [3]int{vi.QEMU.Major, vi.QEMU.Minor, vi.QEMU.Micro}; got != want {
			t.Errorf("parseVersion(%q) = %v, want %v", v, got, want)
		}
	}
}
