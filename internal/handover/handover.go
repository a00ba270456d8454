// Package handover is the wire format by which a running `thinblk serve`
// hands its vhost-user sessions to a new serve process without the
// front-end (QEMU) seeing a disconnect: the listening sockets, each
// connection, and each session's state as a list of vhost-user requests to
// replay (features, memory table, in-flight area, ring sizes, addresses,
// bases and eventfds), the descriptors travelling with SCM_RIGHTS.
//
// Replaying requests instead of inventing a second state format means the
// receiving process checks a handed-over session with the same validation
// as one set up by a front-end.
//
// A stream is a sequence of frames. Each frame is a 16-byte header (magic
// "TBHO", version, kind, payload length, descriptor count; little endian)
// followed by its payload; its descriptors arrive with the header. The
// sender's frames are: one Listener per server, then for each session a
// Session frame and its Replay frames, then End. The receiver answers Done
// (it took everything) or Abort (the sender keeps serving).
package handover

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/thinblk/thinblk/internal/unixsock"
)

// Version is the only version this package reads and writes.
const Version = 1

const (
	// HeaderSize is the size of a frame header.
	HeaderSize = 16
	// MaxPayload bounds one frame's payload (a replayed vhost-user request
	// is at most 4 KiB, a name at most a path).
	MaxPayload = 8192
	// MaxFiles bounds the descriptors of one frame (a vhost-user request
	// carries at most 8).
	MaxFiles = 8
	// MaxServers, MaxSessions and MaxReplay bound a stream, so that a
	// broken or hostile sender cannot make the receiver hold unbounded
	// descriptors: a serve has one server per volume, a server at most two
	// sessions (a live migration's ends), a session a few requests per
	// ring (256 rings).
	MaxServers  = 65536
	MaxSessions = 2
	MaxReplay   = 8*256 + 256
)

var magic = [4]byte{'T', 'B', 'H', 'O'}

// Kind says what a frame carries.
type Kind uint16

const (
	// KindListener: a server's listening socket (1 descriptor); payload:
	// the server's name (its socket path).
	KindListener Kind = iota + 1
	// KindSession: one front-end connection (1 descriptor); payload: the
	// index of its server (u32, in Listener order).
	KindSession
	// KindReplay: one vhost-user request to replay into the last session
	// (0..8 descriptors); payload: request (u32), then its payload.
	KindReplay
	// KindEnd: the sender has sent everything; no payload.
	KindEnd
	// KindDone: the receiver took the sessions; no payload.
	KindDone
	// KindAbort: the receiver cannot take them; payload: the reason.
	KindAbort
)

func (k Kind) String() string {
	names := [...]string{"", "listener", "session", "replay", "end", "done", "abort"}
	if int(k) < len(names) && k != 0 {
		return names[k]
	}
	return fmt.Sprintf("kind(%d)", uint16(k))
}

// Header is a decoded frame header.
type Header struct {
	Version uint16
	Kind    Kind
	Size    uint32 // payload bytes
	Files   uint32 // descriptors carried
}

// DecodeHeader checks and decodes a frame header.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) != HeaderSize {
		return Header{}, fmt.Errorf("handover: header of %d bytes, want %d", len(b), HeaderSize)
	}
	if [4]byte(b[:4]) != magic {
		return Header{}, fmt.Errorf("handover: bad magic %q", b[:4])
	}
	h := Header{
		Version: binary.LittleEndian.Uint16(b[4:]),
		Kind:    Kind(binary.LittleEndian.Uint16(b[6:])),
		Size:    binary.LittleEndian.Uint32(b[8:]),
		Files:   binary.LittleEndian.Uint32(b[12:]),
	}
	switch {
	case h.Version != Version:
		return Header{}, fmt.Errorf("handover: version %d, this process speaks %d", h.Version, Version)
	case h.Kind < KindListener || h.Kind > KindAbort:
		return Header{}, fmt.Errorf("handover: unknown frame %v", h.Kind)
	case h.Size > MaxPayload:
		return Header{}, fmt.Errorf("handover: %v frame of %d bytes (max %d)", h.Kind, h.Size, MaxPayload)
	case h.Files > MaxFiles:
		return Header{}, fmt.Errorf("handover: %v frame with %d descriptors (max %d)", h.Kind, h.Files, MaxFiles)
	}
	return h, nil
}

func (h Header) encode(b []byte) {
	copy(b, magic[:])
	binary.LittleEndian.PutUint16(b[4:], h.Version)
	binary.LittleEndian.PutUint16(b[6:], uint16(h.Kind))
	binary.LittleEndian.PutUint32(b[8:], h.Size)
	binary.LittleEndian.PutUint32(b[12:], h.Files)
}

// Frame is one frame with its descriptors; the receiver owns Files.
type Frame struct {
	Kind    Kind
	Payload []byte
	Files   []*os.File
}

func (f *Frame) closeFiles() {
	unixsock.CloseFiles(f.Files)
	f.Files = nil
}

// State is everything handed over.
type State struct {
	Servers []Server
}

// Server is one listening socket and the sessions on it.
type Server struct {
	Name     string // the socket path
	Listener *os.File
	Sessions []Session
}

// Session is one front-end connection and the requests that rebuild its
// state in the receiving process.
type Session struct {
	Conn   *os.File
	Replay []Request
}

// Request is one vhost-user request to replay.
type Request struct {
	Request uint32
	Payload []byte
	Files   []*os.File
}

// Close closes every descriptor of the state.
func (st *State) Close() {
	if st == nil {
		return
	}
	for i := range st.Servers {
		sv := &st.Servers[i]
		closeFile(&sv.Listener)
		for j := range sv.Sessions {
			se := &sv.Sessions[j]
			closeFile(&se.Conn)
			for k := range se.Replay {
				for l := range se.Replay[k].Files {
					closeFile(&se.Replay[k].Files[l])
				}
			}
		}
	}
}

func closeFile(f **os.File) {
	if *f != nil {
		(*f).Close()
		*f = nil
	}
}

// frames lists the frames that carry st, ending with End.
func (st *State) frames() ([]Frame, error) {
	if len(st.Servers) > MaxServers {
		return nil, fmt.Errorf("handover: %d servers (max %d)", len(st.Servers), MaxServers)
	}
	var out []Frame
	for i, sv := range st.Servers {
		if sv.Listener == nil {
			return nil, fmt.Errorf("handover: server %q without a listener", sv.Name)
		}
		if len(sv.Name) == 0 || len(sv.Name) > MaxPayload {
			return nil, fmt.Errorf("handover: server name of %d bytes", len(sv.Name))
		}
		if len(sv.Sessions) > MaxSessions {
			return nil, fmt.Errorf("handover: server %q has %d sessions (max %d)", sv.Name, len(sv.Sessions), MaxSessions)
		}
		out = append(out, Frame{Kind: KindListener, Payload: []byte(sv.Name), Files: []*os.File{sv.Listener}})
		for _, se := range sv.Sessions {
			if se.Conn == nil {
				return nil, fmt.Errorf("handover: a session of %q without a connection", sv.Name)
			}
			if len(se.Replay) > MaxReplay {
				return nil, fmt.Errorf("handover: a session of %q has %d requests (max %d)", sv.Name, len(se.Replay), MaxReplay)
			}
			out = append(out, Frame{Kind: KindSession, Payload: binary.LittleEndian.AppendUint32(nil, uint32(i)), Files: []*os.File{se.Conn}})
			for _, r := range se.Replay {
				if len(r.Payload)+4 > MaxPayload || len(r.Files) > MaxFiles {
					return nil, fmt.Errorf("handover: request %d of %d bytes with %d descriptors", r.Request, len(r.Payload), len(r.Files))
				}
				p := binary.LittleEndian.AppendUint32(make([]byte, 0, 4+len(r.Payload)), r.Request)
				out = append(out, Frame{Kind: KindReplay, Payload: append(p, r.Payload...), Files: r.Files})
			}
		}
	}
	return append(out, Frame{Kind: KindEnd}), nil
}

// FrameReader yields frames (a Conn; a byte decoder in the fuzz test).
type FrameReader interface {
	ReadFrame() (Frame, error)
}

// ReadState reads frames up to End and assembles the state. On error
// every descriptor received is closed.
func ReadState(r FrameReader) (*State, error) {
	st := &State{}
	fail := func(f *Frame, err error) (*State, error) {
		f.closeFiles()
		st.Close()
		return nil, err
	}
	var cur *Session
	for {
		f, err := r.ReadFrame()
		if err != nil {
			return fail(&f, err)
		}
		switch f.Kind {
		case KindListener:
			if len(f.Files) != 1 || len(f.Payload) == 0 {
				return fail(&f, fmt.Errorf("handover: listener frame with %d descriptors and a name of %d bytes", len(f.Files), len(f.Payload)))
			}
			if len(st.Servers) == MaxServers {
				return fail(&f, fmt.Errorf("handover: more than %d servers", MaxServers))
			}
			for _, sv := range st.Servers {
				if sv.Name == string(f.Payload) {
					return fail(&f, fmt.Errorf("handover: server %q twice", sv.Name))
				}
			}
			st.Servers = append(st.Servers, Server{Name: string(f.Payload), Listener: f.Files[0]})
			cur = nil
		case KindSession:
			if len(f.Files) != 1 || len(f.Payload) != 4 {
				return fail(&f, fmt.Errorf("handover: session frame with %d descriptors and %d bytes", len(f.Files), len(f.Payload)))
			}
			i := binary.LittleEndian.Uint32(f.Payload)
			// Sessions follow their own server's listener.
			if len(st.Servers) == 0 || i != uint32(len(st.Servers)-1) {
				return fail(&f, fmt.Errorf("handover: session of server %d after %d listeners", i, len(st.Servers)))
			}
			sv := &st.Servers[i]
			if len(sv.Sessions) == MaxSessions {
				return fail(&f, fmt.Errorf("handover: server %q: more than %d sessions", sv.Name, MaxSessions))
			}
			sv.Sessions = append(sv.Sessions, Session{Conn: f.Files[0]})
			cur = &sv.Sessions[len(sv.Sessions)-1]
		case KindReplay:
			if cur == nil {
				return fail(&f, errors.New("handover: request outside a session"))
			}
			if len(f.Payload) < 4 {
				return fail(&f, fmt.Errorf("handover: request frame of %d bytes", len(f.Payload)))
			}
			if len(cur.Replay) == MaxReplay {
				return fail(&f, fmt.Errorf("handover: more than %d requests in a session", MaxReplay))
			}
			cur.Replay = append(cur.Replay, Request{Request: binary.LittleEndian.Uint32(f.Payload),
				Payload: f.Payload[4:], Files: f.Files})
		case KindEnd:
			if len(f.Payload) != 0 || len(f.Files) != 0 {
				return fail(&f, errors.New("handover: end frame with a payload or descriptors"))
			}
			return st, nil
		default:
			return fail(&f, fmt.Errorf("handover: unexpected %v frame in the state", f.Kind))
		}
	}
}
