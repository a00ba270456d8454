package virtio_test

import (
	"testing"

	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// popPushLoop publishes head again and again (the driver never reclaims
// it), and the device pops and pushes it.
func popPushLoop(tb testing.TB, d *virtiotest.Driver, q *virtio.Queue, head uint16, c *virtio.Chain, n int) {
	for range n {
		d.Publish(head)
		ok, err := q.Pop(c)
		if !ok || err != nil || c.Err != nil {
			tb.Fatalf("Pop = %v, %v, %v", ok, err, c.Err)
		}
		q.Push(c.Head, 1)
		q.NeedsNotify()
	}
}

func directSetup(tb testing.TB) (*virtiotest.Driver, *virtio.Queue, uint16) {
	d, q := newQueue(tb, 256, allFeat)
	head := d.WriteChain(d.AllocBuf(16, false, nil), d.AllocBuf(4096, true, nil), d.AllocBuf(1, true, nil))
	return d, q, head
}

func indirectSetup(tb testing.TB) (*virtiotest.Driver, *virtio.Queue, uint16) {
	d, q := newQueue(tb, 256, allFeat)
	bufs := []virtiotest.Buf{d.AllocBuf(16, false, nil)}
	for range 8 {
		bufs = append(bufs, d.AllocBuf(4096, true, nil))
	}
	bufs = append(bufs, d.AllocBuf(1, true, nil))
	table := d.IndirectTable(bufs...)
	head := d.WriteChain(virtiotest.Buf{})
	d.SetDesc(d.DescAddr, head, table, uint32(len(bufs))*virtio.DescSize, virtio.DescFlagIndirect, 0)
	return d, q, head
}

func TestPopPushDoesNotAllocate(t *testing.T) {
	for name, setup := range map[string]func(testing.TB) (*virtiotest.Driver, *virtio.Queue, uint16){
		"direct": directSetup, "indirect": indirectSetup,
	} {
		d, q, head := setup(t)
		var c virtio.Chain
		popPushLoop(t, d, q, head, &c, 1) // grows c's segment list once
		if n := testing.AllocsPerRun(1000, func() { popPushLoop(t, d, q, head, &c, 1) }); n != 0 {
			t.Errorf("%s: %.1f allocations per Pop+Push", name, n)
		}
	}
}

func BenchmarkPopPush(b *testing.B) {
	d, q, head := directSetup(b)
	var c virtio.Chain
	b.ReportAllocs()
	b.ResetTimer()
	popPushLoop(b, d, q, head, &c, b.N)
}

func BenchmarkPopPushIndirect10(b *testing.B) {
	d, q, head := indirectSetup(b)
	var c virtio.Chain
	b.ReportAllocs()
	b.ResetTimer()
	popPushLoop(b, d, q, head, &c, b.N)
}
