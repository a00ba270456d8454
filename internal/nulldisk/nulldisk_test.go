package nulldisk

import (
	"context"
	"testing"
	"time"

	"github.com/thinblk/thinblk/internal/servetest"
	"github.com/thinblk/thinblk/vhostuser/frontend"
	"github.com/thinblk/thinblk/virtio/blk"
)

func TestNewRejectsBadSizes(t *testing.T) {
	for _, size := range []uint64{0, 511, 4097} {
		if _, err := New(size); err == nil {
			t.Errorf("New(%d): no error", size)
		}
	}
}

// TestServedThroughVirtio serves a null disk as `thinblk serve --null`
// does and sends it reads, writes and flushes through the Go front-end:
// every one completes OK, and the device still refuses what lies beyond
// the capacity.
func TestServedThroughVirtio(t *testing.T) {
	disk, err := New(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	sock, _ := servetest.Serve(t, disk, blk.Options{NumQueues: 1})
	d, err := frontend.Dial(context.Background(), sock, frontend.Options{NumQueues: 1, QueueSize: 64, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Capacity() != 1<<20 {
		t.Fatalf("capacity %d, want %d", d.Capacity(), 1<<20)
	}
	q := d.Queue(0)
	var reqs []*frontend.Req
	for i, typ := range []uint32{blk.TypeIn, blk.TypeOut, blk.TypeFlush, blk.TypeIn} {
		nbufs := 1
		if typ == blk.TypeFlush {
			nbufs = 0
		}
		r, err := q.NewReq(nbufs)
		if err != nil {
			t.Fatal(err)
		}
		r.Type, r.Sector = typ, uint64(i*8)
		if nbufs > 0 {
			buf, err := d.Memory().Alloc(4096, 4096)
			if err != nil {
				t.Fatal(err)
			}
			r.Data = []frontend.Buffer{buf}
		}
		reqs = append(reqs, r)
	}
	reqs[3].Sector = 1<<20/blk.SectorSize - 4 // 4 KiB from 2 KiB before the end
	if err := q.Submit(reqs...); err != nil {
		t.Fatal(err)
	}
	var done []*frontend.Req
	for len(done) < len(reqs) {
		if done, err = q.Wait(done, 5*time.Second); err != nil {
			t.Fatalf("%d of %d completed: %v", len(done), len(reqs), err)
		}
	}
	for i, r := range reqs[:3] {
		if r.Status != blk.StatusOK {
			t.Errorf("request %d (type %d): status %d", i, r.Type, r.Status)
		}
	}
	if reqs[3].Status != blk.StatusIOErr {
		t.Errorf("read past the end: status %d, want IOERR", reqs[3].Status)
	}
}
