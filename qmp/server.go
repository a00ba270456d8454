package qmp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/internal/unixsock"
)

// Defaults for Options' zero values.
const (
	DefaultMaxMessageSize   = 1 << 20
	DefaultMaxDepth         = 1024
	DefaultQueueLength      = 256
	DefaultQueueBytes       = 16 << 20
	DefaultMaxClients       = 64
	DefaultHandshakeTimeout = time.Minute
	DefaultMessageTimeout   = 30 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
)

// Options configure a Server. Zero values take the defaults above.
type Options struct {
	// Logger receives connection, overflow and failure reports; nil discards.
	Logger *slog.Logger
	// Version is the program's version ("1.2.3", "v1.2.3-4-gabc"): the
	// greeting and query-version report its leading numbers as the
	// "qemu" version and the whole string, prefixed "thinblk ", as the
	// package.
	Version string
	// MaxMessageSize caps one incoming message in bytes; a longer one gets
	// an error reply and is skipped.
	MaxMessageSize int
	// MaxDepth caps the nesting of an incoming message.
	MaxDepth int
	// QueueLength is the number of outgoing messages each client may have
	// waiting; a client whose queue overflows with events is dropped.
	QueueLength int
	// QueueBytes caps the bytes of those messages: a reply waits for
	// room, an event that does not fit drops the client (a message of
	// any size fits an empty queue). It bounds the memory that a client
	// that does not read can pin.
	QueueBytes int
	// MaxClients caps concurrent connections; more are refused.
	MaxClients int
	// HandshakeTimeout drops a client that has not finished capabilities
	// negotiation this long after connecting.
	HandshakeTimeout time.Duration
	// MessageTimeout drops a client that started a message and has not
	// finished it this long after.
	MessageTimeout time.Duration
	// WriteTimeout drops a client that does not read a pending message for
	// this long.
	WriteTimeout time.Duration
}

// Handler runs one command. args is the command's "arguments" object ("{}"
// when the client gave none); DecodeArgs decodes it strictly. The result is
// marshalled as the "return" value, nil as {}. An error becomes an error
// reply: *Error chooses its class, any other error is a GenericError. ctx
// is cancelled when the server closes; Close waits for running handlers.
type Handler func(ctx context.Context, args json.RawMessage) (any, error)

// Server is a QMP server: it greets each client, negotiates capabilities,
// runs registered commands and delivers events to every client in command
// mode. Each connection is served on its own goroutines; commands of one
// connection run one after the other, in order.
type Server struct {
	opts    Options
	log     *slog.Logger
	version Version

	ctx    context.Context // handlers' context, cancelled by Close
	cancel context.CancelFunc

	cmdMu    sync.RWMutex
	commands map[string]Handler

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	sockets   []socketFile
	clients   map[*conn]struct{}
	wg        sync.WaitGroup // Serve loops and connections

	closeOnce sync.Once
	closeErr  error
	closeDone chan struct{} // closed when Close has finished
}

// Version is the version in a QMP greeting and the query-version result.
type Version struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	Package string `json:"package"`
}

var versionNumbers = regexp.MustCompile(`^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?`)

func parseVersion(v string) Version {
	var vi Version
	if m := versionNumbers.FindStringSubmatch(v); m != nil {
		num := func(s string) int { n, _ := strconv.Atoi(s); return n }
		vi.QEMU.Major, vi.QEMU.Minor, vi.QEMU.Micro = num(m[1]), num(m[2]), num(m[3])
	}
	if v == "" {
		v = "(devel)"
	}
	vi.Package = "thinblk " + v
	return vi
}

// orDefault gives an option that was left zero (or set negative) its
// default.
func orDefault[T int | time.Duration](opt *T, def T) {
	if *opt <= 0 {
		*opt = def
	}
}

// NewServer returns a server with the built-in commands qmp_capabilities,
// query-commands and query-version.
func NewServer(opts Options) *Server {
	orDefault(&opts.MaxMessageSize, DefaultMaxMessageSize)
	orDefault(&opts.MaxDepth, DefaultMaxDepth)
	orDefault(&opts.QueueLength, DefaultQueueLength)
	orDefault(&opts.QueueBytes, DefaultQueueBytes)
	orDefault(&opts.MaxClients, DefaultMaxClients)
	orDefault(&opts.HandshakeTimeout, DefaultHandshakeTimeout)
	orDefault(&opts.MessageTimeout, DefaultMessageTimeout)
	orDefault(&opts.WriteTimeout, DefaultWriteTimeout)
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		opts:      opts,
		log:       log,
		version:   parseVersion(opts.Version),
		ctx:       ctx,
		cancel:    cancel,
		commands:  make(map[string]Handler),
		listeners: make(map[net.Listener]struct{}),
		clients:   make(map[*conn]struct{}),
		closeDone: make(chan struct{}),
	}
	s.commands[cmdCapabilities] = nil // handled by the connection itself
	s.commands["query-commands"] = s.queryCommands
	s.commands["query-version"] = func(context.Context, json.RawMessage) (any, error) { return s.version, nil }
	return s
}

const cmdCapabilities = "qmp_capabilities"

// Register adds a command. It panics if name is empty or already
// registered: both are programming errors. Commands may be registered
// while the server runs.
func (s *Server) Register(name string, h Handler) {
	if name == "" || h == nil {
		panic("qmp: Register needs a name and a handler")
	}
	s.cmdMu.Lock()
	defer s.cmdMu.Unlock()
	if _, dup := s.commands[name]; dup {
		panic("qmp: command " + name + " registered twice")
	}
	s.commands[name] = h
}

type commandInfo struct {
	Name string `json:"name"`
}

func (s *Server) queryCommands(context.Context, json.RawMessage) (any, error) {
	s.cmdMu.RLock()
	names := make([]string, 0, len(s.commands))
	for name := range s.commands {
		names = append(names, name)
	}
	s.cmdMu.RUnlock()
	sort.Strings(names)
	list := make([]commandInfo, len(names))
	for i, n := range names {
		list[i] = commandInfo{Name: n}
	}
	return list, nil
}

// Emit sends an event to every client in command mode. It never blocks: a
// client whose queue is full is dropped. data must marshal to a JSON
// object, or be nil for an event without data.
func (s *Server) Emit(event string, data any) {
	if event == "" {
		s.log.Error("QMP event without a name not sent")
		return
	}
	msg, err := encodeEvent(event, data, time.Now())
	if err != nil {
		s.log.Error("QMP event not sent", "event", event, "err", err)
		return
	}
	s.mu.Lock()
	targets := make([]*conn, 0, len(s.clients))
	for c := range s.clients {
		if c.commandMode.Load() {
			targets = append(targets, c)
		}
	}
	s.mu.Unlock()
	for _, c := range targets {
		c.sendEvent(msg, event)
	}
}

type eventMsg struct {
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp timestamp       `json:"timestamp"`
}

type timestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

func encodeEvent(event string, data any, t time.Time) ([]byte, error) {
	m := eventMsg{Event: event, Timestamp: timestamp{Seconds: t.Unix(), Microseconds: int64(t.Nanosecond() / 1000)}}
	if data != nil {
		raw, err := json.Marshal(data)
		if err != nil {
			return nil, fmt.Errorf("marshal event data: %w", err)
		}
		if len(raw) == 0 || raw[0] != '{' {
			if !bytes.Equal(raw, []byte("null")) {
				return nil, fmt.Errorf("event data must be a JSON object, not %.40s", raw)
			}
			raw = nil
		}
		m.Data = raw
	}
	return encode(m)
}

// encode marshals a message to the wire: ASCII JSON ended by CRLF.
func encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	b = asciiJSON(b)
	return append(b, '\r', '\n'), nil
}

// Serve accepts connections on ln until ctx is done or Close is called;
// either way the server is closed, socket files removed, when it returns.
// It may be called for several listeners. It returns nil after a Close, an
// error if accepting failed.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("qmp: server closed")
	}
	s.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()

	stop := context.AfterFunc(ctx, func() { go s.Close() })
	err := s.acceptLoop(ln)
	stop()
	if err != nil {
		go s.Close()
	}
	// Close waits for the accept loop, so this waits outside of it.
	<-s.closeDone
	return err
}

func (s *Server) acceptLoop(ln net.Listener) error {
	defer s.wg.Done()
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				s.log.Warn("QMP accept failed, retrying", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("qmp: accept on %s: %w", ln.Addr(), err)
		}
		s.accept(nc)
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) accept(nc net.Conn) {
	log := s.log.With(peerAttrs(nc)...)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		nc.Close()
		return
	}
	if len(s.clients) >= s.opts.MaxClients {
		s.mu.Unlock()
		log.Warn("QMP client refused: too many clients", "max", s.opts.MaxClients)
		// Tell it why, without waiting for it to read.
		msg, _ := encode(errorReply{Error: Errorf("too many QMP clients (%d)", s.opts.MaxClients)})
		nc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		nc.Write(msg)
		nc.Close()
		return
	}
	c := newConn(s, nc, log)
	s.clients[c] = struct{}{}
	s.wg.Add(2)
	s.mu.Unlock()
	go c.writeLoop()
	go c.readLoop()
}

func (s *Server) removeConn(c *conn) {
	s.mu.Lock()
	delete(s.clients, c)
	s.mu.Unlock()
}

// peerAttrs names the process at the other end of a connection for logs.
func peerAttrs(nc net.Conn) []any {
	if uc, ok := nc.(*net.UnixConn); ok {
		return unixsock.PeerAttrs(uc)
	}
	return []any{"peer", nc.RemoteAddr().String()}
}

// Close stops accepting, cancels running handlers' context, disconnects
// every client, waits for handlers to return and removes the socket files
// ListenUnix created.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		lns := make([]net.Listener, 0, len(s.listeners))
		for ln := range s.listeners {
			lns = append(lns, ln)
		}
		clients := make([]*conn, 0, len(s.clients))
		for c := range s.clients {
			clients = append(clients, c)
		}
		s.mu.Unlock()
		s.cancel()
		for _, ln := range lns {
			if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) && s.closeErr == nil {
				s.closeErr = fmt.Errorf("qmp: close listener: %w", err)
			}
		}
		for _, c := range clients {
			c.close()
		}
		s.wg.Wait()
		for _, sf := range s.sockets {
			if err := unixsock.Remove(sf.path, sf.fi); err != nil && s.closeErr == nil {
				s.closeErr = fmt.Errorf("qmp: %w", err)
			}
		}
		s.log.Info("QMP server closed")
		close(s.closeDone)
	})
	return s.closeErr
}
