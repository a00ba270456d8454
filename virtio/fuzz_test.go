package virtio_test

import (
	"encoding/binary"
	"testing"
	"unsafe"

	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/virtiotest"
)

// Fuzz layout: 4 KiB of guest memory at address 0 taken from the input, a
// ring of 8 entries at fixed places inside it. Descriptors, avail entries
// and indirect tables are whatever the input says.
const (
	fuzzMem   = 4096
	fuzzSize  = 8
	fuzzDesc  = 0
	fuzzAvail = 128
	fuzzUsed  = 256
)

func fuzzDescBytes(addr uint64, length uint32, flags, next uint16) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b, addr)
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
	return b
}

func fuzzSeed() []byte {
	m := make([]byte, fuzzMem)
	// Features byte lives in the used ring's padding: 3 = indirect + event idx.
	m[fuzzUsed+100] = 3
	// Chain 0: readable 16 at 1024 -> writable 1 at 1100.
	copy(m[0:], fuzzDescBytes(1024, 16, virtio.DescFlagNext, 1))
	copy(m[16:], fuzzDescBytes(1100, 1, virtio.DescFlagWrite, 0))
	// Chain 2: indirect table at 2048 with two entries.
	copy(m[32:], fuzzDescBytes(2048, 32, virtio.DescFlagIndirect, 0))
	copy(m[2048:], fuzzDescBytes(1024, 16, virtio.DescFlagNext, 1))
	copy(m[2064:], fuzzDescBytes(1200, 512, virtio.DescFlagWrite, 0))
	// Chain 3: loops on itself.
	copy(m[48:], fuzzDescBytes(1024, 16, virtio.DescFlagNext, 3))
	binary.LittleEndian.PutUint16(m[fuzzAvail+4:], 0)
	binary.LittleEndian.PutUint16(m[fuzzAvail+6:], 2)
	binary.LittleEndian.PutUint16(m[fuzzAvail+8:], 3)
	binary.LittleEndian.PutUint16(m[fuzzAvail+2:], 3)
	return m
}

func FuzzPop(f *testing.F) {
	f.Add(fuzzSeed())
	f.Add(make([]byte, fuzzMem))
	s := fuzzSeed()
	binary.LittleEndian.PutUint16(s[fuzzAvail+2:], 200) // idx jump
	f.Add(s)
	s = fuzzSeed()
	copy(s[2048:], fuzzDescBytes(2048, 32, virtio.DescFlagIndirect, 0)) // nested
	f.Add(s)
	f.Fuzz(func(t *testing.T, data []byte) {
		mem := virtiotest.NewMemory(0, fuzzMem)
		copy(mem.Buf, data)
		var features uint64 = 1 << virtio.FeatureVersion1
		flags := mem.Buf[fuzzUsed+100]
		if flags&1 != 0 {
			features |= 1 << virtio.FeatureIndirectDesc
		}
		if flags&2 != 0 {
			features |= 1 << virtio.FeatureEventIdx
		}
		q, err := virtio.NewQueue(virtio.QueueSetup{
			Size:     fuzzSize,
			Desc:     mem.Buf[fuzzDesc : fuzzDesc+virtio.DescTableSize(fuzzSize)],
			Avail:    mem.Buf[fuzzAvail : fuzzAvail+virtio.AvailRingSize(fuzzSize)],
			Used:     mem.Buf[fuzzUsed : fuzzUsed+virtio.UsedRingSize(fuzzSize)],
			Features: features,
			Mem:      mem,
		})
		if err != nil {
			t.Fatal(err)
		}
		if flags&4 != 0 {
			q.SetMaxIndirect(64)
		}
		lo := uintptr(unsafe.Pointer(&mem.Buf[0]))
		hi := lo + fuzzMem
		var c virtio.Chain
		for i := 0; i < 2*fuzzSize+2; i++ {
			ok, err := q.Pop(&c)
			if err != nil || !ok {
				break
			}
			if c.Head >= fuzzSize {
				t.Fatalf("head %d out of range", c.Head)
			}
			var r, w uint64
			for k, seg := range append(append([][]byte{}, c.Readable...), c.Writable...) {
				if len(seg) == 0 {
					t.Fatal("empty segment")
				}
				p := uintptr(unsafe.Pointer(&seg[0]))
				if p < lo || p+uintptr(len(seg)) > hi {
					t.Fatalf("segment outside guest memory")
				}
				if k < len(c.Readable) {
					r += uint64(len(seg))
				} else {
					w += uint64(len(seg))
				}
			}
			if r != c.ReadLen || w != c.WriteLen {
				t.Fatalf("lengths %d/%d, segments sum %d/%d", c.ReadLen, c.WriteLen, r, w)
			}
			if n := len(c.Readable) + len(c.Writable); n > fuzzSize+64 {
				t.Fatalf("%d segments", n)
			}
			q.Push(c.Head, uint32(w))
			q.NeedsNotify()
			q.EnableNotify()
			q.DisableNotify()
		}
	})
}
