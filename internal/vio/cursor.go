package vio

// Cursor walks a scatter-gather list front to back without copying it:
// a request's guest buffers cut into the pieces that go to different
// places (blocks of a thin volume, the rest of a short transfer).
type Cursor struct {
	bufs [][]byte
	i, o int // the next byte is bufs[i][o]
}

// NewCursor returns a cursor at the first byte of bufs.
func NewCursor(bufs [][]byte) Cursor { return Cursor{bufs: bufs} }

// Next consumes and returns up to max bytes from the current buffer;
// empty at the end of the list.
func (c *Cursor) Next(max int64) []byte {
	for c.i < len(c.bufs) && c.o == len(c.bufs[c.i]) {
		c.i++
		c.o = 0
	}
	if c.i == len(c.bufs) || max <= 0 {
		return nil
	}
	b := c.bufs[c.i][c.o:]
	if int64(len(b)) > max {
		b = b[:max]
	}
	c.o += len(b)
	return b
}

// Skip consumes n bytes (or what is left, if less).
func (c *Cursor) Skip(n int64) {
	for n > 0 {
		b := c.Next(n)
		if len(b) == 0 {
			return
		}
		n -= int64(len(b))
	}
}

// Clear zeroes and consumes the next n bytes (or what is left).
func (c *Cursor) Clear(n int64) {
	for n > 0 {
		b := c.Next(n)
		if len(b) == 0 {
			return
		}
		clear(b)
		n -= int64(len(b))
	}
}

// Rest is the list of the bytes not consumed yet. It shares bufs when the
// cursor stands at the start of a buffer, and copies the remaining slice
// headers once otherwise (only on rare paths: short transfers).
func (c *Cursor) Rest() [][]byte {
	for c.i < len(c.bufs) && c.o == len(c.bufs[c.i]) {
		c.i++
		c.o = 0
	}
	if c.i == len(c.bufs) {
		return nil
	}
	if c.o == 0 {
		return c.bufs[c.i:]
	}
	rest := make([][]byte, len(c.bufs)-c.i)
	copy(rest, c.bufs[c.i:])
	rest[0] = rest[0][c.o:]
	return rest
}
