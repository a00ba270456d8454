package vmsnap

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"syscall"
	"time"
)

// guestAgent talks to the QEMU guest agent (qemu-ga) through the host side
// of its virtio-serial port, a unix socket. The protocol is QMP's JSON
// without a greeting or capabilities negotiation; the channel may hold
// stale bytes from an earlier client, so every session starts with
// guest-sync-delimited, whose answer is preceded by a 0xFF byte that marks
// where the fresh replies begin.
type guestAgent struct {
	path string
	conn net.Conn
	pb   pushback      // conn, after what sync read ahead and put back
	in   cappedReader  // pb, through a per-command budget
	r    *bufio.Reader // in
	dec  *json.Decoder
}

// replyBudget bounds what one command reads from the agent, bytes sync
// reads again after garbage included. Its replies are a few bytes; the
// guest is not trusted, and a stream of stale or hostile bytes must end
// the command, not grow the host's memory or spin until the deadline.
const replyBudget = 1 << 20

var errReplyTooLong = fmt.Errorf("more than %d bytes without the reply", replyBudget)

// cappedReader reads from r until left runs out, then fails.
type cappedReader struct {
	r    io.Reader
	left int
}

func (c *cappedReader) Read(p []byte) (int, error) {
	if c.left <= 0 {
		return 0, errReplyTooLong
	}
	if len(p) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= n
	return n, err
}

// pushback reads pending, then r.
type pushback struct {
	pending []byte
	r       io.Reader
}

func (p *pushback) Read(b []byte) (int, error) {
	if len(p.pending) > 0 {
		n := copy(b, p.pending)
		p.pending = p.pending[n:]
		return n, nil
	}
	return p.r.Read(b)
}

func newGuestAgent(path string, conn net.Conn) *guestAgent {
	a := &guestAgent{path: path, conn: conn, pb: pushback{r: conn}}
	a.in.r = &a.pb
	a.r = bufio.NewReader(&a.in)
	return a
}

// unread puts back what ahead (a decoder's read-ahead of a.r) and a.r
// hold, in front of what is still to be read, without nesting readers.
func (a *guestAgent) unread(ahead io.Reader) {
	b, _ := io.ReadAll(ahead)
	buffered, _ := a.r.Peek(a.r.Buffered())
	b = append(b, buffered...)
	a.pb.pending = append(b, a.pb.pending...)
	a.r.Reset(&a.in)
}

func dialAgent(ctx context.Context, path string) (*guestAgent, error) {
	var d net.Dialer
	var c net.Conn
	var err error
	for {
		c, err = d.DialContext(ctx, "unix", path)
		// EAGAIN: the listener's backlog is full (it serves one client
		// at a time and has not taken the last one's leaving yet).
		if err == nil || !errors.Is(err, syscall.EAGAIN) || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("guest agent %s: %w", path, err)
	}
	a := newGuestAgent(path, c)
	if err := a.sync(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return a, nil
}

func (a *guestAgent) close() { a.conn.Close() }

// sync discards whatever an earlier session left in the channel.
func (a *guestAgent) sync(ctx context.Context) error {
	timeout := timeLeft(ctx)
	defer a.bind(ctx)()
	a.in.left = replyBudget
	id := rand.Int64N(1 << 52) // JSON numbers stay exact below 2^53
	// A leading 0xFF makes the agent drop a half-read request of a client
	// that went away mid-message.
	msg, _ := json.Marshal(map[string]any{"execute": "guest-sync-delimited", "arguments": map[string]any{"id": id}})
	if _, err := a.conn.Write(append([]byte{0xFF}, msg...)); err != nil {
		return fmt.Errorf("guest agent %s: %w", a.path, err)
	}
	for {
		if _, err := a.r.ReadBytes(0xFF); err != nil {
			return a.readErr(ctx, "guest-sync-delimited", timeout, err)
		}
		dec := json.NewDecoder(a.r)
		var reply struct {
			Return *int64 `json:"return"`
		}
		err := dec.Decode(&reply)
		if err == nil && reply.Return != nil && *reply.Return == id {
			// The decoder may have buffered bytes past the reply; keep it.
			a.dec = dec
			return nil
		}
		var syntax *json.SyntaxError
		var wrongType *json.UnmarshalTypeError
		if err != nil && !errors.As(err, &syntax) && !errors.As(err, &wrongType) {
			return a.readErr(ctx, "guest-sync-delimited", timeout, err)
		}
		// A stale reply or garbage: look for the next delimiter, starting
		// with what the decoder read ahead.
		a.unread(dec.Buffered())
	}
}

func (a *guestAgent) readErr(ctx context.Context, cmd string, timeout time.Duration, err error) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("guest agent %s: %s: %w", a.path, cmd, ctx.Err())
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("guest agent %s: no answer to %s within %v (is qemu-ga running in the guest?)", a.path, cmd, timeout.Round(time.Millisecond))
	}
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("guest agent %s: connection closed during %s", a.path, cmd)
	}
	return fmt.Errorf("guest agent %s: %s: %w", a.path, cmd, err)
}

// bind makes the connection's reads and writes end with ctx.
func (a *guestAgent) bind(ctx context.Context) (unbind func()) {
	if d, ok := ctx.Deadline(); ok {
		a.conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { a.conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		stop()
		a.conn.SetDeadline(time.Time{})
	}
}

// run executes cmd and decodes its return value into result (nil to drop it).
func (a *guestAgent) run(ctx context.Context, cmd string, args, result any) error {
	timeout := timeLeft(ctx)
	if timeout <= 0 || ctx.Err() != nil {
		return fmt.Errorf("guest agent %s: not sent: %w", cmd, context.Cause(ctx))
	}
	if a.dec == nil {
		// An earlier call failed mid-read (a json.Decoder keeps its read
		// error) and a late reply may still come: start over with a sync,
		// which skips it.
		a.pb.pending = nil
		a.r.Reset(&a.in)
		if err := a.sync(ctx); err != nil {
			return err
		}
	}
	defer a.bind(ctx)()
	a.in.left = replyBudget
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	msg, _ := json.Marshal(req)
	if _, err := a.conn.Write(msg); err != nil {
		a.dec = nil // a partial request: the next sync's 0xFF resets the agent's parser
		return fmt.Errorf("guest agent %s: %s: %w", a.path, cmd, err)
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := a.dec.Decode(&reply); err != nil {
		a.dec = nil
		return a.readErr(ctx, cmd, timeout, err)
	}
	if reply.Error != nil {
		return fmt.Errorf("guest agent %s: %s", cmd, reply.Error.Desc)
	}
	if result != nil {
		if err := json.Unmarshal(reply.Return, result); err != nil {
			return fmt.Errorf("guest agent %s: reply: %w", cmd, err)
		}
	}
	return nil
}

// freeze freezes the guest's filesystems and returns how many. qemu-ga
// thaws everything itself when the freeze fails part way.
func (a *guestAgent) freeze(ctx context.Context) (int, error) {
	var n int
	err := a.run(ctx, "guest-fsfreeze-freeze", nil, &n)
	return n, err
}

func (a *guestAgent) thaw(ctx context.Context) (int, error) {
	var n int
	err := a.run(ctx, "guest-fsfreeze-thaw", nil, &n)
	return n, err
}
