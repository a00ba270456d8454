package xfstests

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// Config is the xfstests configuration the runner writes and passes to check through
// HOST_OPTIONS, so the user's tree is never modified.
type Config struct {
	FSTYP string // xfs or ext4
	// TestDev and ScratchDev are the block devices. Empty means: taken at run time from
	// $THINBLK_TEST_DEV / $THINBLK_SCRATCH_DEV, which the guest script sets after finding the
	// disks by PCI slot (guest device names are not known before boot).
	TestDev, ScratchDev string
	TestDir, ScratchMnt string
	MkfsOptions         string
	MountOptions        string
	TestFSMountOptions  string
	Extra               map[string]string // further variables, written sorted
}

var varNameRE = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*$`)

// Validate checks what the config file cannot express safely.
func (c Config) Validate() error {
	switch c.FSTYP {
	case "xfs", "ext4":
	default:
		return fmt.Errorf("config: FSTYP %q: want xfs or ext4", c.FSTYP)
	}
	if c.TestDir == "" || c.ScratchMnt == "" {
		return fmt.Errorf("config: TEST_DIR and SCRATCH_MNT are required")
	}
	for k := range c.Extra {
		if !varNameRE.MatchString(k) {
			return fmt.Errorf("config: variable name %q", k)
		}
	}
	return nil
}

// shellQuote single-quotes s for sh and bash.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Render returns the local.config text.
func (c Config) Render() (string, error) {
	if err := c.Validate(); err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("# Written by thinblk-xfstests; passed to check as HOST_OPTIONS.\n")
	put := func(k, v string) { fmt.Fprintf(&b, "export %s=%s\n", k, shellQuote(v)) }
	dev := func(k, v, env string) {
		if v != "" {
			put(k, v)
			return
		}
		fmt.Fprintf(&b, "export %s=\"${%s:?thinblk-xfstests: %s not set}\"\n", k, env, env)
	}
	put("FSTYP", c.FSTYP)
	dev("TEST_DEV", c.TestDev, "THINBLK_TEST_DEV")
	put("TEST_DIR", c.TestDir)
	dev("SCRATCH_DEV", c.ScratchDev, "THINBLK_SCRATCH_DEV")
	put("SCRATCH_MNT", c.ScratchMnt)
	if c.MkfsOptions != "" {
		put("MKFS_OPTIONS", c.MkfsOptions)
	}
	if c.MountOptions != "" {
		put("MOUNT_OPTIONS", c.MountOptions)
	}
	if c.TestFSMountOptions != "" {
		put("TEST_FS_MOUNT_OPTS", c.TestFSMountOptions)
	}
	keys := make([]string, 0, len(c.Extra))
	for k := range c.Extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		put(k, c.Extra[k])
	}
	return b.String(), nil
}
