// Package servetest serves a virtio-blk device over vhost-user inside a
// test's own process, for tests that drive it through the Go front-end
// (vhostuser/frontend) without building and starting `thinblk serve`.
// Only tests import it.
package servetest

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/vhostuser"
	"github.com/thinblk/thinblk/virtio/blk"
)

// Serve serves storage as a virtio-blk device made with opts (its logs
// discarded when opts has no Logger) on a new socket, and returns the
// socket's path and the device. When t ends the server stops and the
// device closes; storage stays the caller's to close.
func Serve(t testing.TB, storage blockdev.Storage, opts blk.Options) (string, *blk.Device) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	dev, err := blk.New(storage, opts)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "blk.sock")
	srv, err := vhostuser.Listen(vhostuser.ServerOptions{SocketPath: sock, Logger: opts.Logger, Name: "test"}, dev)
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		srv.Close()
		dev.Close()
	})
	return sock, dev
}
