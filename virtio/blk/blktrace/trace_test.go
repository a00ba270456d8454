package blktrace

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/thinblk/thinblk/internal/blockdev"
)

// memStorage is a disk in memory; lose, when set, makes a write return
// success without storing its data (the bug Check exists to find).
type memStorage struct {
	mu   sync.Mutex
	b    []byte
	lose bool
}

func (m *memStorage) Size() uint64 { return uint64(len(m.b)) }
func (m *memStorage) ReadAt(bufs [][]byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range bufs {
		off += int64(copy(b, m.b[off:]))
	}
	return nil
}
func (m *memStorage) WriteAt(bufs [][]byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lose {
		return nil
	}
	for _, b := range bufs {
		off += int64(copy(m.b[off:], b))
	}
	return nil
}
func (m *memStorage) Flush() error { return nil }
func (m *memStorage) Discard(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}
func (m *memStorage) WriteZeroes(off, n int64, unmap bool) error { return m.Discard(off, n) }

func fill(n int, c byte) []byte { return bytes.Repeat([]byte{c}, n) }

func TestTraceAndCheck(t *testing.T) {
	var out bytes.Buffer
	l := New(&out, nil)
	mem := &memStorage{b: make([]byte, 1<<20)}
	s := l.Wrap("vol", mem)
	if _, ok := s.(blockdev.AsyncStorage); !ok {
		t.Fatal("traced storage does not offer asynchronous queues")
	}
	if _, err := s.(blockdev.AsyncStorage).OpenQueue(4, nil); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("queue of a synchronous storage: %v", err)
	}
	// A write split over two buffers, a read back, a discard, zeroes and a
	// read of the zeroed range: all consistent.
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.WriteAt([][]byte{fill(1024, 1), fill(512, 2)}, 4096))
	buf := make([]byte, 2048)
	must(s.ReadAt([][]byte{buf[:1000], buf[1000:]}, 4096))
	must(s.Discard(4096, 512))
	must(s.WriteZeroes(4608, 512, false))
	must(s.ReadAt([][]byte{buf}, 4096))
	must(s.Flush())
	l.Note("vol", "read 4096 2048 blocks 0:7")
	must(l.Close())
	text := out.String()
	for _, want := range []string{" S 1 vol write 4096 1536 ", " D 2 vol read ok ", " S 3 vol discard 4096 512", " S 4 vol zeroes 4608 512", " N vol read 4096 2048 blocks 0:7"} {
		if !strings.Contains(text, want) {
			t.Errorf("trace lacks %q:\n%s", want, text)
		}
	}
	res, err := Check(strings.NewReader(text), 0)
	if err != nil {
		t.Fatal(err)
	}
	if res.Bad != 0 || res.Reads != 2 || res.Sectors != 8 || res.Requests != 6 {
		t.Errorf("consistent trace: %+v\n%s", res, text)
	}

	// The same writes on a disk that drops one: the read back returns
	// zeros where the write should be, and Check names the write.
	out.Reset()
	l = New(&out, nil)
	mem = &memStorage{b: make([]byte, 1<<20)}
	s = l.Wrap("vol", mem)
	must(s.WriteAt([][]byte{fill(1024, 1)}, 0))
	mem.lose = true
	must(s.WriteAt([][]byte{fill(512, 3)}, 512))
	mem.lose = false
	must(s.ReadAt([][]byte{buf[:1536]}, 0))
	res, err = Check(strings.NewReader(out.String()), 0)
	if err != nil {
		t.Fatal(err)
	}
	if res.Bad != 1 || len(res.Mismatches) != 1 {
		t.Fatalf("lost write: %+v\n%s", res, out.String())
	}
	m := res.Mismatches[0]
	if m.Sector != 512 || m.Writer != 2 || m.Got == m.Want || !strings.Contains(m.String(), "written by request 2") {
		t.Errorf("mismatch %+v: %s", m, m)
	}
}

// A read overlapping a write in flight to the same sector is not judged;
// a write that raced another leaves the sector unknown until rewritten.
func TestCheckConcurrency(t *testing.T) {
	z := zeroCRC
	trace := strings.Join([]string{
		"1 0 S 1 d write 0 512 aa",
		"2 0 S 2 d read 0 512",
		"3 0 D 1 d write ok",
		"4 0 D 2 d read ok z", // overlapped the write: skipped
		"5 0 S 3 d write 512 512 bb",
		"6 0 S 4 d write 512 512 cc",
		"7 0 D 3 d write ok",
		"8 0 D 4 d write ok",
		"9 0 S 5 d read 0 1024",
		"10 0 D 5 d read ok aa,bb", // 0 checked (aa), 512 racy: skipped
		"11 0 S 6 d read 1024 512",
		"12 0 D 6 d read ok 12345",        // never written: want zeros
		"13 0 S 7 d discard 0 4294967296", // 4 GiB, as mkfs discards: not walked per sector
		"14 0 S 8 d read 0 512",
		"15 0 D 8 d read ok aa", // the discard is in flight: skipped
		"16 0 D 7 d discard ok",
		"17 0 S 9 d read 0 1024",
		"18 0 D 9 d read ok z*2", // discarded: zeros, both checked
	}, "\n")
	res, err := Check(strings.NewReader(trace), 0)
	if err != nil {
		t.Fatal(err)
	}
	if res.Sectors != 4 || res.Ambiguous != 3 || res.Bad != 1 || res.Mismatches[0].Sector != 1024 || res.Mismatches[0].Want != z {
		t.Errorf("%+v", res)
	}
	for _, bad := range []string{"1 0 D 9 d read ok z", "x", "1 0 S 1 d write 0 99999999999 z", "1 0 S 1 d write 3 512 aa", "1 0 S 1 d write 0 512 q*2"} {
		if _, err := Check(strings.NewReader(bad), 0); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestSectorsFormat(t *testing.T) {
	b := append(append(make([]byte, 1024), fill(512, 7)...), fill(100, 7)...)
	s := Sectors([][]byte{b[:700], b[700:]})
	if !strings.HasPrefix(s, "z*2,") || strings.Count(s, ",") != 2 {
		t.Errorf("sectors %q", s)
	}
	sums, err := parseSums(s)
	if err != nil || len(sums) != 4 || sums[0] != zeroCRC {
		t.Errorf("parse %q: %v %v", s, sums, err)
	}
}

func FuzzCheck(f *testing.F) {
	f.Add("1 0 S 1 d write 0 512 aa\n2 0 D 1 d write ok\n3 0 S 2 d read 0 512\n4 0 D 2 d read ok aa*1\n")
	f.Add("1 0 S 1 d zeroes-unmap 0 4096\n2 0 D 1 d zeroes-unmap \"no space\"\n")
	f.Add("1 0 N pool release blocks 1-3 punched []\n")
	f.Fuzz(func(t *testing.T, s string) {
		_, _ = Check(strings.NewReader(s), 3)
	})
}
