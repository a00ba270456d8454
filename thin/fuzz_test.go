package thin

import (
	"encoding/binary"
	"testing"
)

// FuzzVolumeRequests feeds hostile requests (any offset, length, buffer
// shape) to a volume: nothing may panic or hang, out-of-range requests
// must fail, and the pool must stay consistent.
func FuzzVolumeRequests(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0, 2, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0})
	f.Add([]byte{4, 0, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 0, 0, 0, 0, 0x80})
	f.Add([]byte("000000000\x00\x00\x00\x00\x00\x00\x00\x000"))
	f.Fuzz(func(t *testing.T, prog []byte) {
		m := newMachine()
		if err := create("/p", CreateOptions{Size: 8 * 4096, BlockSize: 4096}, m.env()); err != nil {
			t.Fatal(err)
		}
		p, err := open("/p", quietOpts(), m.env())
		if err != nil {
			t.Fatal(err)
		}
		defer p.abandon()
		const size = 64 * 1024
		if err := p.CreateVolume("v", size); err != nil {
			t.Fatal(err)
		}
		v, _ := p.Volume("v")
		for len(prog) >= 18 {
			op := prog[0] % 6
			off := int64(binary.LittleEndian.Uint64(prog[1:9]))
			n := int64(binary.LittleEndian.Uint64(prog[9:17]))
			split := int(prog[17])
			prog = prog[18:]
			valid := off >= 0 && n >= 0 && off%512 == 0 && n%512 == 0 && off <= size && n <= size-off
			var err error
			switch op {
			case 0, 1:
				if n < 0 || n > 1<<20 {
					n = 1 << 20 // keep buffers small; still out of range
					valid = false
				}
				buf := make([]byte, n)
				a := min(split*512, len(buf))
				bufs := [][]byte{buf[:a], buf[a:]}
				if split%3 == 0 {
					h := min(a/2+1, len(buf))
					bufs = [][]byte{buf[:h], buf[h:]} // odd split
				}
				if op == 0 {
					err = v.ReadAt(bufs, off)
				} else {
					err = v.WriteAt(bufs, off)
				}
			case 2:
				err = v.Discard(off, n)
			case 3:
				err = v.WriteZeroes(off, n, true)
			case 4:
				err = v.WriteZeroes(off, n, false)
			case 5:
				err = v.Flush()
				valid = true
			}
			if !valid && err == nil {
				t.Fatalf("op %d at %d+%d accepted", op, off, n)
			}
		}
		if err := p.Check(nil); err != nil {
			t.Fatal(err)
		}
	})
}
