package virtio_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

const (
	memBase = 0x100000
	memSize = 1 << 20
	allFeat = 1<<virtio.FeatureVersion1 | 1<<virtio.FeatureIndirectDesc | 1<<virtio.FeatureEventIdx
)

func newQueue(t testing.TB, size uint16, features uint64) (*virtiotest.Driver, *virtio.Queue) {
	t.Helper()
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, size, features)
	q, err := virtio.NewQueue(d.Setup(0))
	if err != nil {
		t.Fatal(err)
	}
	return d, q
}

func pop(t *testing.T, q *virtio.Queue, c *virtio.Chain) {
	t.Helper()
	ok, err := q.Pop(c)
	if err != nil || !ok {
		t.Fatalf("Pop = %v, %v; want a chain", ok, err)
	}
}

func TestPlainChain(t *testing.T) {
	d, q := newQueue(t, 8, allFeat)
	hdr := d.AllocBuf(16, false, []byte("header----------"))
	data := d.AllocBuf(512, false, bytes.Repeat([]byte{7}, 512))
	out := d.AllocBuf(100, true, nil)
	status := d.AllocBuf(1, true, nil)
	head := d.AddChain(hdr, data, out, status)

	var c virtio.Chain
	pop(t, q, &c)
	if c.Err != nil {
		t.Fatal(c.Err)
	}
	if c.Head != head || len(c.Readable) != 2 || len(c.Writable) != 2 || c.ReadLen != 528 || c.WriteLen != 101 {
		t.Fatalf("chain %+v", c)
	}
	if string(c.Readable[0]) != "header----------" || c.Readable[1][511] != 7 {
		t.Fatalf("readable contents wrong")
	}
	// Writable buffers alias guest memory.
	c.Writable[1][0] = 0xab
	if d.Mem.Bytes(status.Addr, 1)[0] != 0xab {
		t.Fatal("writable buffer does not alias guest memory")
	}
	if ok, err := q.Pop(&c); ok || err != nil {
		t.Fatalf("second Pop = %v, %v", ok, err)
	}
	q.Push(c.Head, 101)
	u, ok := d.PopUsed()
	if !ok || u.ID != uint32(head) || u.Len != 101 {
		t.Fatalf("used %+v %v", u, ok)
	}
	if q.LastAvail() != 1 || q.UsedIdx() != 1 {
		t.Fatalf("indices %d %d", q.LastAvail(), q.UsedIdx())
	}
}

func TestIndirectChain(t *testing.T) {
	d, q := newQueue(t, 4, allFeat)
	bufs := []virtiotest.Buf{d.AllocBuf(16, false, nil), d.AllocBuf(4096, false, nil)}
	for range 6 { // more than the ring holds
		bufs = append(bufs, d.AllocBuf(512, true, nil))
	}
	bufs = bufs[:4] // the table may not exceed the queue size by default
	head := d.AddIndirect(bufs...)
	var c virtio.Chain
	pop(t, q, &c)
	if c.Err != nil || c.Head != head || len(c.Readable) != 2 || len(c.Writable) != 2 || c.WriteLen != 1024 {
		t.Fatalf("chain %+v", c)
	}

	// Larger tables only when raised.
	big := []virtiotest.Buf{d.AllocBuf(16, false, nil)}
	for range 7 {
		big = append(big, d.AllocBuf(8, true, nil))
	}
	d.AddIndirect(big...)
	pop(t, q, &c)
	if !errors.Is(c.Err, virtio.ErrBadChain) {
		t.Fatalf("8-entry table on a 4-entry queue: err %v", c.Err)
	}
	q.SetMaxIndirect(8)
	d.AddIndirect(big...)
	pop(t, q, &c)
	if c.Err != nil || len(c.Writable) != 7 {
		t.Fatalf("raised limit: %+v", c)
	}
}

func TestIndirectAfterDirect(t *testing.T) {
	d, q := newQueue(t, 8, allFeat)
	hdr := d.AllocBuf(16, false, nil)
	table := d.IndirectTable(d.AllocBuf(512, false, nil), d.AllocBuf(1, true, nil))
	head := d.WriteChain(hdr, virtiotest.Buf{})
	_, _, _, second := d.Desc(head)
	d.SetDesc(d.DescAddr, second, table, 2*virtio.DescSize, virtio.DescFlagIndirect, 0)
	d.Publish(head)
	var c virtio.Chain
	pop(t, q, &c)
	if c.Err != nil || len(c.Readable) != 2 || len(c.Writable) != 1 {
		t.Fatalf("chain %+v", c)
	}
}

func TestZeroLengthSkipped(t *testing.T) {
	d, q := newQueue(t, 8, allFeat)
	d.AddChain(d.AllocBuf(16, false, nil), virtiotest.Buf{Addr: 0, Len: 0}, d.AllocBuf(1, true, nil))
	var c virtio.Chain
	pop(t, q, &c)
	if c.Err != nil || len(c.Readable) != 1 || len(c.Writable) != 1 {
		t.Fatalf("chain %+v", c)
	}
}

// Every kind of malformed chain comes back with its head and ErrBadChain,
// and the queue keeps working afterwards.
func TestMalformedChains(t *testing.T) {
	const size = 8
	cases := []struct {
		name  string
		feat  uint64
		build func(d *virtiotest.Driver) uint16 // returns the head it published
	}{
		{"address outside memory", allFeat, func(d *virtiotest.Driver) uint16 {
			return d.AddChain(virtiotest.Buf{Addr: 0x10, Len: 16}, d.AllocBuf(1, true, nil))
		}},
		{"length runs past memory", allFeat, func(d *virtiotest.Driver) uint16 {
			return d.AddChain(virtiotest.Buf{Addr: memBase + memSize - 8, Len: 16}, d.AllocBuf(1, true, nil))
		}},
		{"address wraps", allFeat, func(d *virtiotest.Driver) uint16 {
			return d.AddChain(virtiotest.Buf{Addr: ^uint64(0) - 4, Len: 16})
		}},
		{"next out of range", allFeat, func(d *virtiotest.Driver) uint16 {
			h := d.WriteChain(d.AllocBuf(16, false, nil))
			b := d.AllocBuf(16, false, nil)
			d.SetDesc(d.DescAddr, h, b.Addr, b.Len, virtio.DescFlagNext, size)
			d.Publish(h)
			return h
		}},
		{"loop", allFeat, func(d *virtiotest.Driver) uint16 {
			h := d.WriteChain(d.AllocBuf(16, false, nil), d.AllocBuf(16, false, nil))
			_, _, _, second := d.Desc(h)
			b := d.AllocBuf(16, false, nil)
			d.SetDesc(d.DescAddr, second, b.Addr, b.Len, virtio.DescFlagNext, h)
			d.Publish(h)
			return h
		}},
		{"self loop", allFeat, func(d *virtiotest.Driver) uint16 {
			h := d.WriteChain(d.AllocBuf(16, false, nil))
			b := d.AllocBuf(16, false, nil)
			d.SetDesc(d.DescAddr, h, b.Addr, b.Len, virtio.DescFlagNext, h)
			d.Publish(h)
			return h
		}},
		{"readable after writable", allFeat, func(d *virtiotest.Driver) uint16 {
			return d.AddChain(d.AllocBuf(16, false, nil), d.AllocBuf(1, true, nil), d.AllocBuf(16, false, nil))
		}},
		{"indirect without feature", 1 << virtio.FeatureVersion1, func(d *virtiotest.Driver) uint16 {
			return d.AddIndirect(d.AllocBuf(16, false, nil), d.AllocBuf(1, true, nil))
		}},
		{"nested indirect", allFeat, func(d *virtiotest.Driver) uint16 {
			inner := d.IndirectTable(d.AllocBuf(16, false, nil))
			outer := d.IndirectTable(d.AllocBuf(16, false, nil), virtiotest.Buf{Addr: inner, Len: virtio.DescSize})
			d.SetDesc(outer, 1, inner, virtio.DescSize, virtio.DescFlagIndirect, 0)
			h := d.WriteChain(virtiotest.Buf{})
			d.SetDesc(d.DescAddr, h, outer, 2*virtio.DescSize, virtio.DescFlagIndirect, 0)
			d.Publish(h)
			return h
		}},
		{"indirect with next", allFeat, func(d *virtiotest.Driver) uint16 {
			table := d.IndirectTable(d.AllocBuf(16, false, nil))
			h := d.WriteChain(virtiotest.Buf{}, d.AllocBuf(1, true, nil))
			_, _, _, next := d.Desc(h)
			d.SetDesc(d.DescAddr, h, table, virtio.DescSize, virtio.DescFlagIndirect|virtio.DescFlagNext, next)
			d.Publish(h)
			return h
		}},
		{"zero-length indirect table", allFeat, func(d *virtiotest.Driver) uint16 {
			h := d.WriteChain(virtiotest.Buf{})
			d.SetDesc(d.DescAddr, h, d.Alloc(16), 0, virtio.DescFlagIndirect, 0)
			d.Publish(h)
			return h
		}},
		{"indirect table length not a multiple of 16", allFeat, func(d *virtiotest.Driver) uint16 {
			h := d.WriteChain(virtiotest.Buf{})
			d.SetDesc(d.DescAddr, h, d.IndirectTable(d.AllocBuf(16, false, nil)), 15, virtio.DescFlagIndirect, 0)
			d.Publish(h)
			return h
		}},
		{"indirect table larger than the queue", allFeat, func(d *virtiotest.Driver) uint16 {
			var bufs []virtiotest.Buf
			for range size + 1 {
				bufs = append(bufs, d.AllocBuf(16, false, nil))
			}
			return d.AddIndirect(bufs...)
		}},
		{"indirect table outside memory", allFeat, func(d *virtiotest.Driver) uint16 {
			h := d.WriteChain(virtiotest.Buf{})
			d.SetDesc(d.DescAddr, h, memBase+memSize-16, 32, virtio.DescFlagIndirect, 0)
			d.Publish(h)
			return h
		}},
		{"indirect next out of range", allFeat, func(d *virtiotest.Driver) uint16 {
			table := d.IndirectTable(d.AllocBuf(16, false, nil), d.AllocBuf(1, true, nil))
			b := d.AllocBuf(16, false, nil)
			d.SetDesc(table, 0, b.Addr, b.Len, virtio.DescFlagNext, 2)
			h := d.WriteChain(virtiotest.Buf{})
			d.SetDesc(d.DescAddr, h, table, 2*virtio.DescSize, virtio.DescFlagIndirect, 0)
			d.Publish(h)
			return h
		}},
		{"indirect loop", allFeat, func(d *virtiotest.Driver) uint16 {
			table := d.IndirectTable(d.AllocBuf(16, false, nil), d.AllocBuf(16, false, nil))
			b := d.AllocBuf(16, false, nil)
			d.SetDesc(table, 1, b.Addr, b.Len, virtio.DescFlagNext, 0)
			h := d.WriteChain(virtiotest.Buf{})
			d.SetDesc(d.DescAddr, h, table, 2*virtio.DescSize, virtio.DescFlagIndirect, 0)
			d.Publish(h)
			return h
		}},
		{"indirect readable after writable", allFeat, func(d *virtiotest.Driver) uint16 {
			return d.AddIndirect(d.AllocBuf(1, true, nil), d.AllocBuf(16, false, nil))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, q := newQueue(t, size, tc.feat)
			head := tc.build(d)
			var c virtio.Chain
			pop(t, q, &c)
			if !errors.Is(c.Err, virtio.ErrBadChain) {
				t.Fatalf("err = %v, want ErrBadChain", c.Err)
			}
			if c.Head != head {
				t.Fatalf("head %d, want %d", c.Head, head)
			}
			t.Log(c.Err)
			// Buffers collected before the fault are inside memory.
			for _, b := range append(c.Readable, c.Writable...) {
				if len(b) == 0 {
					t.Fatal("empty segment")
				}
			}
			q.Push(c.Head, 0)
			if _, ok := d.PopUsed(); !ok {
				t.Fatal("no used element")
			}
			// The queue still serves good chains.
			d.AddChain(d.AllocBuf(16, false, nil), d.AllocBuf(1, true, nil))
			pop(t, q, &c)
			if c.Err != nil {
				t.Fatalf("good chain after bad one: %v", c.Err)
			}
		})
	}
}

func TestNeedsReset(t *testing.T) {
	t.Run("head out of range", func(t *testing.T) {
		d, q := newQueue(t, 8, allFeat)
		d.SetAvailEntry(0, 8)
		d.SetAvailIdx(1)
		var c virtio.Chain
		if ok, err := q.Pop(&c); ok || !errors.Is(err, virtio.ErrNeedsReset) {
			t.Fatalf("Pop = %v, %v", ok, err)
		}
		if !errors.Is(q.Broken(), virtio.ErrNeedsReset) {
			t.Fatal("queue not marked broken")
		}
		// It stays broken.
		d.AddChain(d.AllocBuf(16, false, nil))
		if ok, err := q.Pop(&c); ok || err == nil {
			t.Fatalf("Pop after break = %v, %v", ok, err)
		}
	})
	t.Run("avail idx jumps", func(t *testing.T) {
		d, q := newQueue(t, 8, allFeat)
		d.SetAvailIdx(9)
		var c virtio.Chain
		if ok, err := q.Pop(&c); ok || !errors.Is(err, virtio.ErrNeedsReset) {
			t.Fatalf("Pop = %v, %v", ok, err)
		}
	})
	t.Run("avail idx goes back", func(t *testing.T) {
		d, q := newQueue(t, 8, allFeat)
		d.AddChain(d.AllocBuf(16, false, nil))
		var c virtio.Chain
		pop(t, q, &c)
		d.SetAvailIdx(0)
		if ok, err := q.Pop(&c); ok || !errors.Is(err, virtio.ErrNeedsReset) {
			t.Fatalf("Pop = %v, %v", ok, err)
		}
	})
}

func TestNewQueueRejectsBadSetup(t *testing.T) {
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, 8, allFeat)
	good := d.Setup(0)
	bad := map[string]virtio.QueueSetup{}
	s := good
	s.Size = 6
	bad["size not power of two"] = s
	s = good
	s.Size = 0
	bad["size zero"] = s
	s = good
	s.Size = 16
	bad["areas too small"] = s
	s = good
	s.Used = mem.Bytes(d.UsedAddr+2, virtio.UsedRingSize(8))
	bad["used misaligned"] = s
	s = good
	s.Avail = mem.Bytes(d.AvailAddr+1, virtio.AvailRingSize(8))
	bad["avail odd"] = s
	s = good
	s.Mem = nil
	bad["no memory"] = s
	for name, s := range bad {
		if _, err := virtio.NewQueue(s); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A 2-aligned (not 4-aligned) avail ring is legal.
	s = good
	s.Avail = mem.Bytes(d.AvailAddr+2, virtio.AvailRingSize(8))
	if _, err := virtio.NewQueue(s); err != nil {
		t.Errorf("2-aligned avail ring: %v", err)
	}
}

// Indices wrap at 2^16; start near the edge and push many chains through.
func TestIndexWraparound(t *testing.T) {
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, 4, allFeat)
	const start = 65533
	d.SetAvailIdx(start)
	s := d.Setup(0)
	s.LastAvail = start
	q, err := virtio.NewQueue(s)
	if err != nil {
		t.Fatal(err)
	}
	hdr := d.AllocBuf(16, false, nil)
	st := d.AllocBuf(1, true, nil)
	var c virtio.Chain
	for i := range 20 {
		h := d.AddChain(hdr, st)
		pop(t, q, &c)
		if c.Head != h || c.Err != nil {
			t.Fatalf("round %d: head %d want %d, err %v", i, c.Head, h, c.Err)
		}
		q.Push(c.Head, 1)
		if u, ok := d.PopUsed(); !ok || u.ID != uint32(h) {
			t.Fatalf("round %d: used %+v %v", i, u, ok)
		}
	}
	if q.LastAvail() != uint16((start+20)%65536) {
		t.Fatalf("LastAvail %d", q.LastAvail())
	}
}

func TestNeedEvent(t *testing.T) {
	cases := []struct {
		event, new, old uint16
		want            bool
	}{
		{0, 1, 0, true},
		{0, 0, 0, false},
		{5, 5, 4, false},         // event 5 means "after index 5 is passed"
		{4, 5, 4, true},          // passed 4 -> 5
		{3, 5, 4, false},         // event already behind old
		{10, 20, 5, true},        // batch crossing it
		{20, 20, 5, false},       // not yet
		{65535, 0, 65535, true},  // wrap: 65535 -> 0 crosses 65535
		{65534, 1, 65533, true},  // wrap inside a batch
		{2, 1, 65533, false},     // event ahead, across wrap
		{65533, 1, 65533, true},  // old == event: the batch passes it
		{65532, 1, 65533, false}, // event behind old: already signalled
	}
	for _, c := range cases {
		if got := virtio.NeedEvent(c.event, c.new, c.old); got != c.want {
			t.Errorf("NeedEvent(%d, %d, %d) = %v, want %v", c.event, c.new, c.old, got, c.want)
		}
	}
}

func TestEventIdxNotify(t *testing.T) {
	d, q := newQueue(t, 8, allFeat)
	hdr := d.AllocBuf(16, false, nil)
	var c virtio.Chain
	for range 4 {
		d.AddChain(hdr)
	}
	d.SetUsedEvent(1) // interrupt me once used idx passes 1
	pop(t, q, &c)
	q.Push(c.Head, 0) // used 1
	if !q.NeedsNotify() {
		t.Fatal("first completion must notify (no previous signal)")
	}
	pop(t, q, &c)
	q.Push(c.Head, 0) // used 2: passes used_event 1
	if !q.NeedsNotify() {
		t.Fatal("used 1->2 passes used_event 1")
	}
	pop(t, q, &c)
	q.Push(c.Head, 0) // used 3, event still 1
	if q.NeedsNotify() {
		t.Fatal("used 2->3 does not pass used_event 1")
	}
	if q.NeedsNotify() {
		t.Fatal("nothing new: no notify")
	}
	d.SetUsedEvent(3)
	pop(t, q, &c)
	q.Push(c.Head, 0) // used 4 passes 3
	if !q.NeedsNotify() {
		t.Fatal("used 3->4 passes used_event 3")
	}

	// avail_event follows LastAvail when notifications are enabled, and
	// stays behind while disabled.
	q.EnableNotify()
	if d.AvailEvent() != 4 {
		t.Fatalf("avail_event %d, want 4", d.AvailEvent())
	}
	q.DisableNotify()
	old := d.AvailIdx()
	d.AddChain(hdr)
	if !d.NeedKick(old) {
		t.Fatal("driver must kick once for the first chain after enable")
	}
	old = d.AvailIdx()
	d.AddChain(hdr)
	if d.NeedKick(old) {
		t.Fatal("driver must not kick again before the device re-enables")
	}
	if d.UsedFlags() != 0 {
		t.Fatal("NO_NOTIFY must not be used with EVENT_IDX")
	}
}

func TestFlagsNotify(t *testing.T) {
	d, q := newQueue(t, 8, 1<<virtio.FeatureVersion1)
	hdr := d.AllocBuf(16, false, nil)
	var c virtio.Chain
	d.AddChain(hdr)
	d.AddChain(hdr)
	pop(t, q, &c)
	q.Push(c.Head, 0)
	if !q.NeedsNotify() {
		t.Fatal("no NO_INTERRUPT: notify")
	}
	if q.NeedsNotify() {
		t.Fatal("nothing new pushed: no notify")
	}
	d.SetAvailFlags(virtio.AvailFlagNoInterrupt)
	pop(t, q, &c)
	q.Push(c.Head, 0)
	if q.NeedsNotify() {
		t.Fatal("NO_INTERRUPT set: no notify")
	}
	q.DisableNotify()
	if d.UsedFlags()&virtio.UsedFlagNoNotify == 0 {
		t.Fatal("DisableNotify must set NO_NOTIFY")
	}
	q.EnableNotify()
	if d.UsedFlags() != 0 {
		t.Fatal("EnableNotify must clear NO_NOTIFY")
	}
	// Flags and used index share a word; both survive each other's
	// updates.
	if d.UsedIdx() != 2 {
		t.Fatalf("used idx %d", d.UsedIdx())
	}
}

func TestLoadStore16(t *testing.T) {
	b := make([]byte, 16)
	for off := 0; off < 12; off += 2 {
		clear(b)
		for i := range b {
			b[i] = byte(i + 1)
		}
		want := append([]byte(nil), b...)
		virtio.Store16(b[off:], 0xbeef)
		want[off], want[off+1] = 0xef, 0xbe
		if !bytes.Equal(b, want) {
			t.Fatalf("off %d: %x want %x", off, b, want)
		}
		if v := virtio.Load16(b[off:]); v != 0xbeef {
			t.Fatalf("off %d: load %#x", off, v)
		}
	}
}

// Without EVENT_IDX the ring areas lack the event fields; the transport may
// pass them 2 bytes shorter.
func TestRingsWithoutEventFields(t *testing.T) {
	mem := virtiotest.NewMemory(memBase, memSize)
	d := virtiotest.NewDriver(mem, 8, 1<<virtio.FeatureVersion1)
	s := d.Setup(0)
	s.Avail = s.Avail[:len(s.Avail)-2]
	s.Used = s.Used[:len(s.Used)-2]
	q, err := virtio.NewQueue(s)
	if err != nil {
		t.Fatal(err)
	}
	d.AddChain(d.AllocBuf(16, false, nil))
	var c virtio.Chain
	pop(t, q, &c)
	q.EnableNotify()
	q.Push(c.Head, 0)
	if !q.NeedsNotify() {
		t.Fatal("no notify")
	}
	s.Features |= 1 << virtio.FeatureEventIdx
	if _, err := virtio.NewQueue(s); err == nil {
		t.Fatal("short rings accepted with EVENT_IDX")
	}
}

// The race the runner guards against: the driver adds a chain while the
// device still has notifications off, so it does not kick; the device must
// find the chain by looking again after EnableNotify.
func TestChainAddedWhileNotificationsOff(t *testing.T) {
	for name, feat := range map[string]uint64{"event idx": allFeat, "flags": 1 << virtio.FeatureVersion1} {
		t.Run(name, func(t *testing.T) {
			d, q := newQueue(t, 8, feat)
			buf := d.AllocBuf(16, false, nil)
			var c virtio.Chain
			q.EnableNotify()
			old := d.AvailIdx()
			d.AddChain(buf)
			if !d.NeedKick(old) {
				t.Fatal("first chain after enable must kick")
			}
			q.DisableNotify()
			pop(t, q, &c)
			q.Push(c.Head, 0)
			d.PopUsed()
			if ok, _ := q.Pop(&c); ok {
				t.Fatal("ring should be empty")
			}
			// Device about to sleep; the driver adds a chain first.
			old = d.AvailIdx()
			d.AddChain(buf)
			if d.NeedKick(old) {
				t.Fatal("driver kicked although notifications were off")
			}
			q.EnableNotify()
			if !q.HasAvail() {
				t.Fatal("chain added before EnableNotify not seen by the re-check")
			}
			pop(t, q, &c)
		})
	}
}

func TestReadChain(t *testing.T) {
	d, q := newQueue(t, 8, allFeat)
	head := d.WriteChain(d.AllocBuf(16, false, nil), d.AllocBuf(1, true, nil)) // never made available
	var c virtio.Chain
	if err := q.ReadChain(head, &c); err != nil || c.Err != nil || c.ReadLen != 16 || c.WriteLen != 1 {
		t.Fatalf("ReadChain: %v %+v", err, c)
	}
	if q.LastAvail() != 0 {
		t.Fatal("ReadChain consumed the available ring")
	}
	if err := q.ReadChain(8, &c); err == nil {
		t.Fatal("head out of range accepted")
	}
}
