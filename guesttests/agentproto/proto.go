// Package agentproto is the wire protocol between the guest agent (cmd/thinblk-agent) and the
// host-side test harness. It runs over any byte stream: AF_VSOCK where the host has
// vhost-vsock, a virtio-serial port otherwise.
//
// Each message is one frame:
//
//	magic "TBA1" | kind u8 | 3 zero bytes | id u32 BE | body length u32 BE | body (JSON)
//
// The host sends KindRequest frames, the agent answers each with a KindResponse frame carrying
// the same id. Requests are served one at a time, in order.
package agentproto

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Magic starts every frame; a stream that loses sync fails at the next frame instead of
// misreading payload bytes as a header.
var Magic = [4]byte{'T', 'B', 'A', '1'}

const (
	// HeaderSize is the fixed frame header length.
	HeaderSize = 16
	// MaxBody caps one frame's body so that a corrupt length cannot make either side
	// allocate without bound. File transfers and command output must fit in it.
	MaxBody = 64 << 20
	// MaxArgs caps argv and env entries of one exec request.
	MaxArgs = 4096
	// MaxData caps file contents and each of stdout and stderr: JSON's base64 makes them 4/3
	// larger, and together they must stay under MaxBody.
	MaxData = 16 << 20

	// SerialPortName is the virtio-serial port the agent serves when there is no vsock.
	SerialPortName = "org.thinblk.agent"
	// VsockPort is the AF_VSOCK port the agent listens on.
	VsockPort = 5250
)

// Kind says what a frame carries.
type Kind uint8

const (
	KindRequest  Kind = 1
	KindResponse Kind = 2
)

// Op is the operation a request asks for.
type Op string

const (
	OpPing      Op = "ping"
	OpExec      Op = "exec"
	OpWriteFile Op = "write_file"
	OpReadFile  Op = "read_file"
	OpPowerOff  Op = "power_off"
)

// Request is what the host asks the agent to do. Fields not used by Op must be empty.
type Request struct {
	Op Op `json:"op"`
	// exec
	Argv      []string `json:"argv,omitempty"`
	Env       []string `json:"env,omitempty"` // added to the agent's environment, KEY=VALUE
	Stdin     []byte   `json:"stdin,omitempty"`
	TimeoutMs int64    `json:"timeout_ms,omitempty"` // 0: no limit beyond the host's own
	// write_file, read_file
	Path string `json:"path,omitempty"`
	Data []byte `json:"data,omitempty"`
	Mode uint32 `json:"mode,omitempty"` // permission bits for write_file; 0 means 0644
}

// Response is the agent's answer. Error is set when the operation itself could not be done
// (command not found, file missing); a command that ran and failed has ExitCode != 0 instead.
type Response struct {
	Error    string `json:"error,omitempty"`
	ExitCode int    `json:"exit_code"`
	TimedOut bool   `json:"timed_out,omitempty"`
	Stdout   []byte `json:"stdout,omitempty"`
	Stderr   []byte `json:"stderr,omitempty"`
	// Truncated reports that stdout or stderr was cut to fit in MaxBody.
	Truncated bool   `json:"truncated,omitempty"`
	Data      []byte `json:"data,omitempty"` // read_file
}

// Frame is one decoded frame, body still encoded.
type Frame struct {
	Kind Kind
	ID   uint32
	Body []byte
}

// ErrFrame marks a malformed frame: the stream is out of sync and should be closed.
var ErrFrame = errors.New("agentproto: malformed frame")

// WriteFrame encodes f to w in a single Write, so that frames from one writer never interleave.
func WriteFrame(w io.Writer, f Frame) error {
	if len(f.Body) > MaxBody {
		return fmt.Errorf("write frame: body of %d bytes exceeds %d: %w", len(f.Body), MaxBody, ErrFrame)
	}
	buf := make([]byte, HeaderSize+len(f.Body))
	copy(buf[0:4], Magic[:])
	buf[4] = byte(f.Kind)
	binary.BigEndian.PutUint32(buf[8:12], f.ID)
	binary.BigEndian.PutUint32(buf[12:16], uint32(len(f.Body)))
	copy(buf[HeaderSize:], f.Body)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}

// ReadFrame reads one frame. It returns io.EOF only on a clean end of stream before a frame.
func ReadFrame(r io.Reader) (Frame, error) {
	var hdr [HeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return Frame{}, io.EOF
		}
		return Frame{}, fmt.Errorf("read frame header: %w", err)
	}
	f, n, err := parseHeader(hdr[:])
	if err != nil {
		return Frame{}, err
	}
	f.Body = make([]byte, n)
	if _, err := io.ReadFull(r, f.Body); err != nil {
		return Frame{}, fmt.Errorf("read frame body (%d bytes): %w", n, err)
	}
	return f, nil
}

func parseHeader(hdr []byte) (Frame, uint32, error) {
	if !bytes.Equal(hdr[0:4], Magic[:]) {
		return Frame{}, 0, fmt.Errorf("bad magic %q: %w", hdr[0:4], ErrFrame)
	}
	kind := Kind(hdr[4])
	if kind != KindRequest && kind != KindResponse {
		return Frame{}, 0, fmt.Errorf("unknown kind %d: %w", kind, ErrFrame)
	}
	if hdr[5] != 0 || hdr[6] != 0 || hdr[7] != 0 {
		return Frame{}, 0, fmt.Errorf("reserved header bytes set: %w", ErrFrame)
	}
	n := binary.BigEndian.Uint32(hdr[12:16])
	if n > MaxBody {
		return Frame{}, 0, fmt.Errorf("body length %d exceeds %d: %w", n, MaxBody, ErrFrame)
	}
	return Frame{Kind: kind, ID: binary.BigEndian.Uint32(hdr[8:12])}, n, nil
}

// EncodeRequest makes a request frame.
func EncodeRequest(id uint32, req *Request) (Frame, error) {
	if err := req.Validate(); err != nil {
		return Frame{}, err
	}
	body, err := json.Marshal(req)
	if err != nil {
		return Frame{}, fmt.Errorf("encode request: %w", err)
	}
	return Frame{Kind: KindRequest, ID: id, Body: body}, nil
}

// DecodeRequest decodes and validates a request frame.
func DecodeRequest(f Frame) (*Request, error) {
	if f.Kind != KindRequest {
		return nil, fmt.Errorf("frame kind %d is not a request: %w", f.Kind, ErrFrame)
	}
	var req Request
	if err := strictUnmarshal(f.Body, &req); err != nil {
		return nil, fmt.Errorf("decode request: %w", err)
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

// EncodeResponse makes a response frame.
func EncodeResponse(id uint32, resp *Response) (Frame, error) {
	body, err := json.Marshal(resp)
	if err != nil {
		return Frame{}, fmt.Errorf("encode response: %w", err)
	}
	return Frame{Kind: KindResponse, ID: id, Body: body}, nil
}

// DecodeResponse decodes a response frame.
func DecodeResponse(f Frame) (*Response, error) {
	if f.Kind != KindResponse {
		return nil, fmt.Errorf("frame kind %d is not a response: %w", f.Kind, ErrFrame)
	}
	var resp Response
	if err := strictUnmarshal(f.Body, &resp); err != nil {
		return nil, fmt.Errorf("decode response: %w", err)
	}
	return &resp, nil
}

func strictUnmarshal(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrFrame, err)
	}
	if dec.More() {
		return fmt.Errorf("trailing data after body: %w", ErrFrame)
	}
	return nil
}

// Validate checks that a request is well formed for its Op.
func (r *Request) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("invalid %s request: %s: %w", r.Op, fmt.Sprintf(format, args...), ErrFrame)
	}
	if len(r.Argv) > MaxArgs || len(r.Env) > MaxArgs {
		return bad("more than %d argv or env entries", MaxArgs)
	}
	if r.TimeoutMs < 0 {
		return bad("negative timeout")
	}
	switch r.Op {
	case OpPing, OpPowerOff:
		if len(r.Argv) != 0 || r.Path != "" || len(r.Data) != 0 || len(r.Stdin) != 0 {
			return bad("unexpected fields")
		}
	case OpExec:
		if len(r.Argv) == 0 || r.Argv[0] == "" {
			return bad("empty argv")
		}
		if r.Path != "" || len(r.Data) != 0 {
			return bad("unexpected fields")
		}
		if len(r.Stdin) > MaxData {
			return bad("stdin of %d bytes exceeds %d", len(r.Stdin), MaxData)
		}
	case OpWriteFile, OpReadFile:
		if r.Path == "" {
			return bad("empty path")
		}
		if len(r.Argv) != 0 || len(r.Stdin) != 0 {
			return bad("unexpected fields")
		}
		if r.Op == OpReadFile && len(r.Data) != 0 {
			return bad("data on read")
		}
		if len(r.Data) > MaxData {
			return bad("data of %d bytes exceeds %d", len(r.Data), MaxData)
		}
	default:
		return bad("unknown op")
	}
	return nil
}
