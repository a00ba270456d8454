package vhostuser

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"reflect"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func FuzzDecoders(f *testing.F) {
	f.Add(EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: 1 << 20, UserAddr: 0x7f00, MmapOffset: 0}}))
	f.Add(EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 32, Size: 4096, UserAddr: 1, MmapOffset: 2}))
	f.Add(VringAddr{Index: 1, DescUser: 0x1000, AvailUser: 0x2000, UsedUser: 0x3000}.Encode())
	f.Add(ConfigSpace{Offset: 4, Data: []byte{1, 2, 3}}.Encode())
	f.Add(ConfigSpace{Offset: 255, Data: []byte{1, 2}}.Encode())
	f.Add(Inflight{MmapSize: 4096, NumQueues: 2, QueueSize: 128}.Encode())
	f.Add(LogBase{MmapSize: 4096, MmapOffset: 8}.Encode())
	f.Add(LogBase{MmapSize: 4096, MmapOffset: 3}.Encode())
	f.Add([]byte{1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0})
	f.Add([]byte{9, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := DecodeHeader(b); err == nil {
			if h.Size > MaxPayload || h.Flags&FlagVersionMask != FlagVersion {
				t.Fatalf("accepted header %+v", h)
			}
			enc := make([]byte, HeaderSize)
			h.encode(enc)
			if !bytes.Equal(enc, b[:HeaderSize]) {
				t.Fatal("header does not round-trip")
			}
		}
		if regs, err := DecodeMemTable(b); err == nil {
			if len(regs) == 0 || len(regs) > MaxBaselineRegions {
				t.Fatalf("%d regions accepted", len(regs))
			}
			back, _ := DecodeMemTable(EncodeMemTable(regs))
			if !reflect.DeepEqual(back, regs) {
				t.Fatal("memory table does not round-trip")
			}
		}
		if r, err := DecodeSingleRegion(b); err == nil {
			if back, _ := DecodeSingleRegion(EncodeSingleRegion(r)); back != r {
				t.Fatal("region does not round-trip")
			}
		}
		if s, err := DecodeVringState(b); err == nil {
			if back, _ := DecodeVringState(s.Encode()); back != s {
				t.Fatal("vring state does not round-trip")
			}
		}
		if a, err := DecodeVringAddr(b); err == nil {
			if back, _ := DecodeVringAddr(a.Encode()); back != a {
				t.Fatal("vring address does not round-trip")
			}
		}
		if c, err := DecodeConfigSpace(b); err == nil {
			if uint64(c.Offset)+uint64(len(c.Data)) > MaxConfigSize {
				t.Fatalf("config access [%d,+%d) accepted", c.Offset, len(c.Data))
			}
			back, err := DecodeConfigSpace(c.Encode())
			if err != nil || back.Offset != c.Offset || back.Flags != c.Flags || !bytes.Equal(back.Data, c.Data) {
				t.Fatal("config space does not round-trip")
			}
		}
		if in, err := DecodeInflight(b); err == nil {
			if back, _ := DecodeInflight(in.Encode()); back != in {
				t.Fatal("inflight does not round-trip")
			}
		}
		if l, err := DecodeLogBase(b); err == nil {
			if l.MmapSize == 0 || l.MmapSize > maxLogSize || l.MmapOffset%8 != 0 || l.MmapOffset > maxRegionSize {
				t.Fatalf("log %+v accepted", l)
			}
			if back, _ := DecodeLogBase(l.Encode()); back != l {
				t.Fatal("log base does not round-trip")
			}
		}
		if v, err := DecodeU64(b); err == nil && binary.LittleEndian.Uint64(EncodeU64(v)) != v {
			t.Fatal("u64 does not round-trip")
		}
	})
}

// discardWriter accepts replies and checks they are well-formed.
type discardWriter struct{ t *testing.T }

func (w discardWriter) Write(h Header, payload []byte, files ...*os.File) error {
	wantFiles := 0
	if h.Request == ReqGetInflightFd {
		wantFiles = 1
	}
	if !h.IsReply() || len(payload) > MaxPayload || len(files) != wantFiles {
		w.t.Fatalf("bad reply %+v (%d bytes, %d fds)", h, len(payload), len(files))
	}
	return nil
}

// Fuzz input for the session: records of
// [request][flags][fds: count in bits 0-2, eventfd instead of memfd in bit 7][len u8][payload].
const fuzzRAM = 1 << 16

func fuzzRecord(req Request, flags uint32, fds byte, payload []byte) []byte {
	return append([]byte{byte(req), byte(flags), fds, byte(len(payload))}, payload...)
}

func fuzzSeed() []byte {
	var b []byte
	add := func(req Request, fds byte, payload []byte) {
		b = append(b, fuzzRecord(req, FlagVersion|FlagNeedReply, fds, payload)...)
	}
	add(ReqGetFeatures, 0, nil)
	add(ReqSetProtocolFeatures, 0, EncodeU64(OfferedProtocolFeatures))
	add(ReqSetFeatures, 0, EncodeU64(1<<FeatureProtocolFeatures|1<<29|1<<32))
	add(ReqSetMemTable, 1, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, Size: fuzzRAM, UserAddr: 0x10000}}))
	add(ReqGetInflightFd, 0, Inflight{NumQueues: 2, QueueSize: 64}.Encode())
	add(ReqSetVringNum, 0, VringState{Index: 0, Num: 64}.Encode())
	add(ReqSetVringBase, 0, VringState{Index: 0, Num: 5}.Encode())
	add(ReqSetVringAddr, 0, VringAddr{Index: 0, DescUser: 0x10000, AvailUser: 0x11000, UsedUser: 0x12000}.Encode())
	add(ReqSetVringKick, 0x81, EncodeU64(0))
	add(ReqSetVringCall, 0x81, EncodeU64(0))
	add(ReqSetVringEnable, 0, VringState{Index: 0, Num: 1}.Encode())
	add(ReqAddMemReg, 1, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 1 << 20, Size: 0x1000, UserAddr: 0x100000}))
	add(ReqGetConfig, 0, ConfigSpace{Offset: 0, Data: make([]byte, 8)}.Encode())
	add(ReqRemMemReg, 0, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 0, Size: fuzzRAM, UserAddr: 0x10000}))
	// A migration's dirty logging on the running ring, then off.
	add(ReqSetLogBase, 1, LogBase{MmapSize: 64}.Encode())
	add(ReqSetFeatures, 0, EncodeU64(1<<FeatureProtocolFeatures|1<<29|1<<32|1<<FeatureLogAll))
	add(ReqSetVringAddr, 0, VringAddr{Index: 0, Flags: VringFlagLog, DescUser: 0x10000, AvailUser: 0x11000, UsedUser: 0x12000, LogGuest: 0x2000}.Encode())
	add(ReqSetLogFd, 0x81, nil)
	add(ReqSetFeatures, 0, EncodeU64(1<<FeatureProtocolFeatures|1<<29|1<<32))
	add(ReqGetVringBase, 0, VringState{Index: 0}.Encode())
	add(ReqResetDevice, 0, nil)
	return b
}

func FuzzSession(f *testing.F) {
	f.Add(fuzzSeed())
	f.Add(fuzzRecord(ReqSetMemTable, FlagVersion, 2, EncodeMemTable([]MemoryRegion{
		{GuestPhysAddr: 0, Size: 0x8000, UserAddr: 0x10000},
		{GuestPhysAddr: 0x8000, Size: 0x8000, UserAddr: 0x18000, MmapOffset: 0x8000}})))
	f.Add(fuzzRecord(ReqSetVringKick, FlagVersion, 0, EncodeU64(VringNoFd|1)))
	f.Fuzz(func(t *testing.T, in []byte) { runSession(t, in) })
}

// TestFuzzSeed checks the seed really drives a ring through start, the
// memory changes and stop, so the fuzzer starts from deep states.
func TestFuzzSeed(t *testing.T) {
	dev := runSession(t, fuzzSeed())
	dev.mu.Lock()
	defer dev.mu.Unlock()
	if len(dev.starts) < 2 || len(dev.stops) < 2 {
		t.Fatalf("seed started %d and stopped %d queues; events %v", len(dev.starts), len(dev.stops), dev.events)
	}
}

// runSession feeds the records of in to a session, as the server would.
func runSession(t *testing.T, in []byte) *fakeDevice {
	{
		ramFd, err := unix.MemfdCreate("fuzz-ram", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(ramFd)
		if err := unix.Ftruncate(ramFd, fuzzRAM); err != nil {
			t.Fatal(err)
		}
		dev := newFakeDevice()
		s := newSession(slog.New(slog.DiscardHandler), dev, discardWriter{t})
		for len(in) >= 4 {
			req, flags, fds, n := Request(in[0]), uint32(in[1]), in[2], int(in[3])
			in = in[4:]
			if n > len(in) {
				n = len(in)
			}
			m := Message{Header: Header{Request: req, Flags: flags, Size: uint32(n)}, Payload: in[:n]}
			in = in[n:]
			for i := 0; i < int(fds&7); i++ {
				var fd int
				if fds&0x80 != 0 {
					fd, err = unix.Eventfd(0, unix.EFD_CLOEXEC)
				} else {
					fd, err = unix.Dup(ramFd)
				}
				if err != nil {
					t.Fatal(err)
				}
				m.Files = append(m.Files, os.NewFile(uintptr(fd), "fuzz"))
			}
			if err := s.dispatch(&m); err != nil {
				break // the server would close the connection here
			}
			if m.Files != nil {
				t.Fatal("descriptors left open after dispatch")
			}
		}
		s.close()
		if dev.numRunning() != 0 {
			t.Fatal("queues running after the session closed")
		}
		return dev
	}
}

// FuzzWire writes raw bytes (with descriptors attached to the first
// write) to a live server. Whatever it makes of them, it must not panic,
// must close or keep serving the connection, and must serve the next
// front-end.
func FuzzWire(f *testing.F) {
	hdr := func(req Request, flags uint32, payload []byte) []byte {
		b := make([]byte, HeaderSize)
		Header{Request: req, Flags: flags, Size: uint32(len(payload))}.encode(b)
		return append(b, payload...)
	}
	f.Add(hdr(ReqGetFeatures, FlagVersion, nil), byte(0))
	f.Add(append(hdr(ReqSetProtocolFeatures, FlagVersion, EncodeU64(OfferedProtocolFeatures)),
		hdr(ReqSetMemTable, FlagVersion|FlagNeedReply, EncodeMemTable([]MemoryRegion{{Size: fuzzRAM, UserAddr: 0x10000}}))...), byte(1))
	f.Add(hdr(ReqSetVringKick, FlagVersion, EncodeU64(1)), byte(3))
	f.Add(hdr(ReqGetConfig, FlagVersion, ConfigSpace{Data: make([]byte, 60)}.Encode())[:20], byte(0))
	dev := newFakeDevice()
	ts := startServer(f, dev)
	ram := newGuestRAM(f, fuzzRAM)
	f.Fuzz(func(t *testing.T, data []byte, nfds byte) {
		uc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ts.path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		defer uc.Close()
		uc.SetDeadline(time.Now().Add(10 * time.Second))
		var oob []byte
		if n := int(nfds % (MaxFds + 3)); n > 0 && len(data) > 0 {
			fds := make([]int, n)
			for i := range fds {
				fds[i] = int(ram.file.Fd())
			}
			oob = unix.UnixRights(fds...)
		}
		if len(data) > 0 {
			if _, _, err := uc.WriteMsgUnix(data, oob, nil); err != nil && !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatal(err)
			}
		}
		// Half-close, then read replies until the server closes: by then
		// it has torn the connection down and is ready for the next one.
		uc.CloseWrite()
		if _, err := io.Copy(io.Discard, uc); err != nil && !isClosed(err) {
			t.Fatalf("server neither answered nor closed: %v", err)
		}
	})
}

// TestWireLayout holds each fixed-size payload to its layout in the
// specification (vhost-user.rst, "Message types"): field order, widths and
// padding, with every field distinct so a swapped or misplaced one shows.
func TestWireLayout(t *testing.T) {
	le := binary.LittleEndian
	u32s := func(b []byte, vs ...uint32) []byte {
		for _, v := range vs {
			b = le.AppendUint32(b, v)
		}
		return b
	}
	u64s := func(b []byte, vs ...uint64) []byte {
		for _, v := range vs {
			b = le.AppendUint64(b, v)
		}
		return b
	}
	region := MemoryRegion{GuestPhysAddr: 0x11, Size: 0x22, UserAddr: 0x33, MmapOffset: 0x44}
	regionWire := u64s(nil, 0x11, 0x22, 0x33, 0x44)
	inflightWire := le.AppendUint16(le.AppendUint16(u64s(nil, 0x55, 0x66), 7), 8)
	inflightWire = append(inflightWire, 0, 0, 0, 0)
	for _, c := range []struct {
		name string
		got  []byte
		want []byte
	}{
		{"VringState", VringState{Index: 1, Num: 2}.Encode(), u32s(nil, 1, 2)},
		{"VringAddr", VringAddr{Index: 1, Flags: 2, DescUser: 3, UsedUser: 4, AvailUser: 5, LogGuest: 6}.Encode(),
			u64s(u32s(nil, 1, 2), 3, 4, 5, 6)},
		{"Inflight", Inflight{MmapSize: 0x55, MmapOffset: 0x66, NumQueues: 7, QueueSize: 8}.Encode(), inflightWire},
		{"LogBase", LogBase{MmapSize: 0x77, MmapOffset: 0x88}.Encode(), u64s(nil, 0x77, 0x88)},
		{"SingleRegion", EncodeSingleRegion(region), append(make([]byte, 8), regionWire...)},
		{"MemTable", EncodeMemTable([]MemoryRegion{region, region}),
			append(append(u32s(nil, 2, 0), regionWire...), regionWire...)},
	} {
		if !bytes.Equal(c.got, c.want) {
			t.Errorf("%s on the wire:\n got %x\nwant %x", c.name, c.got, c.want)
		}
	}
	if len(inflightWire) != inflightSize || len(regionWire) != memoryRegionSize {
		t.Fatal("the expected layouts disagree with the sizes the decoders check")
	}
	if in, err := DecodeInflight(inflightWire); err != nil || in != (Inflight{MmapSize: 0x55, MmapOffset: 0x66, NumQueues: 7, QueueSize: 8}) {
		t.Errorf("DecodeInflight = %+v, %v", in, err)
	}
	for _, c := range []struct {
		name   string
		size   int
		decode func([]byte) error
	}{
		{"VringState", 8, func(b []byte) error { _, err := DecodeVringState(b); return err }},
		{"VringAddr", vringAddrSize, func(b []byte) error { _, err := DecodeVringAddr(b); return err }},
		{"Inflight", inflightSize, func(b []byte) error { _, err := DecodeInflight(b); return err }},
		{"LogBase", logBaseSize, func(b []byte) error { _, err := DecodeLogBase(b); return err }},
		{"SingleRegion", 8 + memoryRegionSize, func(b []byte) error { _, err := DecodeSingleRegion(b); return err }},
	} {
		if err := c.decode(make([]byte, c.size-1)); !errors.Is(err, ErrShortPayload) {
			t.Errorf("%s of %d bytes (one short): %v, want ErrShortPayload", c.name, c.size-1, err)
		}
	}
}
