package agentproto

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestFrameRoundTrip(t *testing.T) {
	reqs := []*Request{
		{Op: OpPing},
		{Op: OpExec, Argv: []string{"/bin/echo", "hi"}, Env: []string{"A=B"}, Stdin: []byte{0, 1, 2}, TimeoutMs: 1500},
		{Op: OpWriteFile, Path: "/tmp/x", Data: []byte("data\x00\xff"), Mode: 0o600},
		{Op: OpReadFile, Path: "/tmp/x"},
		{Op: OpPowerOff},
	}
	var buf bytes.Buffer
	for i, r := range reqs {
		f, err := EncodeRequest(uint32(i+7), r)
		if err != nil {
			t.Fatal(err)
		}
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	for i, want := range reqs {
		f, err := ReadFrame(&buf)
		if err != nil {
			t.Fatal(err)
		}
		if f.ID != uint32(i+7) || f.Kind != KindRequest {
			t.Fatalf("frame %d: id %d kind %d", i, f.ID, f.Kind)
		}
		got, err := DecodeRequest(f)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("request %d: got %+v, want %+v", i, got, want)
		}
	}
	if _, err := ReadFrame(&buf); err != io.EOF {
		t.Errorf("after the last frame: %v, want io.EOF", err)
	}
}

func TestReadFrameRejects(t *testing.T) {
	good, err := EncodeRequest(1, &Request{Op: OpPing})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteFrame(&buf, good); err != nil {
		t.Fatal(err)
	}
	enc := buf.Bytes()
	mutate := func(f func(b []byte) []byte) []byte {
		return f(append([]byte(nil), enc...))
	}
	cases := map[string][]byte{
		"bad magic":     mutate(func(b []byte) []byte { b[0] = 'X'; return b }),
		"unknown kind":  mutate(func(b []byte) []byte { b[4] = 9; return b }),
		"reserved set":  mutate(func(b []byte) []byte { b[6] = 1; return b }),
		"huge length":   mutate(func(b []byte) []byte { b[12], b[13] = 0xff, 0xff; return b }),
		"short body":    enc[:len(enc)-1],
		"short header":  enc[:HeaderSize-3],
		"length beyond": mutate(func(b []byte) []byte { b[15]++; return b }),
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := ReadFrame(bytes.NewReader(in))
			if err == nil || err == io.EOF {
				t.Fatalf("ReadFrame accepted it: %v", err)
			}
		})
	}
}

func TestDecodeRequestRejects(t *testing.T) {
	cases := map[string]string{
		"unknown op":      `{"op":"format_host"}`,
		"exec no argv":    `{"op":"exec"}`,
		"exec empty arg0": `{"op":"exec","argv":[""]}`,
		"read no path":    `{"op":"read_file"}`,
		"read with data":  `{"op":"read_file","path":"/x","data":"AA=="}`,
		"ping with argv":  `{"op":"ping","argv":["x"]}`,
		"unknown field":   `{"op":"ping","rm":"-rf"}`,
		"negative limit":  `{"op":"exec","argv":["x"],"timeout_ms":-1}`,
		"trailing data":   `{"op":"ping"}{"op":"ping"}`,
		"not json":        `op=ping`,
		"wrong type":      `{"op":"exec","argv":"x"}`,
	}
	for name, body := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := DecodeRequest(Frame{Kind: KindRequest, ID: 1, Body: []byte(body)})
			if !errors.Is(err, ErrFrame) {
				t.Fatalf("DecodeRequest(%s) = %v, want ErrFrame", body, err)
			}
		})
	}
	if _, err := DecodeRequest(Frame{Kind: KindResponse, Body: []byte(`{"op":"ping"}`)}); err == nil {
		t.Error("a response frame decoded as a request")
	}
}

// echoHandler answers exec with argv joined on stdout and stdin on stderr.
var echoHandler = HandlerFunc(func(ctx context.Context, req *Request) *Response {
	switch req.Op {
	case OpExec:
		if req.Argv[0] == "sleep" {
			<-ctx.Done()
			return &Response{TimedOut: true, ExitCode: -1}
		}
		return &Response{ExitCode: len(req.Argv), Stdout: []byte(strings.Join(req.Argv, " ")), Stderr: req.Stdin}
	case OpReadFile:
		if req.Path == "/missing" {
			return &Response{Error: "no such file", ExitCode: -1}
		}
		return &Response{Data: []byte("contents of " + req.Path)}
	}
	return &Response{}
})

func TestClientServer(t *testing.T) {
	hostEnd, guestEnd := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, guestEnd, echoHandler) }()
	c := NewClient(hostEnd)
	defer c.Close()

	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := c.Exec(ctx, []string{"a", "b", "c"}, nil, []byte("in"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 3 || string(res.Stdout) != "a b c" || string(res.Stderr) != "in" {
		t.Errorf("exec result %+v", res)
	}
	data, err := c.ReadFile(ctx, "/etc/x")
	if err != nil || string(data) != "contents of /etc/x" {
		t.Errorf("ReadFile = %q, %v", data, err)
	}
	if _, err := c.ReadFile(ctx, "/missing"); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("ReadFile of a missing file: %v", err)
	}
	if err := c.WriteFile(ctx, "/tmp/y", []byte("z"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, []string{""}, nil, nil, 0); err == nil {
		t.Error("client sent an invalid request")
	}
	if err := c.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, ErrPowerOff) {
		t.Errorf("Serve after power off returned %v, want ErrPowerOff", err)
	}
}

func TestServerAnswersInvalidRequest(t *testing.T) {
	hostEnd, guestEnd := net.Pipe()
	defer hostEnd.Close()
	go Serve(context.Background(), guestEnd, echoHandler)
	if err := WriteFrame(hostEnd, Frame{Kind: KindRequest, ID: 5, Body: []byte(`{"op":"nope"}`)}); err != nil {
		t.Fatal(err)
	}
	f, err := ReadFrame(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := DecodeResponse(f)
	if err != nil {
		t.Fatal(err)
	}
	if f.ID != 5 || resp.Error == "" {
		t.Errorf("invalid request answered with id %d, %+v", f.ID, resp)
	}
	// The stream goes on.
	c := NewClient(hostEnd)
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestClientContextEndsHungRequest(t *testing.T) {
	hostEnd, guestEnd := net.Pipe()
	defer guestEnd.Close()
	go Serve(context.Background(), guestEnd, echoHandler)
	c := NewClient(hostEnd)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Exec(ctx, []string{"sleep"}, nil, nil, 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hung exec returned %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("hung exec took %v to fail", d)
	}
	if err := c.Ping(context.Background()); err == nil {
		t.Error("client still usable after an interrupted request")
	}
}

func FuzzDecode(f *testing.F) {
	seed := func(kind Kind, body string) []byte {
		var buf bytes.Buffer
		_ = WriteFrame(&buf, Frame{Kind: kind, ID: 3, Body: []byte(body)})
		return buf.Bytes()
	}
	f.Add(seed(KindRequest, `{"op":"ping"}`))
	f.Add(seed(KindRequest, `{"op":"exec","argv":["/bin/sh","-c","true"],"env":["A=1"],"stdin":"aGk=","timeout_ms":5}`))
	f.Add(seed(KindRequest, `{"op":"write_file","path":"/x","data":"AAEC","mode":420}`))
	f.Add(seed(KindResponse, `{"exit_code":1,"stdout":"aGk=","timed_out":true,"truncated":true}`))
	f.Add(seed(KindRequest, `{"op":"exec","argv":[]}`))
	f.Add([]byte("TBA1\x01\x00\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		fr, err := ReadFrame(bytes.NewReader(in))
		if err != nil {
			return
		}
		if len(fr.Body) > MaxBody {
			t.Fatalf("frame body of %d bytes accepted", len(fr.Body))
		}
		if req, err := DecodeRequest(fr); err == nil {
			// Whatever decodes must encode again and decode to the same request.
			f2, err := EncodeRequest(fr.ID, req)
			if err != nil {
				t.Fatalf("decoded request does not re-encode: %v", err)
			}
			req2, err := DecodeRequest(f2)
			if err != nil || !reflect.DeepEqual(req, req2) {
				t.Fatalf("round trip changed %+v into %+v (%v)", req, req2, err)
			}
		}
		_, _ = DecodeResponse(fr)
	})
}
