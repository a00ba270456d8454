package vmsnap

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"syscall"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// qemuMonitor is go-qemu's QMP socket monitor with every call bounded.
// go-qemu's Connect and Run wait without a limit (a QMP socket that another
// client holds accepts the connection but never greets; a hung QEMU never
// answers), so each call runs in a goroutine and a deadline closes the
// connection, which makes go-qemu give up and return.
type qemuMonitor struct {
	path string
	mon  *goqmp.SocketMonitor
	dead bool // a call timed out and closed the connection
}

func dialQEMU(ctx context.Context, path string) (*qemuMonitor, error) {
	timeout := timeLeft(ctx)
	if timeout <= 0 {
		return nil, fmt.Errorf("QEMU QMP %s: no time left to connect", path)
	}
	var mon *goqmp.SocketMonitor
	var err error
	for {
		mon, err = goqmp.NewSocketMonitor("unix", path, timeout)
		// EAGAIN: the monitor's listen backlog is full, which happens
		// while another client holds the socket and others wait.
		if err == nil || !errors.Is(err, syscall.EAGAIN) || timeLeft(ctx) <= 0 || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if errors.Is(err, syscall.EAGAIN) {
		return nil, fmt.Errorf("QEMU QMP %s: busy: %w (is another client, e.g. libvirt, connected to this socket? QEMU serves one at a time)", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("QEMU QMP %s: %w", path, err)
	}
	done := make(chan error, 1)
	go func() { done <- mon.Connect() }()
	select {
	case err := <-done:
		if err != nil {
			mon.Disconnect()
			return nil, fmt.Errorf("QEMU QMP %s: handshake: %w", path, err)
		}
	case <-ctx.Done():
		mon.Disconnect()
		<-done
		if ctx.Err() == context.Canceled {
			return nil, fmt.Errorf("QEMU QMP %s: %w", path, ctx.Err())
		}
		// QEMU serves one client per QMP socket; others wait for a greeting.
		return nil, fmt.Errorf("QEMU QMP %s: no greeting within %v (is another client, e.g. libvirt, connected to this socket? QEMU serves one at a time)", path, timeout.Round(time.Millisecond))
	}
	return &qemuMonitor{path: path, mon: mon}, nil
}

// run executes cmd and returns its "return" value. When ctx ends first
// the connection is closed and the monitor is dead.
func (q *qemuMonitor) run(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	if q.dead {
		return nil, fmt.Errorf("QEMU %s: connection closed after an earlier timeout", cmd)
	}
	timeout := timeLeft(ctx)
	if timeout <= 0 || ctx.Err() != nil {
		return nil, fmt.Errorf("QEMU %s: not sent: %w", cmd, context.Cause(ctx))
	}
	b, err := json.Marshal(goqmp.Command{Execute: cmd, Args: args})
	if err != nil {
		return nil, err
	}
	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := q.mon.Run(b)
		done <- result{out, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return nil, fmt.Errorf("QEMU %s: %w", cmd, r.err)
		}
		var reply struct {
			Return json.RawMessage `json:"return"`
		}
		if err := json.Unmarshal(r.out, &reply); err != nil {
			return nil, fmt.Errorf("QEMU %s: reply %q: %w", cmd, r.out, err)
		}
		return reply.Return, nil
	case <-ctx.Done():
		q.dead = true
		q.mon.Disconnect()
		<-done
		if ctx.Err() == context.Canceled {
			return nil, fmt.Errorf("QEMU %s: %w", cmd, ctx.Err())
		}
		return nil, fmt.Errorf("QEMU %s: no answer within %v", cmd, timeout.Round(time.Millisecond))
	}
}

// Status is QEMU's query-status answer.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"` // "running", "paused", "prelaunch", ...
}

func (q *qemuMonitor) status(ctx context.Context) (Status, error) {
	raw, err := q.run(ctx, "query-status", nil)
	if err != nil {
		return Status{}, err
	}
	var st Status
	if err := json.Unmarshal(raw, &st); err != nil {
		return Status{}, fmt.Errorf("QEMU query-status: %w", err)
	}
	if st.Status == "" {
		return Status{}, errors.New("QEMU query-status: no status in the reply")
	}
	return st, nil
}

func (q *qemuMonitor) close() {
	if !q.dead {
		q.mon.Disconnect()
		q.dead = true
	}
}

// timeLeft is the time until ctx's deadline (callers always set one).
func timeLeft(ctx context.Context) time.Duration {
	d, ok := ctx.Deadline()
	if !ok {
		return DefaultTimeout
	}
	return time.Until(d)
}
