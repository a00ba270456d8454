package vhostuser

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// backendReplyTimeout bounds the wait for the front-end's acknowledgement
// of a back-end request, so that a stuck front-end cannot hang the caller.
const backendReplyTimeout = 5 * time.Second

// backendChannel is the socket the front-end handed over with
// SET_BACKEND_REQ_FD, for requests from the back-end to the front-end.
// Device code may use it from any goroutine.
type backendChannel struct {
	mu       sync.Mutex
	conn     *Conn
	replyAck bool
	closed   bool
}

func newBackendChannel(f *os.File, replyAck bool) (*backendChannel, error) {
	c, err := net.FileConn(f) // duplicates the descriptor
	if err != nil {
		return nil, fmt.Errorf("back-end channel: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("back-end channel is a %T, not a unix socket", c)
	}
	return &backendChannel{conn: NewConn(uc), replyAck: replyAck}, nil
}

var errBackendClosed = errors.New("back-end channel closed: front-end disconnected")

// notifyConfigChange tells the front-end that the config space changed
// (BACKEND_CONFIG_CHANGE_MSG). With REPLY_ACK it waits for the front-end
// to acknowledge. It must not be called from a Device method the server
// is running: QEMU answers by reading the config (GET_CONFIG) over the
// main connection, which the server serves only after that method returns.
func (b *backendChannel) notifyConfigChange() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errBackendClosed
	}
	h := Header{Request: Request(BackendConfigChange)}
	if b.replyAck {
		h.Flags |= FlagNeedReply
	}
	if err := b.conn.SetDeadline(time.Now().Add(backendReplyTimeout)); err != nil {
		return fmt.Errorf("config change notification: %w", err)
	}
	defer b.conn.SetDeadline(time.Time{})
	if err := b.conn.Write(h, nil); err != nil {
		return fmt.Errorf("config change notification: %w", err)
	}
	if !b.replyAck {
		return nil
	}
	m, err := b.conn.Read()
	if err != nil {
		return fmt.Errorf("config change notification: read acknowledgement: %w", err)
	}
	m.CloseFiles()
	if !m.Header.IsReply() || m.Header.Request != h.Request {
		return fmt.Errorf("config change notification: unexpected answer %v (flags %#x)", m.Header.Request, m.Header.Flags)
	}
	v, err := DecodeU64(m.Payload)
	if err != nil {
		return fmt.Errorf("config change notification: acknowledgement: %w", err)
	}
	if v != 0 {
		return fmt.Errorf("config change notification: front-end failed it (%d)", v)
	}
	return nil
}

func (b *backendChannel) close() {
	// Closing first unblocks a notification waiting for its reply.
	b.conn.Close()
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
}
