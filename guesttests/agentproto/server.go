package agentproto

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
)

// Handler carries out one request. It never returns nil.
type Handler interface {
	Handle(ctx context.Context, req *Request) *Response
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, req *Request) *Response

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, req *Request) *Response { return f(ctx, req) }

// ErrPowerOff is returned by Serve after it has answered a power-off request: the caller
// powers the machine off.
var ErrPowerOff = errors.New("agentproto: power off requested")

// Serve answers requests from rw until the stream ends (nil), a frame is malformed, ctx ends,
// or a power-off request has been acknowledged (ErrPowerOff). A well-framed request that fails
// validation gets an error response and the stream goes on.
func Serve(ctx context.Context, rw io.ReadWriter, h Handler) error {
	r := bufio.NewReaderSize(rw, 64<<10)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		f, err := ReadFrame(r)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		var resp *Response
		req, err := DecodeRequest(f)
		if err != nil {
			resp = &Response{Error: err.Error(), ExitCode: -1}
		} else {
			resp = h.Handle(ctx, req)
		}
		out, err := EncodeResponse(f.ID, resp)
		if err != nil {
			return err
		}
		if err := WriteFrame(rw, out); err != nil {
			return fmt.Errorf("answer request %d: %w", f.ID, err)
		}
		if req != nil && req.Op == OpPowerOff {
			return ErrPowerOff
		}
	}
}
