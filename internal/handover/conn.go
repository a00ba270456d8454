package handover

import (
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/unixsock"
)

// Conn moves frames and their descriptors over a unix stream socket.
type Conn struct {
	uc  *net.UnixConn
	oob []byte
}

// NewConn wraps a connected unix socket.
func NewConn(uc *net.UnixConn) *Conn {
	return &Conn{uc: uc, oob: make([]byte, unix.CmsgSpace(MaxFiles*4))}
}

// SetDeadline bounds the next reads and writes (zero: none).
func (c *Conn) SetDeadline(t time.Time) error { return c.uc.SetDeadline(t) }

// Close closes the socket.
func (c *Conn) Close() error { return c.uc.Close() }

// ReadFrame reads one frame. Its descriptors must arrive with its header,
// exactly as many as the header says; on error every descriptor received
// is closed.
func (c *Conn) ReadFrame() (Frame, error) {
	var hdr [HeaderSize]byte
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(hdr[:], c.oob)
	f := Frame{}
	files, ferr := unixsock.ParseRights(c.oob[:oobn], "handover-fd")
	f.Files = files
	fail := func(e error) (Frame, error) {
		f.closeFiles()
		return Frame{}, e
	}
	switch {
	case err != nil:
		return fail(fmt.Errorf("handover: read: %w", err))
	case n == 0:
		return fail(io.EOF)
	case ferr != nil:
		return fail(fmt.Errorf("handover: %w", ferr))
	case flags&unix.MSG_CTRUNC != 0:
		return fail(fmt.Errorf("handover: more than %d descriptors in one frame", MaxFiles))
	}
	if n < HeaderSize {
		if _, err := io.ReadFull(c.uc, hdr[n:]); err != nil {
			return fail(fmt.Errorf("handover: read header: %w", err))
		}
	}
	h, err := DecodeHeader(hdr[:])
	if err != nil {
		return fail(err)
	}
	if int(h.Files) != len(f.Files) {
		return fail(fmt.Errorf("handover: %v frame says %d descriptors, %d came", h.Kind, h.Files, len(f.Files)))
	}
	f.Kind = h.Kind
	f.Payload = make([]byte, h.Size)
	if _, err := io.ReadFull(c.uc, f.Payload); err != nil {
		return fail(fmt.Errorf("handover: read %v payload: %w", h.Kind, err))
	}
	return f, nil
}

// WriteFrame sends one frame; its descriptors are not closed.
func (c *Conn) WriteFrame(f Frame) error {
	if len(f.Payload) > MaxPayload || len(f.Files) > MaxFiles {
		return fmt.Errorf("handover: %v frame of %d bytes with %d descriptors", f.Kind, len(f.Payload), len(f.Files))
	}
	buf := make([]byte, HeaderSize, HeaderSize+len(f.Payload))
	Header{Version: Version, Kind: f.Kind, Size: uint32(len(f.Payload)), Files: uint32(len(f.Files))}.encode(buf)
	buf = append(buf, f.Payload...)
	if err := unixsock.WriteWithFiles(c.uc, buf, f.Files); err != nil {
		return fmt.Errorf("handover: write %v: %w", f.Kind, err)
	}
	return nil
}

// SendState sends st (its descriptors stay open in this process).
func (c *Conn) SendState(st *State) error {
	frames, err := st.frames()
	if err != nil {
		return err
	}
	for _, f := range frames {
		if err := c.WriteFrame(f); err != nil {
			return err
		}
	}
	return nil
}

// ErrAborted wraps the reason the receiver gave for not taking the state.
var ErrAborted = errors.New("handover: the new process aborted")

// ReadAnswer waits for the receiver's Done (nil) or Abort (ErrAborted
// with its reason). A receiver that hangs up without answering is an
// error too: the sender cannot know what it took.
func (c *Conn) ReadAnswer() error {
	f, err := c.ReadFrame()
	f.closeFiles()
	if err != nil {
		return fmt.Errorf("handover: no answer from the new process: %w", err)
	}
	switch f.Kind {
	case KindDone:
		return nil
	case KindAbort:
		return fmt.Errorf("%w: %s", ErrAborted, f.Payload)
	}
	return fmt.Errorf("handover: answer is a %v frame", f.Kind)
}

// Answer sends Done (reason nil) or Abort with the reason.
func (c *Conn) Answer(reason error) error {
	if reason == nil {
		return c.WriteFrame(Frame{Kind: KindDone})
	}
	msg := reason.Error()
	if len(msg) > MaxPayload {
		msg = msg[:MaxPayload]
	}
	return c.WriteFrame(Frame{Kind: KindAbort, Payload: []byte(msg)})
}
