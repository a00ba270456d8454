package vhostuser

import (
	"fmt"
	"testing"
)

// memoryWith builds a snapshot of n adjacent regions over one memfd,
// each regSize bytes.
func memoryWith(t testing.TB, n int, regSize uint64) (*guestMemory, *guestRAM) {
	ram := newGuestRAM(t, n*int(regSize))
	var mem *guestMemory
	for i := 0; i < n; i++ {
		r := MemoryRegion{GuestPhysAddr: uint64(i) * 2 * regSize, Size: regSize,
			UserAddr: 0x7f0000000000 + uint64(i)*regSize, MmapOffset: uint64(i) * regSize}
		mr, err := mapRegion(r, ram.file)
		if err != nil {
			t.Fatal(err)
		}
		if mem, err = mem.with(mr); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(mem.unmapAll)
	return mem, ram
}

func TestRangeTranslation(t *testing.T) {
	const regSize = 1 << 16
	mem, ram := memoryWith(t, 5, regSize)
	for i := 0; i < 5; i++ {
		copy(ram.mem[i*regSize+100:], fmt.Sprintf("r%d", i))
	}
	for i := 0; i < 5; i++ {
		gpa := uint64(i)*2*regSize + 100
		b, err := mem.Range(gpa, 2)
		if err != nil || string(b) != fmt.Sprintf("r%d", i) {
			t.Errorf("region %d: %q, %v", i, b, err)
		}
		if cap(b) != 2 {
			t.Errorf("region %d: slice capacity %d lets the caller reach past the range", i, cap(b))
		}
		u, err := mem.userRange(0x7f0000000000+uint64(i)*regSize+100, 2)
		if err != nil || string(u) != string(b) {
			t.Errorf("user range %d: %q, %v", i, u, err)
		}
		// The hole after each region, the last byte, and straddling.
		if _, err := mem.Range(uint64(i)*2*regSize+regSize, 1); err == nil {
			t.Errorf("hole after region %d translates", i)
		}
		if _, err := mem.Range(uint64(i)*2*regSize+regSize-1, 1); err != nil {
			t.Errorf("last byte of region %d: %v", i, err)
		}
		if _, err := mem.Range(uint64(i)*2*regSize+regSize-1, 2); err == nil {
			t.Errorf("range straddling the end of region %d translates", i)
		}
	}
	if _, err := mem.Range(0, 0); err != nil {
		t.Errorf("empty range at start: %v", err)
	}
	if _, err := mem.Range(0, ^uint64(0)); err == nil {
		t.Error("huge range translates")
	}
	if _, err := mem.userRange(0x7f0000000000+regSize-8, 16); err != nil {
		// Adjacent in user space but separate regions: must not merge.
		t.Logf("straddling user range refused: %v", err)
	} else {
		t.Error("user range straddling two regions translates")
	}
}

func BenchmarkRange(b *testing.B) {
	for _, n := range []int{1, 2, 8, MaxMemSlots} {
		b.Run(fmt.Sprintf("regions=%d", n), func(b *testing.B) {
			const regSize = 1 << 16
			mem, _ := memoryWith(b, n, regSize)
			addrs := make([]uint64, 64)
			for i := range addrs {
				addrs[i] = uint64(i%n)*2*regSize + uint64(i*512)%regSize
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := mem.Range(addrs[i&63], 512); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
