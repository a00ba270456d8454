package frontend

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/thinblk/thinblk/vhostuser"
)

// fakeBackend accepts one connection and hands it to serve.
func fakeBackend(t *testing.T, serve func(c *vhostuser.Conn)) string {
	sock := filepath.Join(t.TempDir(), "fake.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		uc, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		c := vhostuser.NewConn(uc)
		serve(c)
		c.Close()
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return sock
}

// answering is a back-end that offers VERSION_1 and the protocol features
// proto, answers req with reply and leaves every other request unanswered.
func answering(proto uint64, req vhostuser.Request, reply []byte) func(c *vhostuser.Conn) {
	return func(c *vhostuser.Conn) {
		for {
			m, err := c.Read()
			if err != nil {
				return
			}
			switch m.Header.Request {
			case vhostuser.ReqGetFeatures:
				c.Reply(m.Header, vhostuser.EncodeU64(1<<32|1<<vhostuser.FeatureProtocolFeatures))
			case vhostuser.ReqGetProtocolFeatures:
				c.Reply(m.Header, vhostuser.EncodeU64(proto))
			case req:
				c.Reply(m.Header, reply)
			}
		}
	}
}

func TestDialHostileBackends(t *testing.T) {
	cases := []struct {
		name  string
		serve func(c *vhostuser.Conn)
		want  string
	}{
		{"silent", func(c *vhostuser.Conn) { time.Sleep(1500 * time.Millisecond) }, "GET_FEATURES"},
		{"hangs up", func(c *vhostuser.Conn) {}, "GET_FEATURES"},
		{"wrong reply", func(c *vhostuser.Conn) {
			m, _ := c.Read()
			c.Write(vhostuser.Header{Request: vhostuser.ReqGetQueueNum, Flags: vhostuser.FlagReply}, vhostuser.EncodeU64(1))
			_ = m
		}, "unexpected reply"},
		{"short payload", func(c *vhostuser.Conn) {
			m, _ := c.Read()
			c.Reply(m.Header, []byte{1, 2})
		}, "payload too short"},
		{"no VERSION_1", func(c *vhostuser.Conn) {
			m, _ := c.Read()
			c.Reply(m.Header, vhostuser.EncodeU64(1<<vhostuser.FeatureProtocolFeatures))
		}, "VERSION_1"},
		{"absurd queue count", answering(1<<vhostuser.ProtoMQ|1<<vhostuser.ProtoConfig,
			vhostuser.ReqGetQueueNum, vhostuser.EncodeU64(1<<40)), "queues"},
		{"short config", answering(1<<vhostuser.ProtoConfig,
			vhostuser.ReqGetConfig, vhostuser.ConfigSpace{Data: make([]byte, 8)}.Encode()), "bytes of config"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sock := fakeBackend(t, c.serve)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			start := time.Now()
			d, err := Dial(ctx, sock, Options{Timeout: 500 * time.Millisecond})
			if err == nil {
				d.Close()
				t.Fatalf("Dial succeeded")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not mention %q", err, c.want)
			}
			if time.Since(start) > 3*time.Second {
				t.Errorf("Dial took %v to fail", time.Since(start))
			}
		})
	}
}

func TestDialTooManyQueues(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			sock := b.start(t, newImage(t, 1<<20), serveOpts{queues: 2})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			time.Sleep(50 * time.Millisecond)
			d, err := Dial(ctx, sock, Options{NumQueues: 3})
			if err == nil {
				d.Close()
				t.Fatalf("Dial with 3 queues on a 2-queue back-end succeeded")
			}
			if !strings.Contains(err.Error(), "3 queues requested, back-end offers 2") {
				t.Errorf("error: %v", err)
			}
		})
	}
}
