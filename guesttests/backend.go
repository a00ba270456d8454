package guesttests

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// BackendKind names a vhost-user-blk back-end implementation.
type BackendKind string

const (
	// Thinblk is `thinblk serve --raw`, the back-end under test.
	Thinblk BackendKind = "thinblk"
	// QSD is qemu-storage-daemon's vhost-user-blk export, the reference.
	QSD BackendKind = "qsd"
	// ThinPool is `thinblk serve POOLDIR --socket-dir DIR`: one socket per volume,
	// DIR/NAME.sock. Image is the pool directory; Socket is the socket to wait for.
	ThinPool BackendKind = "thinpool"
)

// BackendOptions describe one exported disk.
type BackendOptions struct {
	Kind     BackendKind
	Image    string // raw image file, must exist
	Socket   string // unix socket path to create
	ReadOnly bool
	Queues   int    // 0: 1
	LogPath  string // back-end stdout+stderr
	// Serial is the disk serial the guest reads (thinblk only; qemu-storage-daemon always
	// reports "vhost_user_blk"). Empty: the back-end's default.
	Serial string
	// ThinblkBin is the thinblk binary (Kind Thinblk only).
	ThinblkBin string
	// ExtraArgs are appended to the back-end's command line (flags with no field here,
	// such as serve's --qemu-qmp).
	ExtraArgs []string
	// Bare starts thinblk with only the arguments it cannot do without, its defaults for the
	// rest: `serve --raw IMAGE --socket SOCKET`, or `serve POOL` (Socket must then be in the
	// pool directory). Queues, ReadOnly and Serial are ignored.
	Bare bool
	// Env is added to the back-end's environment (e.g. THINBLK_TEST_CRASH_AT).
	Env []string
}

// Backend is a running back-end process.
type Backend struct {
	Opts   BackendOptions
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // exit status, valid after exited is closed
	log    *os.File
}

// StartBackend starts the back-end and waits until its socket accepts connections.
func StartBackend(ctx context.Context, o BackendOptions) (*Backend, error) {
	if o.Queues == 0 {
		o.Queues = 1
	}
	var argv []string
	switch o.Kind {
	case Thinblk:
		if o.ThinblkBin == "" {
			return nil, errors.New("start thinblk back-end: no binary given")
		}
		argv = []string{o.ThinblkBin, "serve", "--raw", o.Image, "--socket", o.Socket, "--queues", strconv.Itoa(o.Queues)}
		if o.Bare {
			argv = argv[:6]
			break
		}
		if o.ReadOnly {
			argv = append(argv, "--read-only")
		}
		if o.Serial != "" {
			argv = append(argv, "--serial", o.Serial)
		}
	case ThinPool:
		if o.ThinblkBin == "" {
			return nil, errors.New("start thinblk pool back-end: no binary given")
		}
		if err := os.MkdirAll(filepath.Dir(o.Socket), 0o755); err != nil {
			return nil, fmt.Errorf("start thinblk pool back-end: %w", err)
		}
		argv = []string{o.ThinblkBin, "serve", o.Image, "--socket-dir", filepath.Dir(o.Socket), "--queues", strconv.Itoa(o.Queues)}
		if o.Bare {
			argv = argv[:3]
		}
	case QSD:
		writable := "on"
		if o.ReadOnly {
			writable = "off"
		}
		// discard=unmap on both layers: without it QSD ignores discards and the guest's
		// read-back after blkdiscard would see old data.
		argv = []string{"qemu-storage-daemon",
			"--blockdev", "driver=file,node-name=f0,discard=unmap,filename=" + qemuOptEscape(o.Image),
			"--blockdev", "driver=raw,node-name=d0,discard=unmap,file=f0",
			"--export", fmt.Sprintf("type=vhost-user-blk,id=e0,addr.type=unix,addr.path=%s,node-name=d0,writable=%s,num-queues=%d",
				qemuOptEscape(o.Socket), writable, o.Queues)}
	default:
		return nil, fmt.Errorf("start back-end: unknown kind %q (want %q or %q)", o.Kind, Thinblk, QSD)
	}
	argv = append(argv, o.ExtraArgs...)
	if o.Kind != ThinPool { // the pool server owns its socket directory
		_ = os.Remove(o.Socket)
	}
	b := &Backend{Opts: o, exited: make(chan struct{})}
	cmd := exec.Command(argv[0], argv[1:]...)
	if len(o.Env) > 0 {
		cmd.Env = append(os.Environ(), o.Env...)
	}
	if o.LogPath != "" {
		f, err := os.Create(o.LogPath)
		if err != nil {
			return nil, fmt.Errorf("start %s back-end: %w", o.Kind, err)
		}
		b.log = f
		cmd.Stdout, cmd.Stderr = f, f
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.closeLog()
		return nil, fmt.Errorf("start %s back-end: %w", o.Kind, err)
	}
	b.cmd = cmd
	go func() {
		b.err = cmd.Wait()
		close(b.exited)
	}()
	if err := b.waitSocket(ctx, 15*time.Second); err != nil {
		b.Kill()
		return nil, err
	}
	return b, nil
}

// qemuOptEscape doubles commas, QEMU's escape inside option values.
func qemuOptEscape(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		out = append(out, s[i])
		if s[i] == ',' {
			out = append(out, ',')
		}
	}
	return string(out)
}

// waitSocket polls until the socket accepts a connection. The probe connection is closed at
// once; back-ends serve one front-end at a time and go back to listening.
func (b *Backend) waitSocket(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		select {
		case <-b.exited:
			return fmt.Errorf("%s back-end exited before listening: %v\n%s", b.Opts.Kind, b.err, b.LogTail(20))
		default:
		}
		if _, err := os.Stat(b.Opts.Socket); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s back-end: socket %s not there after %v\n%s", b.Opts.Kind, b.Opts.Socket, limit, b.LogTail(20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s back-end: %w", b.Opts.Kind, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Alive reports whether the process is still running.
func (b *Backend) Alive() bool {
	select {
	case <-b.exited:
		return false
	default:
		return true
	}
}

// Stop asks the back-end to exit (SIGTERM: it finishes in-flight I/O and syncs), waits up to
// timeout, then kills it. It returns the exit error, if any.
func (b *Backend) Stop(timeout time.Duration) error {
	defer b.closeLog()
	if b.Alive() {
		_ = b.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-b.exited:
		return b.err
	case <-time.After(timeout):
		b.Kill()
		return fmt.Errorf("%s back-end did not exit %v after SIGTERM; killed", b.Opts.Kind, timeout)
	}
}

// Kill ends the process at once and waits for it.
func (b *Backend) Kill() {
	if b.cmd != nil && b.Alive() {
		_ = b.cmd.Process.Kill()
		<-b.exited
	}
	b.closeLog()
}

func (b *Backend) closeLog() {
	if b.log != nil {
		b.log.Close()
		b.log = nil
	}
}

// LogTail returns the last n lines of the back-end's log.
func (b *Backend) LogTail(n int) string {
	if b.Opts.LogPath == "" {
		return ""
	}
	data, err := os.ReadFile(b.Opts.LogPath)
	if err != nil {
		return ""
	}
	return tail(string(data), n)
}

// dialUnix retries a unix socket connection until it succeeds or ctx ends.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("dial %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
