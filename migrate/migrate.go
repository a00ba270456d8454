// Package migrate moves a running VM and its thinblk volumes from one
// pool, serve and QEMU to another (issue 15): the volumes travel as
// streams (package stream) between the two serves while the VM runs, in
// rounds until what changed is small; then QEMU migrates the VM with
// pause-before-switchover, and while the source is paused at
// pre-switchover the last changes follow before migrate-continue.
//
// Nothing here assumes one machine: the serves and QEMUs are reached
// through their control and QMP sockets (forward them with ssh for other
// hosts), and a stream flows from the source serve through this process
// to the destination serve over connections the serves open to it (unix
// sockets, or TCP with Options.StreamHost).
//
// Any failure leaves the source VM running on its volumes and removes
// what the destination received.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/thinblk/thinblk/internal/units"
	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/stream"
)

// Endpoint is one side: the serve holding the pool and the QEMU.
type Endpoint struct {
	Thinblk string // serve's control socket
	QEMU    string // QEMU's QMP socket (the destination's once it started)
}

// Options configure Run.
type Options struct {
	Source, Destination Endpoint
	// Volumes are the VM's thinblk disks; they keep their names on the
	// destination, where none of them may exist yet.
	Volumes []string
	// URI is the QEMU migration address the destination QEMU listens on
	// (its -incoming), e.g. "unix:/run/mig.sock" or "tcp:host:4444".
	URI string
	// StartDestination starts the destination QEMU with -incoming URI
	// and the volumes as vhost-user-blk disks. It is called once the
	// volumes exist on the destination (so their sockets do), and returns
	// once the QEMU runs; Run then connects to Destination.QEMU.
	StartDestination func(ctx context.Context) error
	// StreamHost, when set, is the address the serves connect to for the
	// streams (this process listens on HOST:0 over TCP); by default a
	// unix socket in a temporary directory, for serves on this machine.
	StreamHost string
	// MaxDelta ends the rounds while the VM runs: once a round moved no
	// more than this many bytes, QEMU's migration starts (default 16 MiB).
	MaxDelta uint64
	// MaxRounds bounds the incremental rounds before QEMU's migration
	// (default 5).
	MaxRounds int
	// Timeout bounds each control step and the wait for QEMU's migration
	// (default 10 minutes); streams take as long as their bytes take.
	Timeout time.Duration
	// Logf prints progress (default: nothing).
	Logf func(format string, args ...any)

	// fault, in tests, fails the migration at a step.
	fault func(step string) error
}

// Steps a test can fail at, in order.
const (
	StepFull          = "full"           // after the full streams
	StepRound         = "round"          // after an incremental round
	StepDestination   = "destination"    // after the destination QEMU started
	StepMigrate       = "migrate"        // after QEMU's migration started
	StepPreSwitchover = "pre-switchover" // after the last delta, before migrate-continue
)

// Result says what a migration did.
type Result struct {
	FullBytes      uint64        // bytes of the full streams
	Rounds         int           // incremental rounds while the VM ran
	LastDeltaBytes uint64        // bytes sent while the VM was paused
	LastDelta      time.Duration // time those took
	Downtime       time.Duration // the VM's stop as QEMU measured it
	Total          time.Duration
}

// migration is one run's state, for undoing.
type migration struct {
	o        Options
	logf     func(string, ...any)
	src, dst *qmp.Client // the serves
	srcQEMU  *qmp.Client
	dstQEMU  *qmp.Client
	dstStart bool     // StartDestination was called
	qemuMig  bool     // QEMU's migration was started
	srcSnaps []string // migration snapshots made on the source
	dstSnaps []string // and received on the destination
	received bool     // the destination may hold the volumes
	seq      int
}

// Run migrates; see the package documentation.
func Run(ctx context.Context, o Options) (*Result, error) {
	if len(o.Volumes) == 0 || o.URI == "" || o.StartDestination == nil {
		return nil, errors.New("migrate: volumes, the migration URI and a way to start the destination QEMU are needed")
	}
	if o.MaxDelta == 0 {
		o.MaxDelta = 16 << 20
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = 5
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Minute
	}
	m := &migration{o: o, logf: o.Logf}
	if m.logf == nil {
		m.logf = func(string, ...any) {}
	}
	start := time.Now()
	res, err := m.run(ctx)
	if err != nil {
		m.logf("migrate: failed: %v; undoing", err)
		if uerr := m.undo(); uerr != nil {
			err = fmt.Errorf("%w; undoing: %v", err, uerr)
		} else {
			m.logf("migrate: undone: the VM runs on the source, the destination holds nothing of it")
		}
	}
	m.close()
	if err != nil {
		return nil, fmt.Errorf("migrate: %w", err)
	}
	res.Total = time.Since(start)
	return res, nil
}

func (m *migration) fault(step string) error {
	if m.o.fault != nil {
		return m.o.fault(step)
	}
	return nil
}

func (m *migration) step(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, m.o.Timeout)
}

func dial(ctx context.Context, what, path string) (*qmp.Client, error) {
	for { // QEMU binds its monitor socket a moment before it listens
		c, err := qmp.Dial(ctx, path)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%s %s: %w", what, path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// volumeNames lists the names a serve's pool holds.
func volumeNames(ctx context.Context, c *qmp.Client) (map[string]bool, error) {
	var st struct {
		Volumes []struct {
			Name string `json:"name"`
		} `json:"volumes"`
	}
	if err := c.Execute(ctx, "query-pool", nil, &st); err != nil {
		return nil, err
	}
	names := map[string]bool{}
	for _, v := range st.Volumes {
		names[v.Name] = true
	}
	return names, nil
}

func (m *migration) run(ctx context.Context) (*Result, error) {
	res := &Result{}
	var err error
	cctx, cancel := m.step(ctx)
	defer cancel()
	if m.src, err = dial(cctx, "source thinblk", m.o.Source.Thinblk); err != nil {
		return nil, err
	}
	if m.dst, err = dial(cctx, "destination thinblk", m.o.Destination.Thinblk); err != nil {
		return nil, err
	}
	if m.srcQEMU, err = dial(cctx, "source QEMU", m.o.Source.QEMU); err != nil {
		return nil, err
	}
	st, err := qemuStatus(cctx, m.srcQEMU)
	if err != nil {
		return nil, fmt.Errorf("source QEMU: %w", err)
	}
	m.logf("migrate: source VM is %s", st)
	have, err := volumeNames(cctx, m.src)
	if err != nil {
		return nil, fmt.Errorf("source thinblk: %w", err)
	}
	taken, err := volumeNames(cctx, m.dst)
	if err != nil {
		return nil, fmt.Errorf("destination thinblk: %w", err)
	}
	for _, v := range m.o.Volumes {
		if !have[v] {
			return nil, fmt.Errorf("the source pool has no volume %s", v)
		}
		if taken[v] {
			return nil, fmt.Errorf("the destination pool already has a volume %s", v)
		}
	}

	// Full streams, then rounds while the VM runs.
	m.received = true
	t0 := time.Now()
	n, err := m.round(ctx, "")
	if err != nil {
		return nil, fmt.Errorf("full stream: %w", err)
	}
	res.FullBytes = n
	m.logf("migrate: full streams: %s in %v (%s/s)", human(n), since(t0), rate(n, t0))
	if err := m.fault(StepFull); err != nil {
		return nil, err
	}
	for res.Rounds < m.o.MaxRounds {
		t0 := time.Now()
		n, err := m.round(ctx, m.last())
		if err != nil {
			return nil, fmt.Errorf("round %d: %w", res.Rounds+1, err)
		}
		res.Rounds++
		m.logf("migrate: round %d: %s changed, sent in %v", res.Rounds, human(n), since(t0))
		if err := m.fault(StepRound); err != nil {
			return nil, err
		}
		if n <= m.o.MaxDelta {
			break
		}
	}

	// The destination QEMU, on the received volumes.
	cctx, cancel2 := m.step(ctx)
	defer cancel2()
	m.dstStart = true
	if err := m.o.StartDestination(cctx); err != nil {
		return nil, fmt.Errorf("start the destination QEMU: %w", err)
	}
	if m.dstQEMU, err = dial(cctx, "destination QEMU", m.o.Destination.QEMU); err != nil {
		return nil, err
	}
	if st, err := qemuStatus(cctx, m.dstQEMU); err != nil {
		return nil, fmt.Errorf("destination QEMU: %w", err)
	} else if st != "inmigrate" {
		return nil, fmt.Errorf("destination QEMU is %s, not waiting for a migration (-incoming)", st)
	}
	if err := m.fault(StepDestination); err != nil {
		return nil, err
	}

	// QEMU's migration stops before switching over.
	caps := map[string]any{"capabilities": []map[string]any{{"capability": "pause-before-switchover", "state": true}}}
	if err := m.srcQEMU.Execute(cctx, "migrate-set-capabilities", caps, nil); err != nil {
		return nil, fmt.Errorf("source QEMU: %w", err)
	}
	// QEMU 7.2's default bandwidth (32 MiB/s) is a WAN's.
	if err := m.srcQEMU.Execute(cctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(4) << 30}, nil); err != nil {
		return nil, fmt.Errorf("source QEMU: %w", err)
	}
	m.qemuMig = true
	if err := m.srcQEMU.Execute(cctx, "migrate", map[string]any{"uri": m.o.URI}, nil); err != nil {
		return nil, fmt.Errorf("source QEMU: %w", err)
	}
	if err := m.fault(StepMigrate); err != nil {
		return nil, err
	}
	t0 = time.Now()
	if err := m.catchUp(cctx, res); err != nil {
		return nil, err
	}
	m.logf("migrate: QEMU moved the VM's memory in %v; the VM is paused", since(t0))

	// The VM is stopped: its disks do not change any more.
	t0 = time.Now()
	n, err = m.round(ctx, m.last())
	if err != nil {
		return nil, fmt.Errorf("last delta: %w", err)
	}
	res.LastDeltaBytes, res.LastDelta = n, time.Since(t0)
	m.logf("migrate: last delta: %s in %v", human(n), res.LastDelta.Round(time.Millisecond))
	if err := m.fault(StepPreSwitchover); err != nil {
		return nil, err
	}
	if err := m.srcQEMU.Execute(cctx, "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
		return nil, fmt.Errorf("source QEMU: %w", err)
	}
	done, err := m.waitMigration(cctx, "completed")
	if err != nil {
		return nil, err
	}
	res.Downtime = time.Duration(done.Downtime) * time.Millisecond
	// From here the VM is the destination's: no undo.
	m.qemuMig, m.received, m.dstStart = false, false, false
	if err := waitRunning(cctx, m.dstQEMU); err != nil {
		m.logf("migrate: the destination VM: %v", err)
	}
	m.logf("migrate: completed: the VM runs on the destination; downtime %v", res.Downtime)
	m.dropSnapshots()
	return res, nil
}

// catchUp streams the volumes' changes in rounds while QEMU moves the
// VM's memory (which takes seconds: the guest keeps writing), so that at
// pre-switchover only the writes of the last round's time are left for
// the downtime. It returns once QEMU paused the VM there.
func (m *migration) catchUp(ctx context.Context, res *Result) error {
	last := time.Now()
	for {
		var st migrateStatus
		if err := m.srcQEMU.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return fmt.Errorf("source QEMU: %w", err)
		}
		switch st.Status {
		case "pre-switchover":
			return nil
		case "failed", "cancelled", "cancelling", "completed":
			return fmt.Errorf("QEMU's migration %s before pre-switchover: %s", st.Status, st.ErrorDesc)
		}
		if time.Since(last) >= time.Second {
			last = time.Now()
			m.logf("migrate: QEMU %s: %s of %s RAM sent, %s remaining", st.Status,
				human(uint64(st.RAM.Transferred)), human(uint64(st.RAM.Total)), human(uint64(st.RAM.Remaining)))
		}
		t0 := time.Now()
		n, err := m.round(ctx, m.last())
		if err != nil {
			return fmt.Errorf("round %d: %w", res.Rounds+1, err)
		}
		res.Rounds++
		if n > 64<<10 {
			m.logf("migrate: round %d (QEMU migrating): %s changed, sent in %v", res.Rounds, human(n), since(t0))
		}
		if d := time.Since(t0); d < 100*time.Millisecond {
			// Nothing much changes in less: do not spin snapshots.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100*time.Millisecond - d):
			}
		}
	}
}

// last is the newest migration snapshot's name suffix.
func (m *migration) last() string { return fmt.Sprintf("migrate-%d", m.seq-1) }

func snapName(volume, suffix string) string { return volume + "@" + suffix }

// round snapshots the volumes on the source at one instant and streams
// each to the destination (everything, or the changes since base), then
// drops the base snapshots on both sides. It returns the stream bytes.
func (m *migration) round(ctx context.Context, base string) (uint64, error) {
	suffix := fmt.Sprintf("migrate-%d", m.seq)
	m.seq++
	cctx, cancel := m.step(ctx)
	defer cancel()
	var group struct {
		Snapshots []map[string]any `json:"snapshots"`
	}
	for _, v := range m.o.Volumes {
		group.Snapshots = append(group.Snapshots, map[string]any{"volume": v, "name": snapName(v, suffix)})
	}
	if err := m.src.Execute(cctx, "snapshot-create-group", group, nil); err != nil {
		return 0, fmt.Errorf("source snapshot: %w", err)
	}
	for _, v := range m.o.Volumes {
		m.srcSnaps = append(m.srcSnaps, snapName(v, suffix))
	}
	var total uint64
	for _, v := range m.o.Volumes {
		from := ""
		if base != "" {
			from = snapName(v, base)
		}
		n, err := m.transfer(ctx, v, snapName(v, suffix), from)
		if err != nil {
			return total, fmt.Errorf("%s: %w", v, err)
		}
		m.dstSnaps = append(m.dstSnaps, snapName(v, suffix))
		total += n
	}
	if base != "" {
		for _, v := range m.o.Volumes {
			m.deleteSnapshot(m.src, &m.srcSnaps, snapName(v, base))
			m.deleteSnapshot(m.dst, &m.dstSnaps, snapName(v, base))
		}
	}
	return total, nil
}

// transfer has the source serve send snap (from base) and the destination
// serve receive it into volume, through this process.
func (m *migration) transfer(ctx context.Context, volume, snap, base string) (uint64, error) {
	sendLn, sendAddr, err := m.listen()
	if err != nil {
		return 0, err
	}
	defer sendLn.Close()
	recvLn, recvAddr, err := m.listen()
	if err != nil {
		return 0, err
	}
	defer recvLn.Close()
	// No deadline on the commands: a stream takes as long as its bytes;
	// a failure on either side closes its connection and ends the other.
	sendDone := make(chan error, 1)
	go func() {
		sendDone <- m.src.Execute(ctx, "stream-send", map[string]any{"snapshot": snap, "from": base, "socket": sendAddr}, nil)
	}()
	recvDone := make(chan error, 1)
	go func() {
		recvDone <- m.dst.Execute(ctx, "stream-receive", map[string]any{"volume": volume, "socket": recvAddr}, nil)
	}()
	actx, cancel := m.step(ctx)
	defer cancel()
	in, err := stream.Accept(actx, sendLn, sendDone)
	if err != nil {
		recvLn.Close()
		<-recvDone
		return 0, fmt.Errorf("source stream-send: %w", err)
	}
	out, err := stream.Accept(actx, recvLn, recvDone)
	if err != nil {
		in.Close()
		<-sendDone
		return 0, fmt.Errorf("destination stream-receive: %w", err)
	}
	n, cerr := io.CopyBuffer(out, in, make([]byte, 1<<20))
	in.Close()
	if cw, ok := out.(interface{ CloseWrite() error }); ok && cerr == nil {
		cw.CloseWrite() // the receiver sees the end; its reply says whether the stream was whole
	} else {
		out.Close()
	}
	serr, rerr := <-sendDone, <-recvDone
	out.Close()
	switch {
	case serr != nil && rerr != nil:
		// Either may be the cause and the other its broken connection.
		return 0, fmt.Errorf("destination stream-receive: %w; source stream-send: %w", rerr, serr)
	case serr != nil:
		return 0, fmt.Errorf("source stream-send: %w", serr)
	case rerr != nil:
		return 0, fmt.Errorf("destination stream-receive: %w", rerr)
	case cerr != nil:
		return 0, cerr
	}
	return uint64(n), nil
}

// listen opens a listener a serve connects to and the address to tell it.
func (m *migration) listen() (net.Listener, string, error) {
	if m.o.StreamHost != "" {
		ln, err := net.Listen("tcp", net.JoinHostPort(m.o.StreamHost, "0"))
		if err != nil {
			return nil, "", err
		}
		return ln, "tcp:" + ln.Addr().String(), nil
	}
	dir, err := os.MkdirTemp("", "thinblk-migrate-")
	if err != nil {
		return nil, "", err
	}
	path := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		os.RemoveAll(dir)
		return nil, "", err
	}
	return dirListener{ln, dir}, path, nil
}

type dirListener struct {
	net.Listener
	dir string
}

func (l dirListener) Close() error {
	err := l.Listener.Close()
	os.RemoveAll(l.dir)
	return err
}

type migrateStatus struct {
	Status    string `json:"status"`
	Downtime  int64  `json:"downtime"`
	ErrorDesc string `json:"error-desc"`
	RAM       struct {
		Transferred int64 `json:"transferred"`
		Total       int64 `json:"total"`
		Remaining   int64 `json:"remaining"`
	} `json:"ram"`
}

// waitMigration polls the source's migration until it reaches want; a
// failed or cancelled migration is an error.
func (m *migration) waitMigration(ctx context.Context, want string) (migrateStatus, error) {
	last := time.Now()
	for {
		var st migrateStatus
		if err := m.srcQEMU.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return st, fmt.Errorf("source QEMU: %w", err)
		}
		switch st.Status {
		case want:
			return st, nil
		case "failed", "cancelled", "cancelling":
			return st, fmt.Errorf("QEMU's migration %s: %s", st.Status, st.ErrorDesc)
		}
		if time.Since(last) >= time.Second {
			last = time.Now()
			m.logf("migrate: QEMU %s: %s of %s RAM sent, %s remaining", st.Status,
				human(uint64(st.RAM.Transferred)), human(uint64(st.RAM.Total)), human(uint64(st.RAM.Remaining)))
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("QEMU's migration is %s: %w", st.Status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func qemuStatus(ctx context.Context, c *qmp.Client) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	return st.Status, nil
}

func waitRunning(ctx context.Context, c *qmp.Client) error {
	for {
		st, err := qemuStatus(ctx, c)
		if err != nil {
			return err
		}
		if st == "running" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("still %s: %w", st, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// undo puts things back after a failure: QEMU's migration cancelled and
// the source VM running, the destination QEMU gone, the received volumes
// and every migration snapshot deleted. It gets its own time: the
// failure may have been a timeout or a cancellation.
func (m *migration) undo() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	if m.qemuMig && m.srcQEMU != nil {
		if err := m.srcQEMU.Execute(ctx, "migrate_cancel", nil, nil); err != nil {
			errs = append(errs, fmt.Errorf("source QEMU migrate_cancel: %w", err))
		}
		// Cancelled from pre-switchover, QEMU restarts the VM itself;
		// wait for the migration to end either way.
		for ctx.Err() == nil {
			var st migrateStatus
			if err := m.srcQEMU.Execute(ctx, "query-migrate", nil, &st); err != nil || st.Status != "cancelling" {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if m.srcQEMU != nil {
		if st, err := qemuStatus(ctx, m.srcQEMU); err != nil {
			errs = append(errs, fmt.Errorf("source QEMU: %w", err))
		} else if st != "running" && st != "paused" && st != "prelaunch" {
			// postmigrate, finish-migrate: a migration left it stopped.
			if err := m.srcQEMU.Execute(ctx, "cont", nil, nil); err != nil {
				errs = append(errs, fmt.Errorf("source QEMU cont (it was %s): %w", st, err))
			}
		}
	}
	if m.dstStart {
		if m.dstQEMU == nil && m.o.Destination.QEMU != "" {
			dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
			m.dstQEMU, _ = qmp.Dial(dctx, m.o.Destination.QEMU)
			dcancel()
		}
		if m.dstQEMU != nil {
			// An -incoming QEMU whose migration failed may have quit already.
			m.dstQEMU.Execute(ctx, "quit", nil, nil)
		}
	}
	if m.received && m.dst != nil {
		for len(m.dstSnaps) > 0 {
			m.deleteSnapshot(m.dst, &m.dstSnaps, m.dstSnaps[0])
		}
		names, err := volumeNames(ctx, m.dst)
		if err != nil {
			errs = append(errs, fmt.Errorf("destination thinblk: %w", err))
		}
		for _, v := range m.o.Volumes {
			if names[v] {
				// force: the destination QEMU this migration started may not have gone yet.
				if err := m.dst.Execute(ctx, "volume-delete", map[string]any{"name": v, "force": true}, nil); err != nil {
					errs = append(errs, fmt.Errorf("destination thinblk: delete %s: %w", v, err))
				}
			}
		}
	}
	if m.src != nil {
		for len(m.srcSnaps) > 0 {
			m.deleteSnapshot(m.src, &m.srcSnaps, m.srcSnaps[0])
		}
	}
	return errors.Join(errs...)
}

// dropSnapshots deletes the migration's snapshots on both sides after a
// success (they pin blocks; the next migration starts with a full stream).
func (m *migration) dropSnapshots() {
	for len(m.srcSnaps) > 0 {
		m.deleteSnapshot(m.src, &m.srcSnaps, m.srcSnaps[0])
	}
	for len(m.dstSnaps) > 0 {
		m.deleteSnapshot(m.dst, &m.dstSnaps, m.dstSnaps[0])
	}
}

// deleteSnapshot deletes name and forgets it; a failure is logged, not
// fatal (a leftover snapshot is visible and harmless).
func (m *migration) deleteSnapshot(c *qmp.Client, list *[]string, name string) {
	for i, s := range *list {
		if s == name {
			*list = append((*list)[:i], (*list)[i+1:]...)
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.Execute(ctx, "snapshot-delete", map[string]any{"name": name}, nil); err != nil {
		m.logf("migrate: delete snapshot %s: %v", name, err)
	}
}

func (m *migration) close() {
	for _, c := range []*qmp.Client{m.src, m.dst, m.srcQEMU, m.dstQEMU} {
		if c != nil {
			c.Close()
		}
	}
}

func since(t time.Time) time.Duration { return time.Since(t).Round(time.Millisecond) }

func rate(n uint64, t0 time.Time) string {
	return human(uint64(float64(n) / max(time.Since(t0).Seconds(), 1e-9)))
}

func human(n uint64) string { return units.HumanBytes(n) }
