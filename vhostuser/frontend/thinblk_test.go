package frontend

import (
	"io"
	"log/slog"
	"os"
	"sync/atomic"
	"testing"

	"github.com/thinblk/thinblk/internal/blockdev"
	"github.com/thinblk/thinblk/internal/servetest"
	"github.com/thinblk/thinblk/rawdisk"
	"github.com/thinblk/thinblk/virtio/blk"
)

func init() {
	thinblkBackends = append(thinblkBackends, backend{name: "thinblk", start: startThinblk})
}

// startThinblk serves img in-process: rawdisk storage, blk device,
// vhost-user server, as `thinblk serve --raw` does.
func startThinblk(t testing.TB, img string, o serveOpts) string {
	disk, err := rawdisk.Open(img, rawdisk.Options{ReadOnly: o.readOnly})
	if err != nil {
		t.Fatalf("open %s: %v", img, err)
	}
	t.Cleanup(func() { disk.Close() })
	var logOut io.Writer = io.Discard
	if os.Getenv("THINBLK_TEST_LOG") == "1" {
		logOut = os.Stderr
	}
	logger := slog.New(slog.NewTextHandler(logOut, nil))
	var storage blockdev.Storage = disk
	var grow *growable
	if o.resize != nil {
		grow = &growable{Disk: disk}
		grow.size.Store(disk.Size())
		storage = grow
	}
	sock, dev := servetest.Serve(t, storage, blk.Options{NumQueues: o.queues, QueueSize: o.queueSize, ReadOnly: o.readOnly, Serial: "thinblk-test", Logger: logger})
	if o.resize != nil {
		*o.resize = func(newSize int64) error {
			if err := os.Truncate(img, newSize); err != nil {
				return err
			}
			grow.size.Store(uint64(newSize))
			return dev.NotifyResize()
		}
	}
	return sock
}

// growable is raw storage whose size the test changes, as a thin volume's
// would on `volume resize`.
type growable struct {
	*rawdisk.Disk
	size atomic.Uint64
}

func (g *growable) Size() uint64 { return g.size.Load() }
