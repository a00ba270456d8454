package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"strings"
	"testing"
)

// sample writes a small stream with one record of every kind; offsets
// gives where each record (header included) starts, the end record left out.
func sample(t testing.TB) (b []byte, offsets []int) {
	var buf bytes.Buffer
	h := Header{Incremental: true, BlockSize: 4096, VolumeSize: 10*4096 + 512, Name: "s2", ID: ID{2}, BaseName: "s1", BaseID: ID{1},
		DataBlocks: 3, ProvisionBlocks: 2, DiscardBlocks: 1, ProvisionedDataBlocks: 1}
	w, err := NewWriter(&buf, h)
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{
		w.Data(1, 2, false, bytes.Repeat([]byte{0xab}, 2*4096)),
		w.Provision(3, 2),
		w.Discard(6, 1),
		w.Data(10, 1, true, bytes.Repeat([]byte{0xcd}, 512)), // the short last block
		w.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	b = buf.Bytes()
	for off := len(magic) + 2; off < len(b); off += frameHead + int(binary.BigEndian.Uint32(b[off+9:])) + frameTail {
		offsets = append(offsets, off)
	}
	return b, offsets[:len(offsets)-1]
}

func readAll(b []byte) (Header, []Record, error) {
	r, err := NewReader(bytes.NewReader(b))
	if err != nil {
		return Header{}, nil, err
	}
	var recs []Record
	for {
		rec, err := r.Next()
		if err == io.EOF {
			return r.Header(), recs, nil
		}
		if err != nil {
			return r.Header(), recs, err
		}
		rec.Data = append([]byte(nil), rec.Data...)
		recs = append(recs, rec)
	}
}

func TestRoundTrip(t *testing.T) {
	b, _ := sample(t)
	h, recs, err := readAll(b)
	if err != nil {
		t.Fatal(err)
	}
	if h.Name != "s2" || h.BaseName != "s1" || h.ID != (ID{2}) || h.BaseID != (ID{1}) || !h.Incremental || h.DataBlocks != 3 {
		t.Fatalf("header %+v", h)
	}
	want := []Record{
		{Type: TypeData, First: 1, Count: 2, Data: bytes.Repeat([]byte{0xab}, 2*4096)},
		{Type: TypeProvision, First: 3, Count: 2},
		{Type: TypeDiscard, First: 6, Count: 1},
		{Type: TypeData, First: 10, Count: 1, Provisioned: true, Data: bytes.Repeat([]byte{0xcd}, 512)},
	}
	if len(recs) != len(want) {
		t.Fatalf("%d records, want %d", len(recs), len(want))
	}
	for i := range want {
		g, w := recs[i], want[i]
		if g.Type != w.Type || g.First != w.First || g.Count != w.Count || g.Provisioned != w.Provisioned || !bytes.Equal(g.Data, w.Data) {
			t.Fatalf("record %d: %+v, want %+v", i, g, w)
		}
	}
}

// Every byte of every record matters: a flipped byte anywhere, and a cut
// anywhere, fail with ErrBadStream.
func TestCorruptionAndTruncation(t *testing.T) {
	b, offs := sample(t)
	for i := range b {
		c := append([]byte(nil), b...)
		c[i] ^= 0x10
		if _, _, err := readAll(c); !errors.Is(err, ErrBadStream) {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
	for n := 0; n < len(b); n++ {
		if _, _, err := readAll(b[:n]); !errors.Is(err, ErrBadStream) {
			t.Fatalf("cut at %d: %v", n, err)
		}
	}
	if _, _, err := readAll(append(append([]byte(nil), b...), 0)); !errors.Is(err, ErrBadStream) || !strings.Contains(err.Error(), "follow the end") {
		t.Fatalf("trailing byte: %v", err)
	}
	// A flipped byte in each record type says which record it hit.
	names := []string{"header", "data", "provision", "discard", "data"}
	for i, off := range offs {
		c := append([]byte(nil), b...)
		c[off+frameHead] ^= 1
		_, _, err := readAll(c)
		if err == nil || !strings.Contains(err.Error(), "("+names[i]+")") || !strings.Contains(err.Error(), "checksum") {
			t.Fatalf("record %d (%s) corrupted: %v", i, names[i], err)
		}
	}
	// Swapping two records (each with a valid checksum) is out of order.
	sw := append([]byte(nil), b[:offs[2]]...)
	sw = append(sw, b[offs[3]:offs[4]]...)
	sw = append(sw, b[offs[2]:offs[3]]...)
	sw = append(sw, b[offs[4]:]...)
	if _, _, err := readAll(sw); !errors.Is(err, ErrBadStream) || !strings.Contains(err.Error(), "out of order") {
		t.Fatalf("swapped records: %v", err)
	}
	// A record dropped out of the middle.
	drop := append(append([]byte(nil), b[:offs[2]]...), b[offs[3]:]...)
	if _, _, err := readAll(drop); !errors.Is(err, ErrBadStream) || !strings.Contains(err.Error(), "out of order") {
		t.Fatalf("dropped record: %v", err)
	}
}

// reframe rewrites a record's number and checksum, as a buggy or hostile
// writer would, so the checks past the checksum are reached.
func reframe(rec []byte, seq uint64) []byte {
	rec = append([]byte(nil), rec...)
	binary.BigEndian.PutUint64(rec[1:], seq)
	n := len(rec) - frameTail
	binary.BigEndian.PutUint32(rec[n:], crcOf(rec[:n]))
	return rec
}

func crcOf(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

func TestValidRecordsInBadOrder(t *testing.T) {
	b, offs := sample(t)
	// Data, then the same data again renumbered: blocks go backwards.
	dup := append([]byte(nil), b[:offs[2]]...)
	dup = append(dup, reframe(b[offs[1]:offs[2]], 2)...)
	if _, _, err := readAll(dup); !errors.Is(err, ErrBadStream) || !strings.Contains(err.Error(), "out of order") {
		t.Fatalf("repeated range: %v", err)
	}
	// End record right after the header: counts short of the header's.
	end := len(b) - (frameHead + endLen + frameTail)
	early := append(append([]byte(nil), b[:offs[1]]...), reframe(b[end:], 1)...)
	if _, _, err := readAll(early); !errors.Is(err, ErrBadStream) || !strings.Contains(err.Error(), "totals") {
		t.Fatalf("early end: %v", err)
	}
	if _, err := NewReader(strings.NewReader("not a stream at all")); !errors.Is(err, ErrBadStream) || !strings.Contains(err.Error(), "not a thinblk stream") {
		t.Fatalf("garbage: %v", err)
	}
}

func TestWriterRefusesWhatReadersWould(t *testing.T) {
	h := Header{BlockSize: 4096, VolumeSize: 8 * 4096, Name: "s", ID: ID{1}, DataBlocks: 2}
	w, err := NewWriter(io.Discard, h)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Data(4, 1, false, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := w.Data(3, 1, false, make([]byte, 4096)); err == nil {
		t.Fatal("backwards range written")
	}
	if err := w.Close(); err == nil {
		t.Fatal("end written with fewer blocks than the header's")
	}
	if _, err := NewWriter(io.Discard, Header{BlockSize: 4096, VolumeSize: 4096, Name: "s", ID: ID{1}, DataBlocks: 2}); err == nil {
		t.Fatal("header with more blocks than the volume")
	}
}

// FuzzReader feeds arbitrary bytes to the decoder: it never panics or
// allocates beyond its limits, and what it accepts re-encodes to the
// same bytes.
func FuzzReader(f *testing.F) {
	b, offs := sample(f)
	f.Add(b)
	f.Add(b[:offs[2]])
	f.Add([]byte(magic))
	var full bytes.Buffer
	w, _ := NewWriter(&full, Header{BlockSize: 4096, VolumeSize: 4096, Name: "v", ID: ID{9}, DataBlocks: 1})
	_ = w.Data(0, 1, false, make([]byte, 4096))
	_ = w.Close()
	f.Add(full.Bytes())
	f.Fuzz(func(t *testing.T, in []byte) {
		h, recs, err := readAll(in)
		if err != nil {
			if !errors.Is(err, ErrBadStream) {
				t.Fatalf("error not ErrBadStream: %v", err)
			}
			return
		}
		var out bytes.Buffer
		w, err := NewWriter(&out, h)
		if err != nil {
			t.Fatalf("accepted header %+v refused by the writer: %v", h, err)
		}
		for _, r := range recs {
			switch r.Type {
			case TypeData:
				err = w.Data(r.First, r.Count, r.Provisioned, r.Data)
			case TypeProvision:
				err = w.Provision(r.First, r.Count)
			case TypeDiscard:
				err = w.Discard(r.First, r.Count)
			}
			if err != nil && r.Type == TypeData && r.Count > h.RunBlocks() {
				return // another writer's longer runs: valid to read, not what this one writes
			}
			if err != nil {
				t.Fatalf("accepted record %+v refused by the writer: %v", r, err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), in) {
			t.Fatal("accepted stream does not re-encode to the same bytes")
		}
	})
}

// DataFrame writes the same bytes as Data, framing the data in place.
func TestDataFrameMatchesData(t *testing.T) {
	want, _ := sample(t)
	var buf bytes.Buffer
	h := Header{Incremental: true, BlockSize: 4096, VolumeSize: 10*4096 + 512, Name: "s2", ID: ID{2}, BaseName: "s1", BaseID: ID{1},
		DataBlocks: 3, ProvisionBlocks: 2, DiscardBlocks: 1, ProvisionedDataBlocks: 1}
	w, err := NewWriter(&buf, h)
	if err != nil {
		t.Fatal(err)
	}
	frame := func(fill byte, n int) []byte {
		f := make([]byte, DataHeadroom+n+DataTailroom)
		for i := range n {
			f[DataHeadroom+i] = fill
		}
		return f
	}
	for _, err := range []error{
		w.DataFrame(1, 2, false, frame(0xab, 2*4096)),
		w.Provision(3, 2),
		w.Discard(6, 1),
		w.DataFrame(10, 1, true, frame(0xcd, 512)),
		w.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatal("DataFrame's stream differs from Data's")
	}
	w2, _ := NewWriter(io.Discard, h)
	if err := w2.DataFrame(1, 2, false, frame(0, 4096)); err == nil {
		t.Fatal("frame of the wrong length written")
	}
}
