package handover

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func socketPair(t *testing.T) (*Conn, *Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *Conn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return NewConn(c.(*net.UnixConn))
	}
	a, b := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// tagged is a pipe whose write end carries tag; the receiver reads it back
// from the read end, which proves which descriptor arrived where.
func tagged(t *testing.T, tag string) (read *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteString(tag); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() { r.Close() })
	return r
}

func readTag(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestStateRoundTrip(t *testing.T) {
	a, b := socketPair(t)
	st := &State{Servers: []Server{
		{Name: "/srv/pool/vm1.sock", Listener: tagged(t, "ln1"), Sessions: []Session{{
			Conn: tagged(t, "conn1"),
			Replay: []Request{
				{Request: 2, Payload: []byte{1, 2, 3, 4, 5, 6, 7, 8}},
				{Request: 37, Payload: bytes.Repeat([]byte{9}, 40), Files: []*os.File{tagged(t, "mem0"), tagged(t, "mem1")}},
				{Request: 12, Payload: []byte{0, 0, 0, 0, 0, 0, 0, 0}, Files: []*os.File{tagged(t, "kick0")}},
			},
		}}},
		{Name: "/srv/pool/vm2.sock", Listener: tagged(t, "ln2")},
	}}
	errc := make(chan error, 1)
	go func() { errc <- a.SendState(st) }()
	got, err := ReadState(b)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if len(got.Servers) != 2 || got.Servers[0].Name != "/srv/pool/vm1.sock" || got.Servers[1].Name != "/srv/pool/vm2.sock" {
		t.Fatalf("servers: %+v", got.Servers)
	}
	if tag := readTag(t, got.Servers[0].Listener); tag != "ln1" {
		t.Errorf("listener 1 is %q", tag)
	}
	if tag := readTag(t, got.Servers[1].Listener); tag != "ln2" {
		t.Errorf("listener 2 is %q", tag)
	}
	if len(got.Servers[1].Sessions) != 0 || len(got.Servers[0].Sessions) != 1 {
		t.Fatalf("sessions: %d and %d", len(got.Servers[0].Sessions), len(got.Servers[1].Sessions))
	}
	se := got.Servers[0].Sessions[0]
	if tag := readTag(t, se.Conn); tag != "conn1" {
		t.Errorf("connection is %q", tag)
	}
	if len(se.Replay) != 3 {
		t.Fatalf("%d requests, want 3", len(se.Replay))
	}
	for i, want := range st.Servers[0].Sessions[0].Replay {
		r := se.Replay[i]
		if r.Request != want.Request || !bytes.Equal(r.Payload, want.Payload) || len(r.Files) != len(want.Files) {
			t.Errorf("request %d: %d %x (%d fds), want %d %x (%d fds)", i, r.Request, r.Payload, len(r.Files), want.Request, want.Payload, len(want.Files))
		}
	}
	for i, want := range []string{"mem0", "mem1"} {
		if tag := readTag(t, se.Replay[1].Files[i]); tag != want {
			t.Errorf("memory fd %d is %q", i, tag)
		}
	}
	if tag := readTag(t, se.Replay[2].Files[0]); tag != "kick0" {
		t.Errorf("kick fd is %q", tag)
	}

	// The answer.
	go func() { errc <- b.Answer(errors.New("pool would not open")) }()
	if err := a.ReadAnswer(); !errors.Is(err, ErrAborted) || !strings.Contains(err.Error(), "pool would not open") {
		t.Errorf("abort answer: %v", err)
	}
	<-errc
	go func() { errc <- b.Answer(nil) }()
	if err := a.ReadAnswer(); err != nil {
		t.Errorf("done answer: %v", err)
	}
	<-errc
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func frameBytes(k Kind, payload []byte, files uint32) []byte {
	b := make([]byte, HeaderSize)
	Header{Version: Version, Kind: k, Size: uint32(len(payload)), Files: files}.encode(b)
	return append(b, payload...)
}

func u32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

// TestBadStreams: each broken stream is refused with every descriptor it
// brought closed.
func TestBadStreams(t *testing.T) {
	ln := frameBytes(KindListener, []byte("s"), 1)
	cases := map[string][]byte{
		"bad magic":              append([]byte("XBHO"), frameBytes(KindEnd, nil, 0)[4:]...),
		"unknown kind":           frameBytes(Kind(99), nil, 0),
		"too large":              frameBytes(KindReplay, make([]byte, MaxPayload+1), 0),
		"too many fds":           frameBytes(KindReplay, u32(1), MaxFiles+1),
		"session first":          frameBytes(KindSession, u32(0), 1),
		"replay outside session": concat(ln, frameBytes(KindReplay, u32(1), 0)),
		"session of other":       concat(ln, frameBytes(KindSession, u32(1), 1)),
		"listener without fd":    frameBytes(KindListener, []byte("s"), 0),
		"listener without name":  frameBytes(KindListener, nil, 1),
		"server twice":           concat(ln, ln),
		"short replay":           concat(ln, frameBytes(KindSession, u32(0), 1), frameBytes(KindReplay, []byte{1, 2}, 0)),
		"three sessions": concat(ln, frameBytes(KindSession, u32(0), 1), frameBytes(KindSession, u32(0), 1),
			frameBytes(KindSession, u32(0), 1)),
		"answer in state":  concat(ln, frameBytes(KindDone, nil, 0)),
		"end with payload": concat(ln, frameBytes(KindEnd, []byte{1}, 0)),
		"truncated":        concat(ln, frameBytes(KindSession, u32(0), 1))[:HeaderSize+1+HeaderSize+2],
		"no end":           ln,
	}
	// Old versions are refused: bump the version byte of an End frame.
	old := frameBytes(KindEnd, nil, 0)
	old[4] = Version + 1
	cases["other version"] = old
	before := openFDs(t)
	for name, stream := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := ReadState(&byteFrames{t: t, r: bytes.NewReader(stream)}); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open after the bad streams, %d before", after, before)
	}
}

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestFrameDescriptorCountChecked: over a real socket, a frame whose
// descriptors differ from its header's count is refused (and the ones
// that came are closed).
func TestFrameDescriptorCountChecked(t *testing.T) {
	a, b := socketPair(t)
	before := openFDs(t)
	go func() {
		// A header that claims 2 descriptors, with 1.
		buf := frameBytes(KindReplay, u32(1), 2)
		r := tagged(t, "x")
		a.uc.WriteMsgUnix(buf, unix.UnixRights(int(r.Fd())), nil)
	}()
	if _, err := b.ReadFrame(); err == nil || !strings.Contains(err.Error(), "descriptors") {
		t.Fatalf("read: %v", err)
	}
	if after := openFDs(t); after > before+1 { // the sender's pipe end
		t.Errorf("%d descriptors open, %d before", after, before)
	}
}

// byteFrames decodes frames from bytes; a frame's descriptors are /dev/null
// opened as many times as its header says (the fuzz test has no socket).
type byteFrames struct {
	t testing.TB
	r io.Reader
}

func (b *byteFrames) ReadFrame() (Frame, error) {
	var hdr [HeaderSize]byte
	if _, err := io.ReadFull(b.r, hdr[:]); err != nil {
		return Frame{}, err
	}
	h, err := DecodeHeader(hdr[:])
	if err != nil {
		return Frame{}, err
	}
	f := Frame{Kind: h.Kind, Payload: make([]byte, h.Size)}
	for range h.Files {
		x, err := os.Open(os.DevNull)
		if err != nil {
			b.t.Fatal(err)
		}
		f.Files = append(f.Files, x)
	}
	if _, err := io.ReadFull(b.r, f.Payload); err != nil {
		return f, err
	}
	return f, nil
}

func FuzzReadState(f *testing.F) {
	ln := frameBytes(KindListener, []byte("/srv/pool/vm.sock"), 1)
	se := frameBytes(KindSession, u32(0), 1)
	f.Add(concat(ln, se, frameBytes(KindReplay, append(u32(2), make([]byte, 8)...), 0), frameBytes(KindReplay, append(u32(12), make([]byte, 8)...), 1), frameBytes(KindEnd, nil, 0)))
	f.Add(concat(ln, frameBytes(KindEnd, nil, 0)))
	f.Add(frameBytes(KindEnd, nil, 0))
	f.Add(concat(ln, se, se, se))
	f.Add(frameBytes(KindReplay, u32(1), 9))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ReadState(&byteFrames{t: t, r: bytes.NewReader(data)})
		if err != nil {
			return
		}
		defer st.Close()
		// What was accepted is well formed and sends again.
		for _, sv := range st.Servers {
			if sv.Listener == nil || sv.Name == "" || len(sv.Sessions) > MaxSessions {
				t.Fatalf("accepted server %+v", sv)
			}
			for _, s := range sv.Sessions {
				if s.Conn == nil || len(s.Replay) > MaxReplay {
					t.Fatal("accepted a session without a connection or too many requests")
				}
			}
		}
		if _, err := st.frames(); err != nil {
			t.Fatalf("accepted state does not encode: %v", err)
		}
	})
}
