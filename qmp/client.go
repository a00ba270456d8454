package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// Event is an asynchronous event as received by a Client.
type Event struct {
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Time returns the event's timestamp.
func (e Event) Time() time.Time {
	return time.Unix(e.Timestamp.Seconds, e.Timestamp.Microseconds*1000)
}

// Greeting is the server's greeting.
type Greeting struct {
	QMP struct {
		Version      Version  `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
}

// ErrClientClosed is returned by Execute once the connection is gone.
var ErrClientClosed = errors.New("qmp: connection closed")

// clientEventBuffer is how many events a Client holds for a slow reader
// before it drops new ones.
const clientEventBuffer = 256

// Client is a QMP client for thinblk's (or QEMU's) control socket. Execute
// may be called from several goroutines; replies are matched by id.
type Client struct {
	nc       net.Conn
	greeting Greeting
	events   chan Event

	writeMu sync.Mutex
	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan response
	err     error         // why the connection ended
	done    chan struct{} // closed when the read loop ends
}

type response struct {
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	ID     json.RawMessage `json:"id"`
	Event  string          `json:"event"`
}

// Dial connects to a QMP unix socket, reads the greeting and negotiates
// capabilities (enabling none). ctx bounds the whole handshake.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: connect to %s: %w", path, err)
	}
	c, err := newClient(ctx, nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("qmp: %s: %w", path, err)
	}
	return c, nil
}

func newClient(ctx context.Context, nc net.Conn) (*Client, error) {
	c := &Client{
		nc:      nc,
		events:  make(chan Event, clientEventBuffer),
		pending: make(map[uint64]chan response),
		done:    make(chan struct{}),
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	dec := json.NewDecoder(bufio.NewReader(nc))
	if err := dec.Decode(&c.greeting); err != nil {
		stop()
		return nil, fmt.Errorf("read greeting: %w", ctxErr(ctx, err))
	}
	if c.greeting.QMP.Capabilities == nil {
		stop()
		return nil, errors.New("read greeting: not a QMP greeting")
	}
	go c.readLoop(dec)
	_, err := c.execute(ctx, cmdCapabilities, nil)
	if !stop() {
		// The deadline may have been set after the handshake: clear it.
		nc.SetDeadline(time.Time{})
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("negotiate capabilities: %w", err)
	}
	return c, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// Greeting returns the server's greeting.
func (c *Client) Greeting() Greeting { return c.greeting }

// Events returns the channel of asynchronous events, closed when the
// connection ends. Events that arrive while it is full are dropped.
func (c *Client) Events() <-chan Event { return c.events }

// Close closes the connection; pending Executes fail.
func (c *Client) Close() error {
	err := c.nc.Close()
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// Execute runs cmd with args (nil for none; anything that marshals to a
// JSON object) and decodes the return value into result (nil to ignore
// it). An error reply is returned as *Error.
func (c *Client) Execute(ctx context.Context, cmd string, args any, result any) error {
	ret, err := c.execute(ctx, cmd, args)
	if err != nil {
		return err
	}
	if result != nil {
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("qmp: decode result of %s: %w", cmd, err)
		}
	}
	return nil
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        uint64 `json:"id"`
}

func (c *Client) execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	ch := make(chan response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}()

	msg, err := json.Marshal(request{Execute: cmd, Arguments: args, ID: id})
	if err != nil {
		return nil, fmt.Errorf("qmp: encode arguments of %s: %w", cmd, err)
	}
	c.writeMu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		c.nc.SetWriteDeadline(dl)
	}
	_, err = c.nc.Write(append(msg, '\n'))
	c.nc.SetWriteDeadline(time.Time{})
	c.writeMu.Unlock()
	if err != nil {
		c.nc.Close() // a partial write leaves the stream unusable
		return nil, fmt.Errorf("qmp: send %s: %w: %w", cmd, ErrClientClosed, err)
	}
	select {
	case r := <-ch:
		if r.Error != nil {
			return nil, r.Error
		}
		return r.Return, nil
	case <-c.done:
		c.mu.Lock()
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("qmp: %s: %w", cmd, err)
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) readLoop(dec *json.Decoder) {
	defer close(c.done)
	defer close(c.events)
	for {
		var raw json.RawMessage
		err := dec.Decode(&raw)
		if err == nil {
			err = c.dispatch(raw)
		}
		if err != nil {
			c.mu.Lock()
			c.err = fmt.Errorf("%w: %w", ErrClientClosed, err)
			c.mu.Unlock()
			c.nc.Close()
			return
		}
	}
}

// dispatch routes one message from the server. A reply that cannot be
// matched to a request means the stream cannot be trusted any more.
func (c *Client) dispatch(raw json.RawMessage) error {
	var r response
	if err := json.Unmarshal(raw, &r); err != nil {
		return fmt.Errorf("bad message from server: %w", err)
	}
	if r.Event != "" {
		var ev Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			return fmt.Errorf("bad event from server: %w", err)
		}
		select {
		case c.events <- ev:
		default:
		}
		return nil
	}
	if r.Error == nil && r.Return == nil {
		return fmt.Errorf("message from server is neither reply nor event: %.100s", raw)
	}
	id, err := strconv.ParseUint(string(r.ID), 10, 64)
	if err != nil {
		if r.Error != nil {
			return fmt.Errorf("server error without request id: %w", r.Error)
		}
		return fmt.Errorf("reply without a request id: %.100s", raw)
	}
	c.mu.Lock()
	ch, ok := c.pending[id]
	c.mu.Unlock()
	if ok {
		ch <- r
	}
	// A reply to a request whose caller gave up is dropped.
	return nil
}
