package stream

import (
	"context"
	"errors"
	"fmt"
	"net"
)

// Accept waits for the connection a stream's peer (serve, told the
// listener's address over its control socket) makes to ln, or for the
// command that told it, done, to fail before connecting. A command that
// succeeded has connected: its connection is taken from the backlog even
// when the answer came first (a short stream is written whole into the
// socket's buffer before the accept is seen); its nil result is then put
// back into done for the caller. A failed command's error is returned.
func Accept(ctx context.Context, ln net.Listener, done chan error) (net.Conn, error) {
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		ch <- accepted{c, err}
	}()
	select {
	case a := <-ch:
		return a.c, a.err
	case err := <-done:
		if err == nil {
			// A short stream: written whole and answered before the
			// accept was seen; the connection waits in the backlog with
			// its bytes (closing the listener now would drop it).
			done <- err // for the caller, who waits for the answer
			select {
			case a := <-ch:
				return a.c, a.err
			case <-ctx.Done():
				ln.Close()
				return nil, errors.New("answered, but its connection never came")
			}
		}
		ln.Close()
		if a := <-ch; a.c != nil {
			a.c.Close()
		}
		return nil, err
	case <-ctx.Done():
		ln.Close()
		if a := <-ch; a.c != nil {
			a.c.Close()
		}
		return nil, fmt.Errorf("no connection: %w", ctx.Err())
	}
}
