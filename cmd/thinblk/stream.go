package main

// send and receive (issue 15): `thinblk send DIR SNAP [--from BASE]`
// writes a snapshot as a stream (package stream) to stdout, `thinblk
// receive DIR VOLUME` applies one from stdin, so they compose with ssh or
// any pipe. When serve holds the pool the stream goes through it: the
// command listens on a private unix socket, hands its path to serve over
// the control socket (QMP stream-send / stream-receive) and copies bytes
// between that socket and its stdout or stdin.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/internal/units"
	"github.com/thinblk/thinblk/qmp"
	"github.com/thinblk/thinblk/stream"
	"github.com/thinblk/thinblk/thin"
)

type (
	streamSendArgs struct {
		Snapshot string `json:"snapshot"`
		From     string `json:"from,omitempty"`
		Socket   string `json:"socket"`
	}
	streamReceiveArgs struct {
		Volume string `json:"volume"`
		Force  bool   `json:"force,omitempty"`
		Socket string `json:"socket"`
	}
	// streamResult is what both commands return: the stream's header.
	streamResult struct {
		Snapshot        string `json:"snapshot"`
		Base            string `json:"base,omitempty"`
		VolumeSize      uint64 `json:"volume_size"`
		DataBlocks      uint64 `json:"data_blocks"`
		ProvisionBlocks uint64 `json:"provision_blocks"`
		DiscardBlocks   uint64 `json:"discard_blocks"`
		BlockSize       uint32 `json:"block_size"`
	}
)

func resultOf(h stream.Header) streamResult {
	return streamResult{Snapshot: h.Name, Base: h.BaseName, VolumeSize: h.VolumeSize, DataBlocks: h.DataBlocks,
		ProvisionBlocks: h.ProvisionBlocks, DiscardBlocks: h.DiscardBlocks, BlockSize: h.BlockSize}
}

// streamer is the part of poolOps that sends and receives streams.
type streamer interface {
	Send(w io.Writer, snap, base string) (streamResult, error)
	Receive(r io.Reader, volume string, force bool) (streamResult, error)
}

func (d directOps) Send(w io.Writer, snap, base string) (streamResult, error) {
	h, err := d.p.Send(w, snap, thin.SendOptions{Base: base})
	return resultOf(h), err
}

func (d directOps) Receive(r io.Reader, volume string, force bool) (streamResult, error) {
	h, err := d.p.Receive(r, volume, thin.ReceiveOptions{Force: force})
	return resultOf(h), err
}

// viaSocket runs a stream command on serve: it listens on a fresh socket,
// has serve connect to it, and hands the connection to copy.
func (r remoteOps) viaSocket(cmd string, args func(sock string) any, copyData func(net.Conn) error) (streamResult, error) {
	var res streamResult
	dir, err := os.MkdirTemp("", "thinblk-stream-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return res, err
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		// No timeout: a stream takes as long as its bytes take; a
		// broken pipe on either side ends it.
		done <- r.c.Execute(context.Background(), cmd, args(sock), &res)
	}()
	// No timeout on the stream, but serve connects at once or fails.
	actx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := stream.Accept(actx, ln, done)
	if err != nil {
		return res, err
	}
	cerr := copyData(c)
	c.Close()
	if err := <-done; err != nil {
		return res, err
	}
	return res, cerr
}

func (r remoteOps) Send(w io.Writer, snap, base string) (streamResult, error) {
	return r.viaSocket("stream-send", func(sock string) any { return streamSendArgs{snap, base, sock} },
		func(c net.Conn) error {
			_, err := io.Copy(w, c)
			return err
		})
}

func (r remoteOps) Receive(rd io.Reader, volume string, force bool) (streamResult, error) {
	return r.viaSocket("stream-receive", func(sock string) any { return streamReceiveArgs{volume, force, sock} },
		func(c net.Conn) error {
			_, err := io.Copy(c, rd)
			// Serve sees the end of the stream; its reply says whether it
			// was whole.
			c.(*net.UnixConn).CloseWrite()
			return err
		})
}

// registerStreamCommands puts stream-send and stream-receive on serve's
// control socket: serve connects to the caller's socket and writes or
// reads the stream there.
func registerStreamCommands(s *qmp.Server, pool *thin.Pool, ex *exports) {
	s.Register("stream-send", streamHandler(func(c net.Conn, a streamSendArgs) (stream.Header, error) {
		return pool.Send(c, a.Snapshot, thin.SendOptions{Base: a.From})
	}))
	s.Register("stream-receive", streamHandler(func(c net.Conn, a streamReceiveArgs) (stream.Header, error) {
		if err := ex.socketProblem(a.Volume); err != nil {
			return stream.Header{}, err
		}
		return pool.Receive(c, a.Volume, thin.ReceiveOptions{Force: a.Force})
	}))
}

func (a streamSendArgs) socket() string    { return a.Socket }
func (a streamReceiveArgs) socket() string { return a.Socket }

// streamHandler is the one path of both stream commands: decode the
// arguments, connect to the caller's socket, run the stream over it, close
// it, answer with the stream's header.
func streamHandler[A interface{ socket() string }](run func(net.Conn, A) (stream.Header, error)) qmp.Handler {
	return func(ctx context.Context, args json.RawMessage) (any, error) {
		var a A
		if err := qmp.DecodeArgs(args, &a); err != nil {
			return nil, err
		}
		c, err := dialStream(ctx, a.socket())
		if err != nil {
			return nil, fmt.Errorf("stream socket: %w", err)
		}
		defer c.Close()
		h, err := run(c, a)
		return resultOf(h), err
	}
}

// dialStream connects to a stream's socket: a unix socket's path (or
// unix:PATH), or tcp:HOST:PORT for a peer on another machine (thinblk
// migrate --stream-host).
func dialStream(ctx context.Context, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	network, address := "unix", strings.TrimPrefix(addr, "unix:")
	if hostPort, ok := strings.CutPrefix(addr, "tcp:"); ok {
		network, address = "tcp", hostPort
	}
	var d net.Dialer
	return d.DialContext(ctx, network, address)
}

func runSend(args []string, stdout, stderr io.Writer) int {
	const cmd = "send"
	fs := newFlagSet(cmd, "send DIR SNAPSHOT [--from BASE] [--progress] > STREAM", stderr)
	from := fs.String("from", "", "send only what changed since BASE, an older snapshot of the same volume")
	prog := fs.Bool("progress", false, "print progress on stderr even when it is not a terminal")
	pos, code, ok := parseExactly(fs, args, 2)
	if !ok {
		return code
	}
	if f, ok := stdout.(*os.File); ok && isTerminal(f) {
		return usageError(stderr, cmd, errors.New("refusing to write a binary stream to a terminal: redirect stdout to a file or a pipe"))
	}
	growPipe(stdout)
	pr := newProgress(stderr, "sent", *prog)
	start := time.Now()
	return withPool(pos[0], stderr, cmd, func(ops poolOps) error {
		st, ok := ops.(streamer)
		if !ok {
			return errors.New("this pool access cannot send")
		}
		// Unbuffered: the stream writer gathers small records itself and
		// writes each data record whole.
		res, err := st.Send(io.MultiWriter(stdout, pr), pos[1], *from)
		pr.finish()
		if err != nil {
			return err
		}
		if *prog || pr.tty {
			fmt.Fprintf(stderr, "sent %s: %s\n", pos[1], summary(res, pr.n, time.Since(start)))
		}
		return nil
	})
}

func runReceive(args []string, stdout, stderr io.Writer) int {
	const cmd = "receive"
	fs := newFlagSet(cmd, "receive DIR VOLUME [--force] [--progress] < STREAM", stderr)
	force := fs.Bool("force", false, "an incremental stream replaces what VOLUME changed since its base snapshot (default: refuse)")
	prog := fs.Bool("progress", false, "print progress on stderr even when it is not a terminal")
	pos, code, ok := parseExactly(fs, args, 2)
	if !ok {
		return code
	}
	growPipe(os.Stdin)
	pr := newProgress(stderr, "received", *prog)
	start := time.Now()
	return withPool(pos[0], stderr, cmd, func(ops poolOps) error {
		st, ok := ops.(streamer)
		if !ok {
			return errors.New("this pool access cannot receive")
		}
		res, err := st.Receive(io.TeeReader(os.Stdin, pr), pos[1], *force)
		pr.finish()
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "received %s into %s: %s\n", res.Snapshot, pos[1], summary(res, pr.n, time.Since(start)))
		return nil
	})
}

func summary(r streamResult, n uint64, d time.Duration) string {
	kind := "full"
	if r.Base != "" {
		kind = "incremental from " + r.Base
	}
	bs := uint64(r.BlockSize)
	return fmt.Sprintf("%s, %d data blocks (%s), %d provisioned, %d discarded; %s in %.2fs (%s/s)",
		kind, r.DataBlocks, units.HumanBytes(r.DataBlocks*bs), r.ProvisionBlocks, r.DiscardBlocks,
		units.HumanBytes(n), d.Seconds(), units.HumanBytes(uint64(float64(n)/max(d.Seconds(), 1e-9))))
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// growPipe enlarges a pipe's kernel buffer (64 KiB by default) so that
// each side moves a whole 1 MiB record per wake-up; anything else is left
// alone.
func growPipe(f any) {
	if f, ok := f.(*os.File); ok {
		unix.FcntlInt(f.Fd(), unix.F_SETPIPE_SZ, 1<<20)
	}
}

// progress counts the stream's bytes as they pass and prints bytes, rate
// and ETA on stderr (at most once a second) when stderr is a terminal or
// --progress asks; the total comes from the stream's header, read from
// the bytes themselves.
type progress struct {
	w        io.Writer
	verb     string
	on, tty  bool
	n        uint64
	head     []byte
	total    uint64
	start    time.Time
	last     time.Time
	printed  bool
	headDone bool
}

func newProgress(stderr io.Writer, verb string, force bool) *progress {
	tty := false
	if f, ok := stderr.(*os.File); ok {
		tty = isTerminal(f)
	}
	now := time.Now()
	return &progress{w: stderr, verb: verb, on: force || tty, tty: tty, start: now, last: now}
}

func (p *progress) Write(b []byte) (int, error) {
	p.n += uint64(len(b))
	if !p.on {
		return len(b), nil
	}
	if !p.headDone {
		p.head = append(p.head, b[:min(len(b), 4096-len(p.head))]...)
		if r, err := stream.NewReader(bytes.NewReader(p.head)); err == nil {
			h := r.Header()
			p.total, p.headDone = r.Bytes()+h.DataBytes(), true
		} else if len(p.head) >= 4096 {
			p.headDone = true
		}
	}
	if now := time.Now(); now.Sub(p.last) >= time.Second {
		p.last = now
		p.print(now)
	}
	return len(b), nil
}

func (p *progress) print(now time.Time) {
	el := now.Sub(p.start).Seconds()
	rate := float64(p.n) / max(el, 1e-9)
	line := fmt.Sprintf("%s %s", p.verb, units.HumanBytes(p.n))
	if p.total > 0 {
		line += fmt.Sprintf(" of %s (%d%%)", units.HumanBytes(p.total), min(100, p.n*100/p.total))
	}
	line += fmt.Sprintf(", %s/s", units.HumanBytes(uint64(rate)))
	if p.total > p.n && rate > 0 {
		line += fmt.Sprintf(", ETA %s", time.Duration(float64(p.total-p.n)/rate*float64(time.Second)).Round(time.Second))
	}
	if p.tty {
		fmt.Fprintf(p.w, "\r%s\x1b[K", line)
	} else {
		fmt.Fprintln(p.w, line)
	}
	p.printed = true
}

func (p *progress) finish() {
	if p.on && p.printed && p.tty {
		fmt.Fprintln(p.w)
	}
}
