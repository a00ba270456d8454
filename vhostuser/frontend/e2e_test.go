package frontend

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/thinblk/thinblk/virtio/blk"
)

const imgSize = 64 << 20

// forEachBackend runs f as a subtest against every back-end.
func forEachBackend(t *testing.T, queues int, opts Options, f func(t *testing.T, d *Disk)) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			sock := b.start(t, img, queues)
			d := dial(t, sock, opts)
			f(t, d)
		})
	}
}

func TestRoundTrip(t *testing.T) {
	forEachBackend(t, 1, Options{}, func(t *testing.T, d *Disk) {
		if got := d.Capacity(); got != imgSize {
			t.Fatalf("capacity %d, want %d", got, imgSize)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		for _, n := range []int{512, 4096, 65536, 3 << 20} {
			off := int64(rng.IntN(imgSize/512-n/512)) * 512
			want := make([]byte, n)
			for i := range want {
				want[i] = byte(rng.Uint32())
			}
			if _, err := d.WriteAt(want, off); err != nil {
				t.Fatalf("write %d at %d: %v", n, off, err)
			}
			got := make([]byte, n)
			if _, err := d.ReadAt(got, off); err != nil {
				t.Fatalf("read %d at %d: %v", n, off, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("read back %d bytes at %d: data differs", n, off)
			}
		}
		if err := d.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
		_ = blk.TypeIn
	})
}
