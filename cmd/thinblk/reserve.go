package main

// Reserve mode from the command line, next to the other volume commands:
// `thinblk volume reserve DIR VOLUME on|off`, through the control socket
// (QMP volume-reserve) when serve holds the pool, directly otherwise.

import (
	"fmt"
	"io"
)

type reserveArgs struct {
	Name   string `json:"name"`
	Enable bool   `json:"enable"`
}

// reserver is the part of poolOps that turns reserve mode on and off;
// both directOps and remoteOps have it.
type reserver interface {
	SetReserveMode(name string, on bool) error
}

func (d directOps) SetReserveMode(name string, on bool) error { return d.p.SetReserveMode(name, on) }
func (r remoteOps) SetReserveMode(name string, on bool) error {
	return r.do("volume-reserve", reserveArgs{name, on}, nil)
}

func runVolumeReserve(args []string, stdout, stderr io.Writer) int {
	const cmd = "volume reserve"
	fs := newFlagSet(cmd, "volume reserve DIR VOLUME on|off", stderr)
	pos, code, ok := parseExactly(fs, args, 3)
	if !ok {
		return code
	}
	var on bool
	switch pos[2] {
	case "on":
		on = true
	case "off":
	default:
		return usageError(stderr, cmd, fmt.Errorf("%q: want on or off", pos[2]))
	}
	return withPool(pos[0], stderr, cmd, func(ops poolOps) error {
		r, ok := ops.(reserver)
		if !ok {
			return fmt.Errorf("this pool access cannot set reserve mode")
		}
		if err := r.SetReserveMode(pos[1], on); err != nil {
			return err
		}
		st, err := ops.Status()
		if err != nil {
			return err
		}
		for _, v := range st.Volumes {
			if v.Name == pos[1] {
				fmt.Fprintf(stdout, "volume %s: reserve mode %s, %d bytes reserved\n", v.Name, pos[2], v.ReservedBytes)
			}
		}
		return nil
	})
}
