package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/nulldisk"
	"github.com/thinblk/thinblk/internal/sdnotify"
	"github.com/thinblk/thinblk/internal/units"
	"github.com/thinblk/thinblk/rawdisk"
	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio/blk"
	"github.com/thinblk/thinblk/virtio/blk/blktrace"
)

const serveSynopsis = `serve DIR [--socket-dir DIR] [--queues N] [flags]     (every volume of a pool)
       thinblk serve --raw FILE --socket PATH [--read-only] [--queues N] [flags]
       thinblk serve --null SIZE --socket PATH [--queues N]     (no I/O: the path's ceiling)`

// defaultQueues is what a serve offers without --queues: every ring a
// vhost-user front-end can address (ring indices are 8 bits). QEMU's
// vhost-user-blk-pci without num-queues asks for one queue per vCPU
// (virtio_pci_optimal_num_queues: the vCPU count, capped at 1024) and
// refuses to start if the back-end offers fewer, so any smaller default
// breaks some VM. A ring the front-end never sets up costs a few hundred
// bytes and no goroutine (TestUnusedRingsCost in vhostuser/frontend).
const defaultQueues = vhostuser.MaxRings

type serveFlags struct {
	pool       string
	socketDir  string
	qmp        string
	qemuQMP    []string // --qemu-qmp: monitors of VMs the pause policy stops and resumes
	raw        string
	null       string // --null SIZE: a disk that does no I/O (nulldisk)
	socket     string
	socketMode string
	readOnly   bool
	direct     bool
	noUring    bool
	noInflight bool
	// handoverFrom: take the sessions of the serve process listening on
	// this hand-over socket (handover.go).
	handoverFrom string
	pollUs       int
	queues       int
	queueSize    int
	serial       string
	logLevel     string
	metrics      string // --metrics: Prometheus exporter address (metrics.go)
	// ready and stopping tell a service manager (sd_notify) that every socket listens, and
	// that shutdown began; no-ops unless $NOTIFY_SOCKET is set.
	ready    func(status string)
	stopping func()
	trace    string
}

func runServe(args []string, stdout, stderr io.Writer) int {
	f, code, ok := parseServeFlags(args, stderr)
	if !ok {
		return code
	}
	logger, err := newLogger(stderr, f.logLevel)
	if err != nil {
		fmt.Fprintln(stderr, "thinblk serve:", err)
		return 2
	}
	if err := setCrashPoint(os.Getenv(crashEnv), logger); err != nil {
		fmt.Fprintln(stderr, "thinblk serve:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	f.ready, f.stopping = serviceNotifier(logger)
	serve := serveRaw
	if f.pool != "" {
		serve = servePool
	}
	var trace *blktrace.Log
	if f.trace != "" {
		if trace, err = blktrace.Create(f.trace); err != nil {
			return fail(stderr, "serve", err)
		}
		logger.Warn("tracing every request: slow, for debugging", "file", f.trace)
	}
	err = serve(ctx, f, trace, logger)
	if trace != nil {
		err = errors.Join(err, trace.Close())
	}
	if err != nil {
		return fail(stderr, "serve", err)
	}
	return 0
}

// parseServeFlags parses and checks serve's arguments. When ok is false,
// usage or the error has been printed and code is the exit status.
func parseServeFlags(args []string, stderr io.Writer) (f serveFlags, code int, ok bool) {
	fs := newFlagSet("serve", serveSynopsis, stderr)
	fs.StringVar(&f.raw, "raw", "", "serve this raw image `FILE` (or block device)")
	fs.StringVar(&f.null, "null", "", "serve a disk of `SIZE` (K, M, G, T suffixes) that does no I/O: reads leave the buffers as they are, writes are dropped; shows what the vhost-user path carries on this machine")
	fs.StringVar(&f.socket, "socket", "", "with --raw or --null: unix socket `PATH` QEMU connects to")
	fs.StringVar(&f.socketDir, "socket-dir", "", "with a pool: directory of the per-volume sockets NAME.sock (default: the pool directory)")
	fs.StringVar(&f.qmp, "qmp", "", "with a pool: QMP control socket `unix:PATH` (default: unix:DIR/qmp.sock)")
	fs.Func("qemu-qmp", "with a pool whose no-space policy is pause: QEMU monitor `unix:PATH` of a VM to stop while the pool is out of space and resume after (repeat for each VM on the pool)", func(s string) error {
		path, err := parseSocketFlag("--qemu-qmp", s)
		if err == nil {
			f.qemuQMP = append(f.qemuQMP, path)
		}
		return err
	})
	fs.StringVar(&f.socketMode, "socket-mode", "0600", "permissions of the socket file (octal)")
	fs.BoolVar(&f.readOnly, "read-only", false, "export the disk read-only (VIRTIO_BLK_F_RO)")
	fs.BoolVar(&f.direct, "direct", false, "open the image with O_DIRECT (bypass the host page cache)")
	fs.BoolVar(&f.noUring, "no-uring", false, "use synchronous pread/pwrite from a worker per request instead of io_uring (io_uring is used when the kernel allows it)")
	fs.BoolVar(&f.noInflight, "no-inflight", false, "do not offer in-flight tracking (INFLIGHT_SHMFD): requests in flight when serve dies are then lost to the guest (for comparison)")
	fs.StringVar(&f.handoverFrom, "handover-from", "", "with a pool: take over the running serve's VM connections through its hand-over socket `PATH` (DIR/thinblk.handover): an upgrade without a disconnect (see README, \"Restarts and upgrades\")")
	fs.IntVar(&f.pollUs, "poll-us", 0, "after a queue's last request, keep looking at its ring for this many `MICROSECONDS` before sleeping: saves the guest's kick and the back-end's wake-up when requests follow closely, at the cost of a CPU spinning meanwhile (0: never poll)")
	fs.IntVar(&f.queues, "queues", defaultQueues, fmt.Sprintf("number of virtqueues offered (1-%d); the front-end uses as many as it asks for (QEMU: num-queues, one per vCPU by default)", vhostuser.MaxRings))
	fs.IntVar(&f.queueSize, "queue-size", 256, "largest virtqueue size accepted (power of two, 2-1024)")
	fs.StringVar(&f.serial, "serial", "", "disk serial number reported to the guest (up to 20 bytes; default: the file's base name)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&f.metrics, "metrics", "", "serve Prometheus metrics at http://`ADDR`/metrics: HOST:PORT (TCP) or unix:PATH")
	fs.StringVar(&f.trace, "trace", "", "debug: log every request (range, sector CRCs; for a pool, the blocks it resolved to) to `FILE`; `thinblk trace-check FILE` checks it")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return f, exitFor(err), false
	}
	switch {
	case len(pos) == 1 && f.raw == "" && f.null == "":
		f.pool = pos[0]
	case len(pos) > 0:
		fmt.Fprintf(stderr, "thinblk serve: unexpected argument %q\n", pos[len(pos)-1])
		fs.Usage()
		return f, 2, false
	}
	if err := f.validate(); err != nil {
		fmt.Fprintln(stderr, "thinblk serve:", err)
		return f, 2, false
	}
	return f, 0, true
}

func (f *serveFlags) validate() error {
	if f.null != "" {
		if f.raw != "" || f.pool != "" {
			return errors.New("--null serves no file: give it alone, without --raw or a pool")
		}
		if _, err := f.nullSize(); err != nil {
			return err
		}
		// From here on a null disk is validated like a raw image.
		defer func(raw string) { f.raw = raw }(f.raw)
		f.raw = f.null
	}
	switch {
	case f.pool == "" && f.raw == "":
		return errors.New("give a pool directory, or --raw FILE")
	case f.pool != "" && f.socket != "":
		return errors.New("--socket is for --raw; a pool's sockets go in --socket-dir")
	case f.raw != "" && f.socket == "":
		return errors.New("--socket PATH is required with --raw")
	case f.raw != "" && f.qmp != "":
		return errors.New("--qmp is for a pool")
	case f.raw != "" && len(f.qemuQMP) > 0:
		return errors.New("--qemu-qmp goes with a pool, not --raw")
	case f.raw != "" && f.handoverFrom != "":
		return errors.New("--handover-from is for a pool")
	case f.raw != "" && f.socketDir != "":
		return errors.New("--socket-dir is for a pool; use --socket with --raw")
	case f.pool != "" && (f.readOnly || f.serial != ""):
		return errors.New("--read-only and --serial are for --raw (a pool's volumes are read-write, their serial is the volume name)")
	}
	if f.pollUs < 0 || f.pollUs > 1_000_000 {
		return fmt.Errorf("--poll-us %d: must be 0 to 1000000", f.pollUs)
	}
	if f.queues < 1 || f.queues > vhostuser.MaxRings {
		return fmt.Errorf("--queues %d: must be 1 to %d", f.queues, vhostuser.MaxRings)
	}
	if f.queueSize < 2 || f.queueSize > 1024 || f.queueSize&(f.queueSize-1) != 0 {
		return fmt.Errorf("--queue-size %d: must be a power of two from 2 to 1024", f.queueSize)
	}
	if len(f.serial) > blk.IDBytes {
		return fmt.Errorf("--serial %q: longer than %d bytes", f.serial, blk.IDBytes)
	}
	if f.qmp != "" {
		if _, err := parseQMPAddr(f.qmp); err != nil {
			return err
		}
	}
	if f.metrics != "" {
		if _, _, err := parseMetricsAddr(f.metrics); err != nil {
			return err
		}
	}
	if _, err := parseMode(f.socketMode); err != nil {
		return err
	}
	if _, err := newLogger(io.Discard, f.logLevel); err != nil {
		return err
	}
	return nil
}

// poll is --poll-us as a duration.
func (f *serveFlags) poll() time.Duration { return time.Duration(f.pollUs) * time.Microsecond }

// nullSize is --null's size.
func (f *serveFlags) nullSize() (uint64, error) {
	n, err := units.ParseSize(f.null)
	if err != nil || n == 0 || n%blk.SectorSize != 0 {
		return 0, fmt.Errorf("--null %q: want a positive size, a multiple of 512 bytes (K, M, G, T suffixes)", f.null)
	}
	return n, nil
}

func parseMode(s string) (os.FileMode, error) {
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("--socket-mode %q: want octal permissions such as 0600", s)
	}
	return os.FileMode(m), nil
}

func newLogger(w io.Writer, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// serveRaw exports one raw image until ctx is cancelled, then stops taking
// requests, lets those in flight finish, flushes and removes the socket.
func serveRaw(ctx context.Context, f serveFlags, trace *blktrace.Log, logger *slog.Logger) error {
	var storage blockdev.Storage
	var serial, image, uring string
	if f.null != "" {
		size, _ := f.nullSize() // validated
		disk, err := nulldisk.New(size)
		if err != nil {
			return err
		}
		storage, serial, image, uring = disk, "null", "null", "none"
	} else {
		disk, err := rawdisk.Open(f.raw, rawdisk.Options{ReadOnly: f.readOnly, Direct: f.direct, NoUring: f.noUring})
		if err != nil {
			return err
		}
		defer disk.Close()
		serial, image = baseSerial(f.raw), f.raw
		storage = disk
		u, uringErr := disk.Uring()
		if uringErr != nil && !f.noUring {
			logger.Warn("io_uring unavailable; using synchronous I/O", "err", uringErr)
		}
		uring = fmt.Sprint(u)
	}
	if f.serial != "" {
		serial = f.serial
	}
	if trace != nil {
		storage = trace.Wrap(serial, storage)
	}
	dev, err := blk.New(storage, blk.Options{
		ReadOnly:  f.readOnly,
		NumQueues: f.queues,
		QueueSize: f.queueSize,
		Serial:    serial,
		Logger:    logger,
		Poll:      f.poll(),
	})
	if err != nil {
		return err
	}
	mode, _ := parseMode(f.socketMode)
	srv, err := vhostuser.Listen(vhostuser.ServerOptions{
		SocketPath: f.socket,
		SocketMode: mode,
		Logger:     logger,
		Name:       serial,
		NoInflight: f.noInflight,
	}, dev)
	if err != nil {
		return err
	}
	if f.metrics != "" {
		stopMetrics, err := startMetrics(f.metrics, mode, func() serveStats {
			return serveStats{Volumes: []volumeStats{{Name: serial, IO: dev.Stats(),
				Connected: srv.Connected(), Connections: srv.Connections()}}}
		}, logger)
		if err != nil {
			srv.Close()
			return err
		}
		defer stopMetrics()
	}
	f.ready("serving " + image + " on " + f.socket)
	logger.Info("serving", "image", image, "io_uring", uring, "socket", f.socket, "bytes", storage.Size(),
		"read_only", f.readOnly, "queues", f.queues)
	serveErr := srv.Serve(ctx)
	// Serve returns when ctx is cancelled (signal) or on a fatal error.
	// Either way: stop the rings (in-flight requests finish), flush.
	f.stopping()
	closeErr := srv.Close()
	drainErr := dev.Close() // waits for in-flight requests, then flushes
	logger.Info("stopped", "socket", f.socket)
	if serveErr != nil && !errors.Is(serveErr, context.Canceled) {
		return serveErr
	}
	return errors.Join(closeErr, drainErr)
}

// serviceNotifier returns serve's readiness and shutdown notices to a service manager
// ($NOTIFY_SOCKET, systemd's Type=notify). A notice that cannot be sent is logged, not fatal:
// the exports work either way, and the manager's start timeout reports it.
func serviceNotifier(logger *slog.Logger) (ready func(status string), stopping func()) {
	n, err := sdnotify.FromEnv()
	if err != nil {
		logger.Warn("no readiness notification", "err", err)
	}
	send := func(lines ...string) {
		if err := n.Notify(lines...); err != nil {
			logger.Warn("service manager notification failed", "err", err)
		}
	}
	return func(status string) { send(sdnotify.Ready, sdnotify.Status(status)) },
		func() { send(sdnotify.Stopping) }
}

// baseSerial derives a serial number from the image's file name.
func baseSerial(path string) string {
	base := path
	for i := len(path) - 1; i >= 0; i-- {
		if path[i] == '/' {
			base = path[i+1:]
			break
		}
	}
	if len(base) > blk.IDBytes {
		base = base[:blk.IDBytes]
	}
	return base
}
