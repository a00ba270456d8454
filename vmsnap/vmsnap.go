// Package vmsnap takes crash-consistent (or, with the guest agent,
// filesystem-consistent) snapshots of a running VM's thinblk disks.
//
// Take drives two QMP sockets: QEMU's (through go-qemu) and the control
// socket of `thinblk serve` (through package qmp). The sequence is
//
//	connect to thinblk, QEMU (and the guest agent with Freeze)
//	query-status                 a VM that is already paused stays paused
//	guest-fsfreeze-freeze        with Freeze, while the guest still runs
//	stop                         QEMU stops the vCPUs and the vhost-user rings
//	query-volume-inflight        polled until the volumes have nothing in flight
//	snapshot-create-group        one instant for every volume, all or none
//	cont                         only if we stopped it
//	guest-fsfreeze-thaw          with Freeze, once the guest runs again
//
// On a failure before the snapshot exists the VM is resumed (and thawed)
// and nothing is left behind: thinblk creates the group all or none. A
// failure to resume or thaw after the snapshot exists keeps the snapshot
// (it is complete and consistent) and returns a *ResumeError that says
// what the VM was left in.
//
// Every wait is bounded: Options.Timeout bounds everything up to and
// including the snapshot; resuming and thawing get a fresh Timeout each,
// since they must be tried even when the forward path ran out of time.
package vmsnap

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/thinblk/thinblk/pebblemeta"
	"github.com/thinblk/thinblk/qmp"
)

// DefaultTimeout is Options.Timeout's zero value.
const DefaultTimeout = 30 * time.Second

// Options say what to snapshot and through which sockets.
type Options struct {
	QEMU    string   // QEMU's QMP unix socket
	Thinblk string   // thinblk serve's control (QMP) unix socket
	Volumes []string // thinblk volumes that are the VM's disks
	Name    string   // snapshot name (see SnapshotNames)
	// Writable makes writable clones instead of read-only snapshots.
	Writable bool
	// Freeze asks the guest agent at QGA to freeze the guest's filesystems
	// around the snapshot.
	Freeze bool
	QGA    string // qemu-ga's virtio-serial chardev socket (needed with Freeze)
	// Timeout bounds the way to the snapshot; 0 means DefaultTimeout.
	Timeout time.Duration
	// Logf, when set, gets one line per step.
	Logf func(format string, args ...any)
}

// Snapshot is one snapshot of the group.
type Snapshot struct {
	Volume string `json:"volume"`
	Name   string `json:"name"`
}

// SnapshotNames is the naming rule: a single volume's snapshot is called
// name; with several volumes each is called VOLUME@name (e.g. vm1-root@monday),
// so that the group's members are told apart and found by suffix.
func SnapshotNames(volumes []string, name string) ([]Snapshot, error) {
	if len(volumes) == 0 {
		return nil, errors.New("no volume given")
	}
	seen := map[string]bool{}
	out := make([]Snapshot, 0, len(volumes))
	for _, v := range volumes {
		if seen[v] {
			return nil, fmt.Errorf("volume %s given twice", v)
		}
		seen[v] = true
		if err := pebblemeta.ValidVolumeName(v); err != nil {
			return nil, err
		}
		n := name
		if len(volumes) > 1 {
			n = v + "@" + name
		}
		if err := pebblemeta.ValidVolumeName(n); err != nil {
			return nil, fmt.Errorf("snapshot name: %w", err)
		}
		out = append(out, Snapshot{Volume: v, Name: n})
	}
	return out, nil
}

// Result says what Take did.
type Result struct {
	Snapshots []Snapshot
	// WasRunning is false when the VM was already paused (and stays so).
	WasRunning bool
	// Paused is how long the VM was stopped by us (stop to cont answered).
	Paused time.Duration
	// Drain is how long the in-flight requests took to finish after stop.
	Drain time.Duration
	// Frozen is the number of filesystems the guest agent froze.
	Frozen int
}

// ResumeError is returned when the snapshot was created but the VM could
// not be resumed or its filesystems thawed afterwards.
type ResumeError struct {
	Snapshots []Snapshot
	ContErr   error // cont failed: the VM is still paused
	ThawErr   error // thaw failed: guest filesystems may still be frozen
}

func (e *ResumeError) Error() string {
	names := make([]string, len(e.Snapshots))
	for i, s := range e.Snapshots {
		names[i] = s.Name
	}
	var msg []string
	if e.ContErr != nil {
		msg = append(msg, fmt.Sprintf("the VM is still paused: %v (resume it with QMP cont)", e.ContErr))
	}
	if e.ThawErr != nil {
		msg = append(msg, fmt.Sprintf("guest filesystems may still be frozen: %v (run guest-fsfreeze-thaw)", e.ThawErr))
	}
	return fmt.Sprintf("snapshot %s created, but %s", strings.Join(names, ", "), strings.Join(msg, "; "))
}

func (e *ResumeError) Unwrap() []error { return []error{e.ContErr, e.ThawErr} }

// drainPoll is how often query-volume-inflight is asked while draining.
const drainPoll = 5 * time.Millisecond

// Take snapshots o.Volumes at one instant while the VM is paused.
func Take(ctx context.Context, o Options) (*Result, error) {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	snaps, err := SnapshotNames(o.Volumes, o.Name)
	if err != nil {
		return nil, err
	}
	if o.QEMU == "" || o.Thinblk == "" {
		return nil, errors.New("both the QEMU and the thinblk QMP sockets are needed")
	}
	if o.Freeze && o.QGA == "" {
		return nil, errors.New("freeze needs the guest agent's socket")
	}
	fwd, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	// Undoing must be tried even when the forward path ran out of time or
	// was cancelled, so it gets its own bound, independent of ctx.
	fresh := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), o.Timeout)
	}

	tb, err := qmp.Dial(fwd, o.Thinblk)
	if err != nil {
		return nil, fmt.Errorf("thinblk control socket %s: %w", o.Thinblk, err)
	}
	defer tb.Close()
	q, err := dialQEMU(fwd, o.QEMU)
	if err != nil {
		return nil, err
	}
	defer q.close()
	st, err := q.status(fwd)
	if err != nil {
		return nil, err
	}
	res := &Result{Snapshots: snaps, WasRunning: st.Running}
	logf("vm-snapshot: VM is %s", st.Status)

	var ga *guestAgent
	if o.Freeze {
		if !st.Running {
			return nil, fmt.Errorf("freeze: the VM is %s, and a paused guest's agent cannot answer", st.Status)
		}
		if ga, err = dialAgent(fwd, o.QGA); err != nil {
			return nil, fmt.Errorf("freeze: %w; nothing was done, the VM runs on", err)
		}
		defer ga.close()
		n, err := ga.freeze(fwd)
		if err != nil {
			// qemu-ga thaws on a failed freeze; ask again in case the
			// reply, not the freeze, was lost.
			tctx, tcancel := fresh()
			ga.thaw(tctx)
			tcancel()
			return nil, fmt.Errorf("freeze: %w; nothing was done, the VM runs on", err)
		}
		res.Frozen = n
		logf("vm-snapshot: guest froze %d filesystems", n)
	}

	// undo puts the VM back as it was after a failure before the snapshot.
	undo := func(cause error) error {
		errs := []error{cause}
		uctx, ucancel := fresh()
		defer ucancel()
		if st.Running {
			if err := resume(uctx, q); err != nil {
				errs = append(errs, fmt.Errorf("and resuming the VM failed, it is still paused: %w", err))
			}
		}
		if ga != nil {
			tctx, tcancel := fresh()
			defer tcancel()
			if _, err := ga.thaw(tctx); err != nil {
				errs = append(errs, fmt.Errorf("and thawing failed, guest filesystems may still be frozen: %w", err))
			}
		}
		return errors.Join(errs...)
	}

	var stopped time.Time
	if st.Running {
		stopped = time.Now()
		if _, err := q.run(fwd, "stop", nil); err != nil {
			// A stop that timed out may still have happened: undo resumes.
			return nil, undo(err)
		}
		logf("vm-snapshot: VM stopped")
	}

	drainStart := time.Now()
	for {
		var inflight struct {
			Requests int `json:"requests"`
		}
		if err := tb.Execute(fwd, "query-volume-inflight", map[string]any{"names": o.Volumes}, &inflight); err != nil {
			return nil, undo(fmt.Errorf("thinblk query-volume-inflight: %w", err))
		}
		if inflight.Requests == 0 {
			break
		}
		select {
		case <-fwd.Done():
			if ctx.Err() != nil {
				return nil, undo(ctx.Err())
			}
			return nil, undo(fmt.Errorf("requests still in flight on %s after %v", strings.Join(o.Volumes, ", "), time.Since(drainStart).Round(time.Millisecond)))
		case <-time.After(drainPoll):
		}
	}
	res.Drain = time.Since(drainStart)

	group := make([]map[string]any, len(snaps))
	for i, s := range snaps {
		group[i] = map[string]any{"volume": s.Volume, "name": s.Name, "writable": o.Writable}
	}
	if err := tb.Execute(fwd, "snapshot-create-group", map[string]any{"snapshots": group}, nil); err != nil {
		var qe *qmp.Error
		if !errors.As(err, &qe) && snapshotsExist(o.Thinblk, snaps, o.Timeout) {
			// The reply was lost but the group was made: it is complete
			// and was taken while the VM was paused, so it counts.
			logf("vm-snapshot: reply to snapshot-create-group lost (%v), but the snapshots exist", err)
		} else {
			return nil, undo(fmt.Errorf("thinblk snapshot-create-group: %w", err))
		}
	}
	logf("vm-snapshot: created %d snapshots", len(snaps))

	var re ResumeError
	if st.Running {
		uctx, ucancel := fresh()
		re.ContErr = resume(uctx, q)
		ucancel()
		res.Paused = time.Since(stopped)
		if re.ContErr == nil {
			logf("vm-snapshot: VM resumed after %v", res.Paused.Round(time.Microsecond))
		}
	}
	if ga != nil {
		// The agent answers only once the vCPUs run again.
		tctx, tcancel := fresh()
		_, re.ThawErr = ga.thaw(tctx)
		tcancel()
		if re.ThawErr == nil {
			logf("vm-snapshot: guest thawed")
		}
	}
	if re.ContErr != nil || re.ThawErr != nil {
		re.Snapshots = snaps
		return res, &re
	}
	return res, nil
}

// resume sends cont, reconnecting if the monitor died in a timeout.
func resume(ctx context.Context, q *qemuMonitor) error {
	if q.dead {
		nq, err := dialQEMU(ctx, q.path)
		if err != nil {
			return err
		}
		*q = *nq
	}
	_, err := q.run(ctx, "cont", nil)
	return err
}

// snapshotsExist asks thinblk, on a new connection, whether every snapshot
// of the group is there.
func snapshotsExist(path string, snaps []Snapshot, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := qmp.Dial(ctx, path)
	if err != nil {
		return false
	}
	defer c.Close()
	var st struct {
		Volumes []struct {
			Name   string `json:"name"`
			Origin string `json:"origin"`
		} `json:"volumes"`
	}
	if err := c.Execute(ctx, "query-pool", nil, &st); err != nil {
		return false
	}
	have := map[string]string{}
	for _, v := range st.Volumes {
		have[v.Name] = v.Origin
	}
	for _, s := range snaps {
		if origin, ok := have[s.Name]; !ok || origin != s.Volume {
			return false
		}
	}
	return true
}

// Stop stops the VM behind QEMU's QMP socket at path if it is running, and
// says whether it sent the stop: a VM that was already paused is left
// alone, so that whoever paused it stays the one to resume it. With an
// error, stopped true means the stop was sent but its answer did not come
// (the VM may be stopped). The connection is closed on return (QEMU serves
// one client per monitor socket).
func Stop(ctx context.Context, path string) (stopped bool, err error) {
	q, err := dialQEMU(ctx, path)
	if err != nil {
		return false, err
	}
	defer q.close()
	st, err := q.status(ctx)
	if err != nil {
		return false, err
	}
	if !st.Running {
		return false, nil
	}
	if _, err := q.run(ctx, "stop", nil); err != nil {
		return true, err
	}
	return true, nil
}

// Cont resumes the VM behind QEMU's QMP socket at path.
func Cont(ctx context.Context, path string) error {
	q, err := dialQEMU(ctx, path)
	if err != nil {
		return err
	}
	defer q.close()
	_, err = q.run(ctx, "cont", nil)
	return err
}
