package frontend

import (
	"encoding/binary"
	"testing"

	"github.com/thinblk/thinblk/virtio"
)

func TestAllocFree(t *testing.T) {
	m, err := newMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	var bufs []Buffer
	for i := 0; i < 100; i++ {
		b, err := m.Alloc(uint64(1+i*37), 64)
		if err != nil {
			t.Fatal(err)
		}
		if b.Addr%64 != 0 || len(b.Bytes) != 1+i*37 {
			t.Fatalf("alloc %d: addr %#x len %d", i, b.Addr, len(b.Bytes))
		}
		for _, o := range bufs {
			if b.Addr < o.Addr+uint64(len(o.Bytes)) && o.Addr < b.Addr+uint64(len(b.Bytes)) {
				t.Fatalf("alloc %d overlaps an earlier buffer", i)
			}
		}
		bufs = append(bufs, b)
	}
	for i := 0; i < len(bufs); i += 2 {
		m.Free(bufs[i])
	}
	for i := 1; i < len(bufs); i += 2 {
		m.Free(bufs[i])
	}
	if len(m.free) != 1 || m.free[0] != (span{0, 1 << 20}) {
		t.Fatalf("free list after freeing everything: %v", m.free)
	}
	if _, err := m.Alloc(2<<20, 0); err == nil {
		t.Fatalf("allocated more than the memory size")
	}
}

// TestRingKickSuppression checks the driver's notification decisions
// against what a device publishes in avail_event and used flags.
func TestRingKickSuppression(t *testing.T) {
	m, err := newMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	for _, eventIdx := range []bool{false, true} {
		r, err := newRing(m, 8, eventIdx)
		if err != nil {
			t.Fatal(err)
		}
		one := []desc{{addr: 0, len: 1}}
		setAvailEvent := func(v uint16) { binary.LittleEndian.PutUint16(r.used.Bytes[4+8*8:], v) }
		setUsedFlags := func(v uint16) { binary.LittleEndian.PutUint16(r.used.Bytes[0:], v) }
		r.add(one)
		if !r.publish() {
			t.Fatalf("eventIdx=%v: first publish did not ask for a kick", eventIdx)
		}
		if r.publish() {
			t.Fatalf("eventIdx=%v: publish with nothing new asked for a kick", eventIdx)
		}
		if eventIdx {
			setAvailEvent(5) // device wants a kick once index 5 is published
			r.add(one)       // avail idx 2
			if r.publish() {
				t.Fatalf("kicked although avail_event is ahead")
			}
			r.add(one)
			r.add(one)
			r.add(one) // avail idx 5: crosses avail_event (5 -> entry 5 published as idx 6)
			r.add(one)
			if !r.publish() {
				t.Fatalf("no kick although avail_event was crossed")
			}
		} else {
			setUsedFlags(virtio.UsedFlagNoNotify)
			r.add(one)
			if r.publish() {
				t.Fatalf("kicked although the device set NO_NOTIFY")
			}
			setUsedFlags(0)
			r.add(one)
			if !r.publish() {
				t.Fatalf("no kick although the device cleared NO_NOTIFY")
			}
		}
		r.free(m)
	}
}

// FuzzUsedRing lets a hostile device write the used ring: the driver must
// never panic, never return a chain that is not in flight, and never
// lose or duplicate descriptors.
func FuzzUsedRing(f *testing.F) {
	f.Add(uint16(1), []byte{0, 0, 0, 0, 16, 0, 0, 0})
	f.Add(uint16(3), []byte{7, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0, 0})
	f.Add(uint16(0xffff), []byte{1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, usedIdx uint16, elems []byte) {
		m, err := newMemory(64 << 10)
		if err != nil {
			t.Fatal(err)
		}
		defer m.close()
		const size = 8
		r, err := newRing(m, size, true)
		if err != nil {
			t.Fatal(err)
		}
		heads := map[uint16]bool{}
		for i := 0; i < 3; i++ {
			h, err := r.add([]desc{{len: 1}, {len: 1, flags: virtio.DescFlagWrite}})
			if err != nil {
				t.Fatal(err)
			}
			heads[h] = true
		}
		r.publish()
		copy(r.used.Bytes[4:4+size*virtio.UsedElemSize], elems)
		binary.LittleEndian.PutUint16(r.used.Bytes[2:], usedIdx)
		for i := 0; i < 2*size; i++ {
			h, _, ok, err := r.pop()
			if err != nil || !ok {
				break
			}
			if !heads[h] {
				t.Fatalf("popped head %d that is not in flight", h)
			}
			delete(heads, h)
		}
		inFlight := 2 * len(heads)
		if r.numFree()+inFlight != size {
			t.Fatalf("%d free + %d in flight != %d", r.numFree(), inFlight, size)
		}
		seen := map[uint16]bool{}
		for _, d := range r.freeStack {
			if d >= size || seen[d] {
				t.Fatalf("free list corrupt: %v", r.freeStack)
			}
			seen[d] = true
		}
	})
}
