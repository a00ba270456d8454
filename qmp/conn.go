package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// conn is one client connection. The read loop parses and runs commands
// one at a time; the write loop drains a bounded queue of outgoing
// messages, so that a client that does not read never blocks Emit.
type conn struct {
	s   *Server
	nc  net.Conn
	log *slog.Logger

	out         chan []byte   // outgoing messages, bounded
	queued      atomic.Int64  // bytes in out
	queuedMax   atomic.Int64  // high-water mark of queued, for tests
	drained     chan struct{} // signalled when the writer took a message
	done        chan struct{} // closed when the connection is torn down
	closeOnce   sync.Once
	commandMode atomic.Bool
	connected   time.Time
}

func newConn(s *Server, nc net.Conn, log *slog.Logger) *conn {
	return &conn{
		s:         s,
		nc:        nc,
		log:       log,
		out:       make(chan []byte, s.opts.QueueLength),
		done:      make(chan struct{}),
		drained:   make(chan struct{}, 1),
		connected: time.Now(),
	}
}

// close tears the connection down; it is safe to call from any goroutine,
// any number of times.
func (c *conn) close() {
	c.closeOnce.Do(func() {
		close(c.done)
		c.nc.Close()
	})
}

// send queues a reply, waiting for room: a client that sends commands
// faster than it reads replies is slowed down, not dropped (the write
// timeout drops one that stops reading altogether).
func (c *conn) send(msg []byte) bool {
	size := int64(len(msg))
	for {
		q := c.queued.Load()
		if q == 0 || q+size <= int64(c.s.opts.QueueBytes) {
			break
		}
		select {
		case <-c.drained:
		case <-c.done:
			return false
		}
	}
	c.enqueued(size)
	select {
	case c.out <- msg:
		return true
	case <-c.done:
		return false
	}
}

// sendEvent queues an event without waiting; a full queue means the client
// is not keeping up, and it is dropped rather than slowing the server. As
// for replies, one event of any size fits an empty queue.
func (c *conn) sendEvent(msg []byte, event string) {
	size := int64(len(msg))
	if q := c.queued.Load(); q == 0 || q+size <= int64(c.s.opts.QueueBytes) {
		c.enqueued(size)
		select {
		case c.out <- msg:
			return
		case <-c.done:
			return
		default:
			c.queued.Add(-size)
		}
	}
	select {
	case <-c.done:
		return
	default:
	}
	c.log.Warn("QMP client dropped: its queue overflowed; it does not read fast enough",
		"event", event, "queue", len(c.out), "queued_bytes", c.queued.Load())
	c.close()
}

// enqueued accounts for size more bytes in the queue.
func (c *conn) enqueued(size int64) {
	q := c.queued.Add(size)
	for {
		hw := c.queuedMax.Load()
		if q <= hw || c.queuedMax.CompareAndSwap(hw, q) {
			return
		}
	}
}

func (c *conn) writeLoop() {
	defer c.s.wg.Done()
	for {
		select {
		case <-c.done:
			return
		case msg := <-c.out:
			c.nc.SetWriteDeadline(time.Now().Add(c.s.opts.WriteTimeout))
			_, err := c.nc.Write(msg)
			c.queued.Add(-int64(len(msg)))
			select {
			case c.drained <- struct{}{}:
			default:
			}
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					c.log.Warn("QMP client dropped: it stopped reading", "timeout", c.s.opts.WriteTimeout)
				} else if !isClosedErr(err) {
					c.log.Info("QMP write failed; closing connection", "err", err)
				}
				c.close()
				return
			}
		}
	}
}

func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, os.ErrClosed) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

func (c *conn) readLoop() {
	defer c.s.wg.Done()
	defer c.s.removeConn(c)
	defer c.close()
	defer func() {
		// A bug in the protocol code must not take the daemon down.
		if p := recover(); p != nil {
			c.log.Error("panic while serving QMP client; connection closed", "panic", p, "stack", string(debug.Stack()))
		}
	}()
	c.log.Debug("QMP client connected")
	greeting, err := encode(map[string]any{"QMP": map[string]any{"version": c.s.version, "capabilities": []string{}}})
	if err != nil || !c.send(greeting) {
		return
	}
	f := framer{max: c.s.opts.MaxMessageSize, maxDepth: c.s.opts.MaxDepth}
	buf := make([]byte, 4096)
	var msgStart time.Time // when the pending message began
	for {
		c.nc.SetReadDeadline(c.readDeadline(&f, msgStart))
		n, err := c.nc.Read(buf)
		if n > 0 {
			ended := f.ended
			f.feed(buf[:n], c.handle)
			switch {
			case !f.pending():
				msgStart = time.Time{}
			case msgStart.IsZero() || f.ended != ended:
				// A new message started in this read: a client
				// streaming commands is making progress.
				msgStart = time.Now()
			}
		}
		select {
		case <-c.done:
			return
		default:
		}
		if err != nil {
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
				if !c.commandMode.Load() && time.Since(c.connected) >= c.s.opts.HandshakeTimeout {
					c.log.Warn("QMP client dropped: no capabilities negotiation in time", "timeout", c.s.opts.HandshakeTimeout)
				} else {
					c.log.Warn("QMP client dropped: message not completed in time", "timeout", c.s.opts.MessageTimeout)
				}
			case isClosedErr(err):
				c.log.Debug("QMP client disconnected")
			default:
				c.log.Info("QMP read failed; closing connection", "err", err)
			}
			return
		}
	}
}

// readDeadline bounds how long a client may take to negotiate and to
// finish a message it started; an idle client in command mode may stay.
func (c *conn) readDeadline(f *framer, msgStart time.Time) time.Time {
	var d time.Time
	if !c.commandMode.Load() {
		d = c.connected.Add(c.s.opts.HandshakeTimeout)
	}
	if f.pending() && !msgStart.IsZero() {
		if m := msgStart.Add(c.s.opts.MessageTimeout); d.IsZero() || m.Before(d) {
			d = m
		}
	}
	return d
}

// reply is a command's successful reply.
type reply struct {
	Return any             `json:"return"`
	ID     json.RawMessage `json:"id,omitempty"`
}

type errorReply struct {
	Error *Error          `json:"error"`
	ID    json.RawMessage `json:"id,omitempty"`
}

// handle runs one message from the framer (or reports why it was dropped)
// and queues the reply.
func (c *conn) handle(msg []byte, ferr error) {
	select {
	case <-c.done:
		return // the rest of a read after the connection closed
	default:
	}
	if ferr != nil {
		var desc string
		switch ferr {
		case errTooLarge:
			desc = fmt.Sprintf("QMP input too large: more than %d bytes", c.s.opts.MaxMessageSize)
		case errTooDeep:
			desc = fmt.Sprintf("JSON nesting too deep: more than %d levels", c.s.opts.MaxDepth)
		default:
			desc = "JSON parse error, " + ferr.Error()
		}
		if ferr == errTooLarge || ferr == errTooDeep {
			c.log.Warn("QMP message rejected and skipped", "err", ferr)
		} else {
			c.log.Debug("QMP input rejected", "err", ferr)
		}
		c.replyError(nil, Errorf("%s", desc))
		return
	}
	id, name, args, qerr := parseRequest(msg)
	if qerr != nil {
		c.replyError(id, qerr)
		return
	}
	if c.log.Enabled(context.Background(), slog.LevelDebug) {
		c.log.Debug("QMP command", "command", name, "id", string(id))
	}
	if name == cmdCapabilities {
		c.capabilities(id, args)
		return
	}
	if !c.commandMode.Load() {
		c.replyError(id, &Error{Class: ClassCommandNotFound, Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"})
		return
	}
	c.s.cmdMu.RLock()
	h, ok := c.s.commands[name]
	c.s.cmdMu.RUnlock()
	if !ok || h == nil {
		c.replyError(id, &Error{Class: ClassCommandNotFound, Desc: fmt.Sprintf("The command %s has not been found", name)})
		return
	}
	ret, err := c.run(name, h, args)
	if err != nil {
		c.replyError(id, toError(err))
		return
	}
	if ret == nil {
		ret = struct{}{}
	}
	out, err := encode(reply{Return: ret, ID: id})
	if err != nil {
		c.log.Error("QMP command result cannot be encoded", "command", name, "err", err)
		c.replyError(id, Errorf("command %s returned a result that cannot be encoded: %v", name, err))
		return
	}
	c.send(out)
}

// run calls a handler, turning a panic into an error reply.
func (c *conn) run(name string, h Handler, args json.RawMessage) (ret any, err error) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("QMP command panicked", "command", name, "panic", p, "stack", string(debug.Stack()))
			ret, err = nil, Errorf("internal error: command %s failed unexpectedly", name)
		}
	}()
	return h(c.s.ctx, args)
}

func (c *conn) replyError(id json.RawMessage, e *Error) {
	out, err := encode(errorReply{Error: e, ID: id})
	if err != nil { // cannot happen: both parts are plain data
		c.log.Error("QMP error reply cannot be encoded", "err", err)
		return
	}
	c.send(out)
}

type capabilitiesArgs struct {
	Enable []string `json:"enable,omitempty"`
}

// capabilities runs qmp_capabilities, which switches the connection to
// command mode. No capability is offered, so enabling any fails.
func (c *conn) capabilities(id, args json.RawMessage) {
	if c.commandMode.Load() {
		c.replyError(id, &Error{Class: ClassCommandNotFound, Desc: "Capabilities negotiation is already complete, command ignored"})
		return
	}
	var a capabilitiesArgs
	if err := DecodeArgs(args, &a); err != nil {
		c.replyError(id, toError(err))
		return
	}
	if len(a.Enable) > 0 {
		c.replyError(id, Errorf("Capability '%s' not available", a.Enable[0]))
		return
	}
	out, _ := encode(reply{Return: struct{}{}, ID: id})
	if c.send(out) {
		// Only after the reply is queued: no event may precede it.
		c.commandMode.Store(true)
		c.log.Debug("QMP client in command mode")
	}
}

// parseRequest checks a message's envelope as QEMU does. The id is
// returned whenever it could be read, so that errors carry it.
func parseRequest(msg []byte) (id json.RawMessage, name string, args json.RawMessage, qerr *Error) {
	if len(msg) == 0 || msg[0] != '{' {
		if json.Valid(msg) {
			return nil, "", nil, Errorf("QMP input must be a JSON object")
		}
		return nil, "", nil, Errorf("JSON parse error, %s", syntaxError(msg))
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(msg, &members); err != nil {
		return nil, "", nil, Errorf("JSON parse error, %s", syntaxError(msg))
	}
	id = members["id"]
	keys := make([]string, 0, len(members))
	for k := range members {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		switch k {
		case "execute", "arguments", "id":
		case "exec-oob":
			return id, "", nil, Errorf("QMP input member 'exec-oob' is unexpected") // no oob capability is offered
		default:
			return id, "", nil, Errorf("QMP input member '%s' is unexpected", k)
		}
	}
	raw, ok := members["execute"]
	if !ok {
		return id, "", nil, Errorf("QMP input lacks member 'execute'")
	}
	if err := json.Unmarshal(raw, &name); err != nil || raw[0] != '"' {
		return id, "", nil, Errorf("QMP input member 'execute' must be a string")
	}
	args, ok = members["arguments"]
	if !ok {
		args = json.RawMessage("{}")
	} else if len(args) == 0 || args[0] != '{' {
		return id, "", nil, Errorf("QMP input member 'arguments' must be an object")
	}
	return id, name, args, nil
}

// syntaxError describes why msg is not JSON.
func syntaxError(msg []byte) string {
	var v any
	err := json.Unmarshal(msg, &v)
	if err == nil {
		return "unexpected input"
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return se.Error()
	}
	return err.Error()
}
