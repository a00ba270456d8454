package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

// handler carries out requests inside the guest.
type handler struct{}

func (handler) Handle(ctx context.Context, req *agentproto.Request) *agentproto.Response {
	switch req.Op {
	case agentproto.OpPing, agentproto.OpPowerOff:
		return &agentproto.Response{}
	case agentproto.OpExec:
		return runCommand(ctx, req)
	case agentproto.OpWriteFile:
		mode := os.FileMode(req.Mode & 0o7777)
		if mode == 0 {
			mode = 0o644
		}
		if err := os.WriteFile(req.Path, req.Data, mode); err != nil {
			return errResponse(err)
		}
		return &agentproto.Response{}
	case agentproto.OpReadFile:
		data, err := readFileCapped(req.Path, agentproto.MaxData)
		if err != nil {
			return errResponse(err)
		}
		return &agentproto.Response{Data: data}
	default:
		return errResponse(fmt.Errorf("unsupported op %q", req.Op))
	}
}

func errResponse(err error) *agentproto.Response {
	return &agentproto.Response{Error: err.Error(), ExitCode: -1}
}

func readFileCapped(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("read %s: larger than %d bytes", path, limit)
	}
	return data, nil
}

// cappedBuffer keeps the first max bytes written and counts the rest, so a chatty command
// cannot exhaust guest memory or overflow a frame.
type cappedBuffer struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	room := b.max - b.buf.Len()
	if room < len(p) {
		b.truncated = true
		if room > 0 {
			b.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return b.buf.Write(p)
}

func runCommand(ctx context.Context, req *agentproto.Request) *agentproto.Response {
	if req.TimeoutMs > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.TimeoutMs)*time.Millisecond)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, req.Argv[0], req.Argv[1:]...)
	cmd.Env = append(os.Environ(), req.Env...)
	cmd.Dir = "/"
	cmd.Stdin = bytes.NewReader(req.Stdin)
	// Own process group, so a timeout kills the command's children too (a shell pipeline).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Do not wait forever for grandchildren that keep the output pipes open.
	cmd.WaitDelay = 2 * time.Second
	stdout := &cappedBuffer{max: agentproto.MaxData}
	stderr := &cappedBuffer{max: agentproto.MaxData}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	err := cmd.Run()
	resp := &agentproto.Response{
		Stdout:    stdout.buf.Bytes(),
		Stderr:    stderr.buf.Bytes(),
		Truncated: stdout.truncated || stderr.truncated,
	}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		resp.TimedOut = true
		resp.ExitCode = -1
	case errors.As(err, &exitErr):
		resp.ExitCode = exitErr.ExitCode()
		if resp.ExitCode < 0 { // killed by a signal
			if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				resp.ExitCode = 128 + int(ws.Signal())
			}
		}
	default:
		return errResponse(err)
	}
	return resp
}
