// Package units parses and prints the byte counts and shares that
// thinblk's commands take and show (64K, 20G, 10%).
package units

import (
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
)

// ParseSize parses a byte count with an optional binary suffix: 512, 64K,
// 20G, 1.5T, 1E (K=1024), the suffixes qemu-img takes. "KiB"/"KB"/"k"
// spellings are accepted; exponents (1e9), hex and signs are not.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	u := strings.ToUpper(t)
	u = strings.TrimSuffix(strings.TrimSuffix(u, "IB"), "B")
	mult := uint64(1)
	if n := len(u); n > 0 {
		switch u[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		case 'P':
			mult = 1 << 50
		case 'E':
			mult = 1 << 60
		}
		if mult != 1 {
			u = u[:n-1]
		}
	}
	if !decimal.MatchString(u) {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G, T, P or E suffix", s)
	}
	if n, err := strconv.ParseUint(u, 10, 64); err == nil {
		if n > math.MaxUint64/mult {
			return 0, fmt.Errorf("size %q is too large", s)
		}
		return n * mult, nil
	}
	f, err := strconv.ParseFloat(u, 64)
	if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G, T, P or E suffix", s)
	}
	v := f * float64(mult)
	if v >= math.MaxUint64/2 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	// A fraction of a byte is a typo ("1.5" meant 1.5G?), not a request to round down.
	if v != math.Trunc(v) {
		return 0, fmt.Errorf("size %q is not a whole number of bytes", s)
	}
	return uint64(v), nil
}

// decimal is the number part of a size: digits with an optional fraction,
// as qemu-img reads it (strconv alone would take 1e9, 0x1p4, Inf).
var decimal = regexp.MustCompile(`^[0-9]+(\.[0-9]+)?$`)

// ParsePercent parses "10%" or "0.1" into a fraction in [0, 1).
func ParsePercent(s string) (float64, error) {
	t := strings.TrimSpace(s)
	div := 1.0
	if strings.HasSuffix(t, "%") {
		t = strings.TrimSuffix(t, "%")
		div = 100
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || math.IsNaN(f) || f < 0 || f/div >= 1 {
		return 0, fmt.Errorf("%q: want a percentage from 0%% to below 100%%", s)
	}
	return f / div, nil
}

// HumanBytes formats n with a binary unit, for tables.
func HumanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}
