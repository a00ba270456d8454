package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/thinblk/thinblk/thin"
	"github.com/thinblk/thinblk/virtio/blk/blktrace"
)

// servePool exports every volume of the pool until ctx is cancelled, then
// closes the exports (in-flight requests finish), commits the pool's
// metadata and releases it.
func servePool(ctx context.Context, f serveFlags, trace *blktrace.Log, logger *slog.Logger) error {
	pool, err := thin.Open(f.pool, thin.OpenOptions{Logger: logger})
	if err != nil {
		return err
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
		return fmt.Errorf("socket directory: %w", err)
	}
	mode, _ := parseMode(f.socketMode)
	ex, err := startExports(ctx, pool, exportOptions{
		socketDir: sockDir, socketMode: mode, queues: f.queues, queueSize: f.queueSize,
		noUring: f.noUring, poll: f.poll(), trace: trace, noInflight: f.noInflight,
	}, logger)
	if err != nil {
		pool.Close()
		return err
	}
	qmpPath := filepath.Join(f.pool, defaultControlSoc)
	if f.qmp != "" {
		qmpPath, _ = parseQMPAddr(f.qmp)
	}
	_, stopControl, err := startControl(ctx, pool, ex, qmpPath, mode, f)
	if err != nil {
		ex.close()
		pool.Close()
		return err
	}
	if f.metrics != "" {
		stopMetrics, err := startMetrics(f.metrics, mode, ex.stats, logger)
		if err != nil {
			stopControl()
			ex.close()
			pool.Close()
			return err
		}
		defer stopMetrics()
	}
	// Every volume's socket and the control socket listen now.
	f.ready(fmt.Sprintf("serving %d volumes of %s", len(pool.Volumes()), f.pool))
	logger.Info("serving pool", "pool", f.pool, "socket_dir", sockDir, "qmp", qmpPath, "volumes", len(pool.Volumes()))
	<-ctx.Done()
	f.stopping()
	logger.Info("shutting down")
	stopControl()
	exErr := ex.close()
	flushErr := pool.Flush()
	closeErr := pool.Close()
	return errors.Join(exErr, flushErr, closeErr)
}
