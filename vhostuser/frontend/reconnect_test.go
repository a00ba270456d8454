package frontend

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser"
)

// The driver reconnects as QEMU does after its back-end went away (same
// guest memory and rings, each resuming at its used index; the in-flight
// area handed back when the back-end offers INFLIGHT_SHMFD). Against
// qemu-storage-daemon, which does not offer it, reconnection works the
// same without the area.
func TestReconnect(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			sock := b.start(t, img, serveOpts{queues: 2})
			d := dial(t, sock, Options{NumQueues: 2})
			inflight := d.ProtocolFeatures()&(1<<vhostuser.ProtoInflightShmfd) != 0
			if want := b.name != "qsd"; inflight != want {
				t.Fatalf("INFLIGHT_SHMFD negotiated %v, want %v", inflight, want)
			}
			if area := d.Inflight(); inflight != (area.MmapSize > 0) || (inflight && (area.NumQueues != 2 || area.QueueSize != 128)) {
				t.Fatalf("in-flight area %+v", area)
			}
			want := bytes.Repeat([]byte("reconnect"), 456)[:4096]
			mustWrite(t, d, want, 1<<20)
			before := d.Inflight()
			for range 3 {
				deadline := time.Now().Add(10 * time.Second)
				for {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					err := d.Reconnect(ctx, sock)
					cancel()
					if err == nil {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("reconnect: %v", err)
					}
					time.Sleep(20 * time.Millisecond)
				}
				if d.Inflight() != before {
					t.Fatalf("in-flight area changed across reconnection: %+v, was %+v", d.Inflight(), before)
				}
				for _, q := range d.Queues() {
					r, err := q.NewReq(1)
					if err != nil {
						t.Fatal(err)
					}
					buf, _ := d.Memory().Alloc(4096, 512)
					r.Type, r.Sector, r.Data = 0, 1<<20/512, []Buffer{buf}
					if err := q.Do(r); err != nil || r.Status != 0 || !bytes.Equal(buf.Bytes, want) {
						t.Fatalf("queue %d after reconnecting: %v status %d", q.Index(), err, r.Status)
					}
					d.Memory().Free(buf)
					r.Free()
				}
			}
		})
	}
}
