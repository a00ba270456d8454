package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"testing"
	"time"
)

// FuzzServerInput feeds arbitrary bytes to a live connection, then a
// control character (which resets the parser) and a marker command: the
// server must answer the marker, with only valid JSON lines before it, and
// must not panic or hang.
func FuzzServerInput(f *testing.F) {
	for _, s := range []string{
		`{"execute":"qmp_capabilities"}{"execute":"echo","arguments":{"a":[1]},"id":1}`,
		`{"execute":"qmp_capabilities"}{"execute":"boom"}`,
		`{"execute":"qmp_capabilities"}{"execute":"query-commands","id":{"x":null}}`,
		`{"execute": }]nonsense 42 "s"`,
		`{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}`,
		`{"exec-oob":"x"}{"execute":"x","extra":1}`,
		`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[`,
		`{"execute":"qmp_capabilities"}{"execute":"echo","arguments":{"s":"ü\u00fc"},"id":"ü"}`,
		"\xff\xfe{\"execute\"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		s := NewServer(Options{MaxMessageSize: 4096, MaxDepth: 16, HandshakeTimeout: 10 * time.Second})
		defer s.Close()
		s.Register("echo", func(_ context.Context, raw json.RawMessage) (any, error) { return raw, nil })
		s.Register("boom", func(context.Context, json.RawMessage) (any, error) { panic("boom") })
		srv, cli := net.Pipe()
		defer cli.Close()
		s.accept(srv)

		lines := make(chan []byte, 1)
		readErr := make(chan error, 1)
		done := make(chan struct{})
		defer close(done)
		go func() {
			r := bufio.NewReaderSize(cli, 1<<16)
			for {
				line, err := r.ReadBytes('\n')
				if err != nil {
					readErr <- err
					return
				}
				select {
				case lines <- line:
				case <-done:
					return
				}
			}
		}()
		go func() {
			cli.Write(in)
			cli.Write([]byte("\x01" + `{"execute":"query-version","id":"marker-7f3a"}`))
		}()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case line := <-lines:
				var m map[string]json.RawMessage
				if err := json.Unmarshal(line, &m); err != nil {
					t.Fatalf("invalid output line %q: %v", line, err)
				}
				for _, c := range line {
					if c >= 0x80 {
						t.Fatalf("non-ASCII output %q", line)
					}
				}
				if string(m["id"]) == `"marker-7f3a"` {
					return
				}
			case err := <-readErr:
				t.Fatalf("connection ended before the marker's reply: %v", err)
			case <-deadline:
				t.Fatal("no reply to the marker")
			}
		}
	})
}
