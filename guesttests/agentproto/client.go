package agentproto

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Client is the host side: it sends requests to an agent and waits for the answers.
// It is safe for concurrent use; requests are serialized.
type Client struct {
	mu     sync.Mutex
	conn   io.ReadWriteCloser
	r      *bufio.Reader
	nextID uint32
	broken error
}

// NewClient wraps a connected stream to an agent.
func NewClient(conn io.ReadWriteCloser) *Client {
	return &Client{conn: conn, r: bufio.NewReaderSize(conn, 64<<10), nextID: 1}
}

// Close closes the underlying stream.
func (c *Client) Close() error { return c.conn.Close() }

type deadliner interface{ SetDeadline(time.Time) error }

// Do sends one request and waits for its response. When ctx ends first, the stream is
// interrupted and the client is unusable afterwards (the agent may still answer later, so the
// stream is out of step).
func (c *Client) Do(ctx context.Context, req *Request) (*Response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return nil, fmt.Errorf("agent client unusable after earlier failure: %w", c.broken)
	}
	id := c.nextID
	c.nextID++
	f, err := EncodeRequest(id, req)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() {
		if d, ok := c.conn.(deadliner); ok {
			_ = d.SetDeadline(time.Unix(1, 0))
		} else {
			_ = c.conn.Close()
		}
	})
	resp, err := c.roundTrip(f)
	if !stop() || ctx.Err() != nil {
		err = fmt.Errorf("agent %s: %w", req.Op, context.Cause(ctx))
		resp = nil
	}
	if err != nil {
		c.broken = err
		return nil, err
	}
	return resp, nil
}

func (c *Client) roundTrip(f Frame) (*Response, error) {
	if err := WriteFrame(c.conn, f); err != nil {
		return nil, fmt.Errorf("send request %d: %w", f.ID, err)
	}
	for {
		rf, err := ReadFrame(c.r)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("wait for response %d: %w", f.ID, err)
		}
		if rf.ID != f.ID {
			// A late answer to a request given up on earlier; not ours.
			continue
		}
		return DecodeResponse(rf)
	}
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	resp, err := c.Do(ctx, &Request{Op: OpPing})
	if err != nil {
		return err
	}
	if resp.Error != "" {
		return fmt.Errorf("agent ping: %s", resp.Error)
	}
	return nil
}

// ExecResult is the outcome of a command run in the guest.
type ExecResult struct {
	ExitCode int
	TimedOut bool
	Stdout   []byte
	Stderr   []byte
}

// Exec runs argv in the guest. A command that cannot start is an error; one that exits non-zero
// is not (look at ExitCode). timeout 0 means the guest imposes none (ctx still applies).
func (c *Client) Exec(ctx context.Context, argv []string, env []string, stdin []byte, timeout time.Duration) (*ExecResult, error) {
	resp, err := c.Do(ctx, &Request{Op: OpExec, Argv: argv, Env: env, Stdin: stdin, TimeoutMs: timeout.Milliseconds()})
	if err != nil {
		return nil, err
	}
	if resp.Error != "" {
		return nil, fmt.Errorf("agent exec %q: %s", argv, resp.Error)
	}
	return &ExecResult{ExitCode: resp.ExitCode, TimedOut: resp.TimedOut, Stdout: resp.Stdout, Stderr: resp.Stderr}, nil
}

// WriteFile writes data to path in the guest (created or truncated).
func (c *Client) WriteFile(ctx context.Context, path string, data []byte, mode uint32) error {
	resp, err := c.Do(ctx, &Request{Op: OpWriteFile, Path: path, Data: data, Mode: mode})
	if err != nil {
		return err
	}
	if resp.Error != "" {
		return fmt.Errorf("agent write %s: %s", path, resp.Error)
	}
	return nil
}

// ReadFile reads a whole file from the guest.
func (c *Client) ReadFile(ctx context.Context, path string) ([]byte, error) {
	resp, err := c.Do(ctx, &Request{Op: OpReadFile, Path: path})
	if err != nil {
		return nil, err
	}
	if resp.Error != "" {
		return nil, fmt.Errorf("agent read %s: %s", path, resp.Error)
	}
	return resp.Data, nil
}

// PowerOff asks the guest to sync and power off. It returns once the agent has acknowledged;
// the caller waits for the VM process to exit.
func (c *Client) PowerOff(ctx context.Context) error {
	resp, err := c.Do(ctx, &Request{Op: OpPowerOff})
	if err != nil {
		return err
	}
	if resp.Error != "" {
		return fmt.Errorf("agent power off: %s", resp.Error)
	}
	return nil
}
