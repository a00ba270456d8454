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
	r    *bufio.Reader
	dec  *json.Decoder
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
	a := &guestAgent{path: path, conn: c, r: bufio.NewReader(c)}
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
		if err != nil && !errors.As(err, &syntax) {
			return a.readErr(ctx, "guest-sync-delimited", timeout, err)
		}
		// A stale reply or garbage: look for the next delimiter, starting
		// with what the decoder read ahead.
		a.r = bufio.NewReader(io.MultiReader(dec.Buffered(), a.r))
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
		a.r = bufio.NewReader(a.conn)
		if err := a.sync(ctx); err != nil {
			return err
		}
	}
	defer a.bind(ctx)()
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
