package units

import "testing"

func TestParseSize(t *testing.T) {
	good := map[string]uint64{
		"512": 512, "64K": 64 << 10, "64k": 64 << 10, "64KiB": 64 << 10, "20G": 20 << 30,
		"1.5G": 3 << 29, "2T": 2 << 40, "100M": 100 << 20, "7B": 7,
		"1E": 1 << 60, "2e": 2 << 60, "1EiB": 1 << 60, "0.5E": 1 << 59, "3P": 3 << 50, " 1G ": 1 << 30,
	}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1G", "abc", "1X", "99999999999999999999", "20000000P", "NaN", "1.5", "0.3K",
		"16E", "1e9", "1E9", "0x100", "0x1p4", "+5G", "Inf", "1_000", "1.", ".5G", "1 G", "1.5.5G"} {
		if got, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestParsePercent(t *testing.T) {
	for in, want := range map[string]float64{"10%": 0.1, "0": 0, "0.25": 0.25, "0%": 0} {
		got, err := ParsePercent(in)
		if err != nil || got != want {
			t.Errorf("ParsePercent(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"100%", "-1%", "x", "1.5", "1"} {
		if _, err := ParsePercent(in); err == nil {
			t.Errorf("ParsePercent(%q) succeeded", in)
		}
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 29: "1.5 GiB"} {
		if got := HumanBytes(n); got != want {
			t.Errorf("HumanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
