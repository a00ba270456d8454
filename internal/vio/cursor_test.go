package vio

import (
	"bytes"
	"testing"
)

// TestCursor cuts a list with empty buffers into pieces of every size and
// checks that the pieces, skips and rests cover the bytes in order.
func TestCursor(t *testing.T) {
	var bufs [][]byte
	var all []byte
	for i := range 40 {
		b := bytes.Repeat([]byte{byte(i + 1)}, i%7) // some empty
		bufs = append(bufs, b)
		all = append(all, b...)
	}
	for step := int64(1); step <= 20; step++ {
		c := NewCursor(bufs)
		var got []byte
		for pos := int64(0); pos < int64(len(all)); pos += step {
			switch pos / step % 3 {
			case 0: // pieces, never crossing a buffer
				for rel := int64(0); rel < step; {
					b := c.Next(step - rel)
					if len(b) == 0 {
						break
					}
					got = append(got, b...)
					rel += int64(len(b))
				}
			case 1:
				rest := c.Rest()
				var flat []byte
				for _, b := range rest {
					flat = append(flat, b...)
				}
				if !bytes.Equal(flat, all[pos:]) {
					t.Fatalf("step %d at %d: Rest is not the bytes left", step, pos)
				}
				c.Skip(step)
				got = append(got, all[pos:min(pos+step, int64(len(all)))]...)
			case 2:
				c.Skip(step)
				got = append(got, all[pos:min(pos+step, int64(len(all)))]...)
			}
		}
		if !bytes.Equal(got, all) {
			t.Fatalf("step %d: pieces are not the list's bytes in order", step)
		}
		if b := c.Next(1); len(b) != 0 || c.Rest() != nil {
			t.Fatalf("step %d: bytes after the end", step)
		}
	}
	c := NewCursor([][]byte{{1, 2}, {3, 4}})
	c.Skip(1)
	c.Clear(2)
	if !bytes.Equal(c.bufs[0], []byte{1, 0}) || !bytes.Equal(c.bufs[1], []byte{0, 4}) {
		t.Fatalf("Clear: %v", c.bufs)
	}
	// A transfer that ended on a buffer boundary leaves the list shared.
	c = NewCursor(bufs)
	c.Skip(int64(len(bufs[1]) + len(bufs[2])))
	if allocs := testing.AllocsPerRun(100, func() { _ = c.Rest() }); allocs != 0 {
		t.Fatalf("Rest on a boundary allocates %v times", allocs)
	}
}
