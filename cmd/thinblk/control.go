package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/thin"
)

// A serve that holds a pool listens for QMP on a control socket and writes
// the socket's path into controlFile in the pool directory, so that the
// management commands find it wherever --qmp put it.
const (
	controlFile       = "control"
	defaultControlSoc = "qmp.sock"
)

// errNoControl says no running serve answers for the pool.
var errNoControl = errors.New("no control socket")

// parseQMPAddr accepts "unix:PATH" (QEMU's spelling) or a bare path.
func parseQMPAddr(s string) (string, error) {
	path, ok := strings.CutPrefix(s, "unix:")
	if !ok && strings.Contains(s, ":") {
		return "", fmt.Errorf("--qmp %q: only unix:PATH is supported", s)
	}
	if path == "" {
		return "", fmt.Errorf("--qmp %q: empty path", s)
	}
	return path, nil
}

// eventSnapshotCreated follows a successful snapshot-create or
// snapshot-create-group: one event per instant, with the same
// {"snapshots": [{volume, name, writable}]} shape for both.
const eventSnapshotCreated = "SNAPSHOT_CREATED"

// Argument and result shapes of the control commands.
type (
	volumeArgs struct {
		Name string `json:"name"`
		// Force deletes a volume a front-end is connected to (volume-delete,
		// snapshot-delete); without it that is refused.
		Force bool `json:"force,omitempty"`
	}
	volumeSizeArgs struct {
		Name string `json:"name"`
		Size uint64 `json:"size"`
	}
	sizeArgs struct {
		Size uint64 `json:"size"`
	}
	snapshotArgs struct {
		Volume   string `json:"volume"`
		Name     string `json:"name"`
		Writable bool   `json:"writable,omitempty"`
	}
	snapshotGroupArgs struct {
		Snapshots []snapshotArgs `json:"snapshots"`
	}
)

func (a snapshotGroupArgs) specs() []thin.SnapshotSpec {
	specs := make([]thin.SnapshotSpec, len(a.Snapshots))
	for i, s := range a.Snapshots {
		specs[i] = thin.SnapshotSpec{Origin: s.Volume, Name: s.Name, Writable: s.Writable}
	}
	return specs
}

// registerPoolCommands puts every management operation on the QMP server
// and turns pool changes into QMP events.
func registerPoolCommands(s *qmp.Server, pool *thin.Pool, ex *exports) (stop func()) {
	s.Register("query-pool", func(ctx context.Context, args json.RawMessage) (any, error) {
		if err := qmp.DecodeArgs(args, &struct{}{}); err != nil {
			return nil, err
		}
		return pool.Status(), nil
	})
	s.Register("pool-grow", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a sizeArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		return nil, pool.Grow(a.Size)
	})
	s.Register("volume-create", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a volumeSizeArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		if err := ex.socketProblem(a.Name); err != nil {
			return nil, err
		}
		return nil, pool.CreateVolume(a.Name, a.Size)
	})
	s.Register("volume-resize", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a volumeSizeArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		return nil, pool.ResizeVolume(a.Name, a.Size)
	})
	s.Register("volume-delete", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a volumeArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		if err := ex.inUse(a.Name, a.Force); err != nil {
			return nil, err
		}
		return nil, pool.DeleteVolume(a.Name)
	})
	s.Register("snapshot-create", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a snapshotArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		if err := ex.socketProblem(a.Name); err != nil {
			return nil, err
		}
		if err := pool.CreateSnapshot(a.Volume, a.Name, a.Writable); err != nil {
			return nil, err
		}
		s.Emit(eventSnapshotCreated, snapshotGroupArgs{Snapshots: []snapshotArgs{a}})
		return nil, nil
	})
	// A consistency group: every snapshot at one instant, all or none.
	s.Register("snapshot-create-group", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a snapshotGroupArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		for _, sn := range a.Snapshots {
			if err := ex.socketProblem(sn.Name); err != nil {
				return nil, err
			}
		}
		if err := pool.CreateSnapshots(a.specs()); err != nil {
			return nil, err
		}
		s.Emit(eventSnapshotCreated, a)
		return nil, nil
	})
	s.Register("snapshot-delete", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a volumeArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		if err := notAVolume(pool.Status(), a.Name); err != nil {
			return nil, err
		}
		if err := ex.inUse(a.Name, a.Force); err != nil {
			return nil, err
		}
		return nil, pool.DeleteVolume(a.Name)
	})
	s.Register("volume-reserve", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a reserveArgs
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		return nil, pool.SetReserveMode(a.Name, a.Enable)
	})
	s.Register("query-volume-inflight", func(ctx context.Context, args json.RawMessage) (any, error) {
		var a struct {
			Names []string `json:"names,omitempty"`
		}
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		return map[string]int{"requests": ex.inFlight(a.Names...)}, nil
	})
	registerStreamCommands(s, pool, ex)
	dir := pool.Status().Pool.Dir
	return pool.Watch(func(ev thin.Event) {
		if name, data, ok := spaceEvent(dir, ev); ok {
			s.Emit(name, data)
			return
		}
		if name, data, ok := failureEvent(dir, ev); ok {
			s.Emit(name, data)
			return
		}
		data := map[string]any{"size": ev.Size}
		if ev.Volume != "" {
			data["name"] = ev.Volume
		}
		s.Emit(strings.ToUpper(strings.ReplaceAll(ev.Type.String(), "-", "_")), data)
	})
}

// QMP events for the pool's free space. The low-water mark has one event
// for both directions (below says which), like a state change.
const (
	eventOutOfSpace     = "BLOCK_POOL_OUT_OF_SPACE"    // {pool, volume, free_bytes}
	eventSpaceAvailable = "BLOCK_POOL_SPACE_AVAILABLE" // {pool, free_bytes}
	eventLowWater       = "BLOCK_POOL_LOW_WATER"       // {pool, free_bytes, below}
	// A commit failed: the pool refuses every request until restarted.
	eventPoolFailed = "BLOCK_POOL_FAILED" // {pool, reason}
	// The data file's host file system: a write found it full, it had
	// space again, its free space crossed the pool's low-water mark.
	eventHostOutOfSpace     = "BLOCK_POOL_HOST_OUT_OF_SPACE"    // {pool, volume, host_free_bytes}
	eventHostSpaceAvailable = "BLOCK_POOL_HOST_SPACE_AVAILABLE" // {pool, host_free_bytes}
	eventHostLowWater       = "BLOCK_POOL_HOST_LOW_WATER"       // {pool, host_free_bytes, below}
)

// failureEvent maps thin's PoolFailed to BLOCK_POOL_FAILED.
func failureEvent(pool string, ev thin.Event) (name string, data map[string]any, ok bool) {
	if ev.Type != thin.PoolFailed {
		return "", nil, false
	}
	return eventPoolFailed, map[string]any{"pool": pool, "reason": ev.Reason}, true
}

// spaceEvent maps thin's space events to QMP events; ok is false for the
// other (volume and pool change) events.
func spaceEvent(pool string, ev thin.Event) (name string, data map[string]any, ok bool) {
	// The host's events are the pool's with their own names and free-space key.
	outOfSpace, available, lowWater, freeKey := eventOutOfSpace, eventSpaceAvailable, eventLowWater, "free_bytes"
	if ev.Host {
		outOfSpace, available, lowWater, freeKey = eventHostOutOfSpace, eventHostSpaceAvailable, eventHostLowWater, "host_free_bytes"
	}
	data = map[string]any{"pool": pool, freeKey: ev.Free}
	switch ev.Type {
	case thin.OutOfSpace:
		data["volume"] = ev.Volume
		return outOfSpace, data, true
	case thin.SpaceAvailable:
		return available, data, true
	case thin.LowWater, thin.AboveLowWater:
		data["below"] = ev.Type == thin.LowWater
		return lowWater, data, true
	}
	return "", nil, false
}

// startControl listens for QMP on path and records it in the pool dir.
func startControl(ctx context.Context, pool *thin.Pool, ex *exports, path string, mode os.FileMode, f serveFlags) (*qmp.Server, func(), error) {
	s := qmp.NewServer(qmp.Options{Logger: ex.log.With("control", path), Version: version})
	stopEvents := registerPoolCommands(s, pool, ex)
	registerStatsCommand(s, ex)
	for _, qemu := range f.qemuQMP {
		stopPauser := startPauser(pool, qemu, s.Emit, ex.log)
		stopPrev := stopEvents
		stopEvents = func() { stopPauser(); stopPrev() }
	}
	ln, err := s.ListenUnix(path, mode)
	if err != nil {
		stopEvents()
		return nil, nil, fmt.Errorf("control socket: %w", err)
	}
	abs, _ := filepath.Abs(path)
	record := filepath.Join(f.pool, controlFile)
	if err := os.WriteFile(record, []byte(abs+"\n"), 0o600); err != nil {
		s.Close()
		stopEvents()
		return nil, nil, fmt.Errorf("record control socket: %w", err)
	}
	go s.Serve(ctx, ln)
	cleanup := func() {
		stopEvents()
		s.Close()
		os.Remove(record)
	}
	return s, cleanup, nil
}

// remoteOps drives a running serve over its control socket.
type remoteOps struct{ c *qmp.Client }

func (r remoteOps) do(cmd string, args, result any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return r.c.Execute(ctx, cmd, args, result)
}

func (r remoteOps) Grow(size uint64) error { return r.do("pool-grow", sizeArgs{size}, nil) }
func (r remoteOps) CreateVolume(n string, size uint64) error {
	return r.do("volume-create", volumeSizeArgs{n, size}, nil)
}
func (r remoteOps) DeleteVolume(n string, force bool) error {
	return r.do("volume-delete", volumeArgs{Name: n, Force: force}, nil)
}
func (r remoteOps) ResizeVolume(n string, size uint64) error {
	return r.do("volume-resize", volumeSizeArgs{n, size}, nil)
}
func (r remoteOps) Status() (thin.Status, error) {
	var st thin.Status
	err := r.do("query-pool", nil, &st)
	return st, err
}
func (r remoteOps) CreateSnapshots(specs []thin.SnapshotSpec) error {
	var a snapshotGroupArgs
	for _, sp := range specs {
		a.Snapshots = append(a.Snapshots, snapshotArgs{Volume: sp.Origin, Name: sp.Name, Writable: sp.Writable})
	}
	return r.do("snapshot-create-group", a, nil)
}
func (r remoteOps) Close() error { return r.c.Close() }

// dialControl connects to the control socket of a serve holding dir.
func dialControl(dir string) (poolOps, error) {
	b, err := os.ReadFile(filepath.Join(dir, controlFile))
	if err != nil {
		return nil, errNoControl
	}
	path := strings.TrimSpace(string(b))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, path)
	if err != nil {
		// A record left by a serve that died: nobody answers.
		return nil, errNoControl
	}
	return remoteOps{c}, nil
}
