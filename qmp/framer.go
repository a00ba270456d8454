package qmp

import (
	"errors"
	"fmt"
)

// errTooLarge and errTooDeep report a message that exceeded the framer's
// limits; the rest of that message is skipped.
var (
	errTooLarge = errors.New("message too large")
	errTooDeep  = errors.New("nesting too deep")
)

// lexicalError reports a byte that can never appear in JSON text. As in
// QEMU, it resets the parser: this is how a client gets the server back into
// a known state after sending garbage.
type lexicalError struct{ b byte }

func (e lexicalError) Error() string { return fmt.Sprintf("invalid byte 0x%02x", e.b) }

// framer splits a byte stream into top-level JSON values without parsing
// them. QMP input is a stream of JSON values that need not be separated by
// newlines (python's qmp clients send none), so messages are delimited by
// tracking nesting depth and strings. The framer keeps at most max bytes of
// one message; a longer message is reported once and then skipped while
// only its depth is tracked, so memory stays bounded whatever arrives.
type framer struct {
	max      int // largest message kept, in bytes
	maxDepth int // deepest nesting kept

	buf      []byte
	depth    int
	inStr    bool // inside a string
	esc      bool // after a backslash inside a string
	bare     bool // inside a top-level number or literal
	skipping bool // the current message exceeded a limit and is being discarded

	ended uint64 // messages ended so far, emitted or not
}

// keepCap is the buffer capacity kept between messages; a larger buffer,
// grown by one big message, is released so that an idle connection does
// not pin it.
const keepCap = 64 << 10

// emitFunc receives one complete message, or an error for a message that
// was discarded. msg is only valid during the call.
type emitFunc func(msg []byte, err error)

// pending reports whether part of a message has been received.
func (f *framer) pending() bool {
	return f.skipping || f.bare || f.inStr || f.depth > 0
}

func (f *framer) reset() {
	f.ended++
	f.depth, f.inStr, f.esc, f.bare, f.skipping = 0, false, false, false, false
	f.clearBuf()
}

func (f *framer) clearBuf() {
	if cap(f.buf) > keepCap {
		f.buf = nil
	} else {
		f.buf = f.buf[:0]
	}
}

// invalidByte reports bytes that cannot occur anywhere in UTF-8 JSON text:
// control characters other than JSON whitespace, and bytes no UTF-8
// sequence contains.
func invalidByte(c byte) bool {
	switch {
	case c < 0x20:
		return c != '\t' && c != '\n' && c != '\r'
	case c == 0xc0 || c == 0xc1 || c >= 0xf5:
		return true
	}
	return false
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// feed consumes p, calling emit for every message completed or discarded.
func (f *framer) feed(p []byte, emit emitFunc) {
	for i := 0; i < len(p); i++ {
		c := p[i]
		if invalidByte(c) {
			f.reset()
			emit(nil, lexicalError{c})
			continue
		}
		switch {
		case f.inStr:
			f.add(c, emit)
			switch {
			case f.esc:
				f.esc = false
			case c == '\\':
				f.esc = true
			case c == '"':
				f.inStr = false
				if f.depth == 0 {
					f.done(emit)
				}
			}
		case f.bare:
			if isSpace(c) || isStructural(c) {
				f.bare = false
				f.done(emit)
				i-- // c starts the next token
				continue
			}
			f.add(c, emit)
		default:
			switch {
			case isSpace(c):
				if f.depth > 0 {
					f.add(c, emit)
				}
			case c == '{' || c == '[':
				f.depth++
				f.add(c, emit)
				if f.depth > f.maxDepth && !f.skipping {
					f.skip(errTooDeep, emit)
				}
			case c == '}' || c == ']':
				if f.depth == 0 {
					// A stray closer is a message of its own, which
					// then fails to parse.
					f.add(c, emit)
					f.done(emit)
					continue
				}
				f.depth--
				f.add(c, emit)
				if f.depth == 0 {
					f.done(emit)
				}
			case c == '"':
				f.inStr = true
				f.add(c, emit)
			default:
				if f.depth == 0 {
					f.bare = true
				}
				f.add(c, emit)
			}
		}
	}
}

func isStructural(c byte) bool {
	switch c {
	case '{', '}', '[', ']', ',', ':', '"':
		return true
	}
	return false
}

// add appends c to the message unless it is being skipped; reaching the
// size limit reports the message and skips its remainder.
func (f *framer) add(c byte, emit emitFunc) {
	if f.skipping {
		return
	}
	if len(f.buf) >= f.max {
		f.skip(errTooLarge, emit)
		return
	}
	f.buf = append(f.buf, c)
}

func (f *framer) skip(err error, emit emitFunc) {
	f.skipping = true
	f.clearBuf()
	emit(nil, err)
}

// done ends the current message: it is emitted unless it was skipped.
func (f *framer) done(emit emitFunc) {
	f.ended++
	if f.skipping {
		f.skipping = false
		f.clearBuf()
		return
	}
	if len(f.buf) > 0 {
		emit(f.buf, nil)
	}
	f.clearBuf()
}
