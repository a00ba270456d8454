package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/unixsock"
)

// Conn moves vhost-user messages and their file descriptors over a unix
// stream socket. It does not interpret payloads. It is not safe for
// concurrent reads, nor for concurrent writes.
type Conn struct {
	uc   *net.UnixConn
	hdr  [HeaderSize]byte
	oob  []byte
	wbuf []byte
}

// NewConn wraps a connected unix socket.
func NewConn(uc *net.UnixConn) *Conn {
	return &Conn{uc: uc, oob: make([]byte, unix.CmsgSpace(MaxFds*4))}
}

// Close closes the socket.
func (c *Conn) Close() error { return c.uc.Close() }

// Message is one decoded message: header, payload and the descriptors that
// came with it. The receiver owns Files and must close them.
type Message struct {
	Header  Header
	Payload []byte
	Files   []*os.File
}

// CloseFiles closes every descriptor the message carried.
func (m *Message) CloseFiles() {
	unixsock.CloseFiles(m.Files)
	m.Files = nil
}

// Read reads one message. Descriptors arrive with the header (QEMU sends
// them in the same sendmsg as the first byte). A message that carries more
// than MaxFds descriptors, or a truncated control message, is an error;
// every descriptor received is closed on error.
func (c *Conn) Read() (Message, error) {
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.hdr[:], c.oob)
	files, ferr := unixsock.ParseRights(c.oob[:oobn], "vhost-user-fd")
	if ferr == nil && len(files) > MaxFds {
		ferr = fmt.Errorf("%d descriptors in one message (max %d)", len(files), MaxFds)
	}
	fail := func(e error) (Message, error) {
		unixsock.CloseFiles(files)
		return Message{}, e
	}
	if err != nil {
		return fail(err)
	}
	if n == 0 {
		return fail(io.EOF)
	}
	if ferr != nil {
		return fail(ferr)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return fail(fmt.Errorf("control message truncated: more than %d descriptors", MaxFds))
	}
	if n < HeaderSize {
		if _, err := io.ReadFull(c.uc, c.hdr[n:]); err != nil {
			return fail(fmt.Errorf("read header: %w", err))
		}
	}
	h, err := DecodeHeader(c.hdr[:])
	if err != nil {
		return fail(err)
	}
	payload := make([]byte, h.Size)
	if _, err := io.ReadFull(c.uc, payload); err != nil {
		return fail(fmt.Errorf("read %v payload: %w", h.Request, err))
	}
	return Message{Header: h, Payload: payload, Files: files}, nil
}

// Write sends one message with optional descriptors. The descriptors are
// not closed.
func (c *Conn) Write(h Header, payload []byte, files ...*os.File) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%v: payload of %d bytes exceeds %d", h.Request, len(payload), MaxPayload)
	}
	if len(files) > MaxFds {
		return fmt.Errorf("%v: %d descriptors (max %d)", h.Request, len(files), MaxFds)
	}
	h.Size = uint32(len(payload))
	h.Flags = h.Flags&^FlagVersionMask | FlagVersion
	c.wbuf = append(c.wbuf[:0], make([]byte, HeaderSize)...)
	h.encode(c.wbuf)
	c.wbuf = append(c.wbuf, payload...)
	if err := unixsock.WriteWithFiles(c.uc, c.wbuf, files); err != nil {
		return fmt.Errorf("write %v: %w", h.Request, err)
	}
	return nil
}

// Reply sends the reply to request h.
func (c *Conn) Reply(h Header, payload []byte) error {
	return c.Write(Header{Request: h.Request, Flags: FlagReply}, payload)
}

// isClosed reports whether err means the peer went away.
func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)
}

// SetDeadline bounds the next reads and writes (zero: no deadline).
func (c *Conn) SetDeadline(t time.Time) error { return c.uc.SetDeadline(t) }
