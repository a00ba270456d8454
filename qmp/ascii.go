package qmp

import (
	"fmt"
	"unicode/utf8"
)

// asciiJSON rewrites JSON text so that it is pure ASCII, as the QMP
// specification promises clients: non-ASCII characters, which can only
// occur inside strings, become \u escapes (surrogate pairs above the BMP).
// b must be valid JSON as produced by encoding/json, which guarantees
// valid UTF-8.
func asciiJSON(b []byte) []byte {
	i := 0
	for i < len(b) && b[i] < utf8.RuneSelf {
		i++
	}
	if i == len(b) {
		return b
	}
	out := make([]byte, i, len(b)+16)
	copy(out, b[:i])
	for i < len(b) {
		c := b[i]
		if c < utf8.RuneSelf {
			out = append(out, c)
			i++
			continue
		}
		r, n := utf8.DecodeRune(b[i:])
		i += n
		if r >= 0x10000 {
			r -= 0x10000
			out = fmt.Appendf(out, `\u%04x\u%04x`, 0xd800+(r>>10), 0xdc00+(r&0x3ff))
		} else {
			out = fmt.Appendf(out, `\u%04x`, r)
		}
	}
	return out
}
