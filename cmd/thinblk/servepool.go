package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/thinblk/thinblk/internal/handover"
	"github.com/thinblk/thinblk/thin"
	"github.com/thinblk/thinblk/virtio/blk/blktrace"
)

// servePool exports every volume of the pool until ctx is cancelled, then
// closes the exports (in-flight requests finish), commits the pool's
// metadata and releases it. With --handover-from it first takes the
// sessions of the serve process listening there; and it hands its own to
// the next one that asks (see handover.go). A hand-over that fails after
// the pool was released serves on here from the state it would have
// handed over.
func servePool(ctx context.Context, f serveFlags, trace *blktrace.Log, logger *slog.Logger) error {
	var handed *handover.State
	var from *handover.Conn
	if f.handoverFrom != "" {
		var err error
		if from, handed, err = receiveHandOver(ctx, f.handoverFrom, logger); err != nil {
			return err
		}
	}
	for {
		back, err := servePoolOnce(ctx, f, trace, logger, handed, from)
		if back == nil {
			return err
		}
		logger.Error("hand-over failed; serving on", "err", err)
		handed, from = back, nil
	}
}

// servePoolOnce serves until ctx is done (nil, error of the shutdown), a
// hand-over succeeded (nil, nil) or failed once the pool was released
// (the state to resume, the reason). from, if not nil, is the previous
// process, told whether its state was taken.
func servePoolOnce(ctx context.Context, f serveFlags, trace *blktrace.Log, logger *slog.Logger, handed *handover.State, from *handover.Conn) (*handover.State, error) {
	answer := func(err error) {
		if from != nil {
			if aerr := from.Answer(err); aerr != nil {
				logger.Warn("could not answer the previous serve process", "err", aerr)
			}
			from.Close()
			from = nil
		}
	}
	began := time.Now()
	pool, err := thin.Open(f.pool, thin.OpenOptions{Logger: logger})
	opened := time.Since(began)
	if err != nil {
		answer(err)
		handed.Close()
		return nil, err
	}
	if trace != nil {
		pool.SetTrace(func(vol, text string) {
			if vol == "" {
				vol = "pool"
			}
			trace.Note(vol, text)
		})
	}
	if st := pool.Status().Pool; st.HostUnbackedBytes > 0 {
		logger.Warn("the pool exceeds what its host file system can back: writes to unprovisioned space follow the no-space policy when it fills (provisioned and reserved space stays backed)",
			"pool", f.pool, "host_free_bytes", st.HostFreeBytes, "unbacked_bytes", st.HostUnbackedBytes)
	}
	sockDir := f.socketDir
	if sockDir == "" {
		sockDir = f.pool
	}
	if err := os.MkdirAll(sockDir, 0o755); err != nil {
		pool.Close()
		answer(err)
		handed.Close()
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	mode, _ := parseMode(f.socketMode)
	qmpPath := filepath.Join(f.pool, defaultControlSoc)
	if f.qmp != "" {
		qmpPath, _ = parseQMPAddr(f.qmp)
	}
	own := map[string]string{qmpPath: "control socket (--qmp)"}
	if network, addr, _ := parseMetricsAddr(f.metrics); f.metrics != "" && network == "unix" {
		own[addr] = "metrics socket (--metrics)"
	}
	ex, err := startExports(ctx, pool, exportOptions{
		socketDir: sockDir, socketMode: mode, queues: f.queues, queueSize: f.queueSize,
		noUring: f.noUring, poll: f.poll(), trace: trace, noInflight: f.noInflight, ownSockets: own,
	}, handed, logger)
	if err != nil {
		pool.Close()
		answer(err)
		return nil, err
	}
	fail := func(err error) (*handover.State, error) {
		if from != nil {
			ex.giveBack()
		}
		ex.close()
		pool.Close()
		answer(err)
		return nil, err
	}
	_, stopControl, err := startControl(ctx, pool, ex, qmpPath, mode, f)
	if err != nil {
		return fail(err)
	}
	stopMetrics := func() {}
	if f.metrics != "" {
		if stopMetrics, err = startMetrics(f.metrics, mode, ex.stats, logger); err != nil {
			stopControl()
			return fail(err)
		}
	}
	requests, stopHandOver, err := listenHandOver(filepath.Join(f.pool, handoverSocketName), logger)
	if err != nil {
		// Serving matters more than a later upgrade without a reconnect.
		logger.Warn("no hand-over to a new serve process: restarts reconnect", "err", err)
		stopHandOver = func() {}
	}
	// The sessions run here now: the previous process may go.
	if handed != nil {
		logger.Info("took over the sessions", "pool_open_ms", opened.Milliseconds(), "rings_started_ms", time.Since(began).Milliseconds())
	}
	answer(nil)
	// Every volume's socket and the control socket listen now.
	f.ready(fmt.Sprintf("serving %d volumes of %s", len(pool.Volumes()), f.pool))
	logger.Info("serving pool", "pool", f.pool, "socket_dir", sockDir, "qmp", qmpPath, "volumes", len(pool.Volumes()))
	for {
		select {
		case <-ctx.Done():
			f.stopping()
			logger.Info("shutting down")
			stopHandOver()
			stopMetrics()
			stopControl()
			exErr := ex.close()
			flushErr := pool.Flush()
			closeErr := pool.Close()
			return nil, errors.Join(exErr, flushErr, closeErr)
		case to := <-requests:
			back, err := handOver(ctx, to, pool, ex, logger, func() {
				stopHandOver()
				stopMetrics()
				stopControl()
			})
			if back == nil && err != nil {
				// Nothing was let go of: serve on.
				logger.Warn("hand-over refused; serving on", "err", err)
				continue
			}
			return back, err
		}
	}
}
