package vmsnap

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeAgent answers the session's guest-sync-delimited with pre, then the real delimited
// reply, then reply (to the next command), and ends its side of the stream: a guest agent
// the guest controls.
func fakeAgent(conn *net.UnixConn, pre, reply []byte) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	r.ReadBytes(0xFF)
	var req struct {
		Arguments struct{ ID int64 }
	}
	if json.NewDecoder(r).Decode(&req) != nil {
		return
	}
	conn.Write(append(append(pre, fmt.Sprintf("\xff{\"return\": %d}\n", req.Arguments.ID)...), reply...))
	conn.CloseWrite()
	io.Copy(io.Discard, conn)
}

// agentPair connects a session to fakeAgent through a socket pair (a pipe could not end one
// direction only).
func agentPair(t *testing.T, pre, reply []byte) net.Conn {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "agent")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c.(*net.UnixConn)
	}
	go fakeAgent(conns[1], pre, reply)
	t.Cleanup(func() { conns[0].Close() })
	return conns[0]
}

// FuzzAgentReplies: whatever the guest's agent sends before the sync reply and instead of a
// command's reply, the session syncs or fails, and the command returns a result or an error,
// within the deadline and without panicking.
func FuzzAgentReplies(f *testing.F) {
	for _, s := range [][2]string{
		{"", `{"return": 2}`},
		{"\xff{\"return\": 7}\n{\"return\": {}}", `{"error": {"class": "GenericError", "desc": "frozen"}}`},
		{"\xff\xff{{{\xff\"", `{"return": "x"}`},
		{"\xff[1, {\"return\": 1}]", `{"return": 1`},
		{strings.Repeat("\xff}", 1000), "\xff"},
		{"\xff{\"return\": 1e999}", `{"return": -1}`},
	} {
		f.Add([]byte(s[0]), []byte(s[1]))
	}
	f.Fuzz(func(t *testing.T, pre, reply []byte) {
		host := agentPair(t, pre, reply)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		a := newGuestAgent("fuzz", host)
		if err := a.sync(ctx); err == nil {
			n, err := a.freeze(ctx)
			if err == nil && !bytes.Contains(reply, []byte(fmt.Sprint(n))) {
				t.Fatalf("freeze of %d from reply %q", n, reply)
			}
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("the session took %v", d)
		}
	})
}

// A guest agent that floods the channel ends the session once a command has read its budget,
// before the deadline, whether the flood has delimiters or not.
func TestAgentFloodEndsSession(t *testing.T) {
	for name, flood := range map[string][]byte{
		"no delimiter": bytes.Repeat([]byte("x"), 2*replyBudget),
		"delimiters":   bytes.Repeat([]byte("\xff}"), replyBudget),
	} {
		t.Run(name, func(t *testing.T) {
			host := agentPair(t, flood, nil)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			err := newGuestAgent("flood", host).sync(ctx)
			if !errors.Is(err, errReplyTooLong) {
				t.Fatalf("sync through %d bytes of flood: %v", len(flood), err)
			}
		})
	}
}
