package vio

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"golang.org/x/sys/unix"
)

// TestVectoredShortTransfers: an op that takes at most 7 bytes a call,
// fails now and then with EINTR and caps buffers at MaxIOV still gets
// every byte to the right offset; one that takes nothing fails.
func TestVectoredShortTransfers(t *testing.T) {
	var bufs [][]byte
	var want []byte
	for i := range 1500 {
		b := bytes.Repeat([]byte{byte(i)}, i%5) // some empty
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	got := make([]byte, 100+len(want))
	calls := 0
	op := func(iov [][]byte, off int64) (int, error) {
		calls++
		if len(iov) > MaxIOV {
			t.Fatalf("%d buffers in one call", len(iov))
		}
		if calls%3 == 0 {
			return 0, unix.EINTR
		}
		n := 0
		for _, b := range iov {
			c := copy(got[int(off)+n:], b[:min(len(b), 7-n)])
			n += c
			if n == 7 {
				break
			}
		}
		return n, nil
	}
	if err := Vectored(bufs, 100, op, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[100:], want) {
		t.Fatal("bytes landed in the wrong places")
	}
	none := func([][]byte, int64) (int, error) { return 0, nil }
	if err := Vectored([][]byte{{1}}, 0, none, true); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read of nothing: %v", err)
	}
	if err := Vectored([][]byte{{1}}, 0, none, false); !errors.Is(err, io.ErrShortWrite) {
		t.Fatalf("write of nothing: %v", err)
	}
}
