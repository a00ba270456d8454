package blk

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/thinblk/thinblk/virtio"
)

// osStorage is a file-backed Storage for the in-package tests.
type osStorage struct {
	f    *os.File
	size uint64
}

func (s *osStorage) Size() uint64 { return s.size }
func (s *osStorage) ReadAt(bufs [][]byte, off int64) error {
	for _, b := range bufs {
		if _, err := s.f.ReadAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}
func (s *osStorage) WriteAt(bufs [][]byte, off int64) error {
	for _, b := range bufs {
		if _, err := s.f.WriteAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}
func (s *osStorage) Flush() error { return nil } // durability is not under test here
func (s *osStorage) Discard(off, length int64) error {
	return s.WriteZeroes(off, length, true)
}
func (s *osStorage) WriteZeroes(off, length int64, unmap bool) error {
	_, err := s.f.WriteAt(make([]byte, length), off)
	return err
}

func newOSStorage(t testing.TB, size int64) *osStorage {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "fuzz.img"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return &osStorage{f: f, size: uint64(size)}
}

// fuzzChain cuts data into a chain: byte 0 holds the number of readable
// (low nibble) and writable (high nibble) segments, then one length byte
// per segment (scaled by 4 when the top bit is set), then the contents of
// the readable segments.
func fuzzChain(data []byte) *virtio.Chain {
	c := &virtio.Chain{}
	if len(data) == 0 {
		return c
	}
	nr, nw := int(data[0]&7), int(data[0]>>4&7)
	data = data[1:]
	lens := make([]int, 0, nr+nw)
	for range nr + nw {
		if len(data) == 0 {
			break
		}
		l := int(data[0] & 0x7f)
		if data[0]&0x80 != 0 {
			l *= 64
		}
		lens = append(lens, l)
		data = data[1:]
	}
	for i, l := range lens {
		if l == 0 {
			continue
		}
		seg := make([]byte, l)
		if i < nr {
			data = data[copy(seg, data):]
			c.Readable = append(c.Readable, seg)
			c.ReadLen += uint64(l)
		} else {
			for k := range seg {
				seg[k] = 0xee
			}
			c.Writable = append(c.Writable, seg)
			c.WriteLen += uint64(l)
		}
	}
	return c
}

func fuzzReq(typ uint32, sector uint64, payload []byte, nWrite int, wlen byte) []byte {
	hdr := make([]byte, 16)
	le.PutUint32(hdr, typ)
	le.PutUint64(hdr[8:], sector)
	b := []byte{byte(2 | nWrite<<4), 16, byte(len(payload))}
	if len(payload) > 127 {
		b[2] = 0x80 | byte(len(payload)/64)
	}
	for range nWrite {
		b = append(b, wlen)
	}
	return append(append(b, hdr...), payload...)
}

func FuzzRequest(f *testing.F) {
	seg := make([]byte, 16)
	le.PutUint64(seg, 1)
	le.PutUint32(seg[8:], 2)
	f.Add(fuzzReq(TypeIn, 0, nil, 2, 0x88))
	f.Add(fuzzReq(TypeOut, 1, bytes.Repeat([]byte{5}, 512), 1, 1))
	f.Add(fuzzReq(TypeFlush, 0, nil, 1, 1))
	f.Add(fuzzReq(TypeGetID, 0, nil, 2, 20))
	f.Add(fuzzReq(TypeDiscard, 0, seg, 1, 1))
	f.Add(fuzzReq(TypeWriteZeroes, 0, seg, 1, 1))
	f.Add(fuzzReq(TypeWriteZeroes, 0, append(seg, seg...), 1, 1))
	f.Add(fuzzReq(99, 0, nil, 1, 1))
	f.Add([]byte{0x21, 3, 1, 0, 0, 0})

	const diskBytes = 64 << 10
	storage := newOSStorage(f, diskBytes)
	d, err := New(storage, Options{Serial: "fuzz"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c := fuzzChain(data)
		var r request
		written, _, _ := d.serve(c, &r)
		if uint64(written) > c.WriteLen {
			t.Fatalf("reported %d written of %d writable", written, c.WriteLen)
		}
		if len(c.Writable) == 0 {
			if written != 0 {
				t.Fatalf("no writable buffer but %d written", written)
			}
			return
		}
		last := c.Writable[len(c.Writable)-1]
		status := last[len(last)-1]
		if status > StatusUnsupp {
			t.Fatalf("status %d", status)
		}
		if c.ReadLen < RequestHeaderSize {
			if status != StatusIOErr {
				t.Fatalf("short header: status %d", status)
			}
			return
		}
		var hdr [16]byte
		gather(hdr[:], c.Readable, 0)
		typ, sector := le.Uint32(hdr[:])&^typeBarrier, le.Uint64(hdr[8:])
		if typ == TypeIn && status == StatusOK {
			n := c.WriteLen - 1
			if n%SectorSize != 0 || sector*SectorSize+n > diskBytes {
				t.Fatalf("read of %d at sector %d succeeded", n, sector)
			}
			got := make([]byte, n)
			gather(got, c.Writable, 0)
			want := make([]byte, n)
			storage.f.ReadAt(want, int64(sector*SectorSize))
			if !bytes.Equal(got, want) {
				t.Fatal("read data differs from the file")
			}
		}
		if typ == TypeOut && status == StatusOK {
			n := c.ReadLen - RequestHeaderSize
			if n%SectorSize != 0 || sector*SectorSize+n > diskBytes {
				t.Fatalf("write of %d at sector %d succeeded", n, sector)
			}
		}
	})
}
