package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

// cidAny is VMADDR_CID_ANY, what the kernel reports when no vsock transport is loaded.
const cidAny = 0xffffffff

func localContextID() (uint32, error) { return vsock.ContextID() }

// vsockUsable says whether this guest has a vsock transport to a host: its own context ID must
// be a guest one (3 or more). /dev/vsock alone proves nothing, the core module creates it.
func vsockUsable(contextID func() (uint32, error)) (uint32, bool) {
	cid, err := contextID()
	if err != nil || cid < 3 || cid == cidAny {
		return cid, false
	}
	return cid, true
}

func listenVsock(port uint32) (net.Listener, error) {
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return nil, fmt.Errorf("vsock listen port %d: %w", port, err)
	}
	return l, nil
}

// serveListener serves each connection of l in turn until ctx ends. One host client at a time
// is what the harness uses; a second waits.
func serveListener(ctx context.Context, l net.Listener, h agentproto.Handler, log *slog.Logger, done func(error)) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Error("accept", "err", err)
			}
			return
		}
		err = agentproto.Serve(ctx, conn, h)
		conn.Close()
		if err != nil && !errors.Is(err, agentproto.ErrPowerOff) {
			log.Warn("connection ended", "err", err)
		}
		done(err)
	}
}

// findSerialPort finds the device of the virtio-serial port with the given name by reading
// sysfs (no udev in the guest to make /dev/virtio-ports links).
func findSerialPort(sysDir, devDir, name string) (string, error) {
	entries, err := os.ReadDir(sysDir)
	if err != nil {
		return "", fmt.Errorf("list virtio ports: %w", err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sysDir, e.Name(), "name"))
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return filepath.Join(devDir, e.Name()), nil
		}
	}
	return "", fmt.Errorf("no virtio port named %q in %s", name, sysDir)
}

// serveSerial serves the port until ctx ends. Reads return EOF while no host is connected to
// the port's chardev, so the port is reopened after a short pause.
func serveSerial(ctx context.Context, path string, h agentproto.Handler, log *slog.Logger, done func(error)) {
	for ctx.Err() == nil {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			log.Error("open serial port", "path", path, "err", err)
			sleepCtx(ctx, time.Second)
			continue
		}
		err = agentproto.Serve(ctx, f, h)
		f.Close()
		if err != nil && !errors.Is(err, agentproto.ErrPowerOff) {
			log.Warn("serial session ended", "err", err)
		}
		done(err)
		sleepCtx(ctx, 100*time.Millisecond)
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
