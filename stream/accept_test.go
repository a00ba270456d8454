package stream

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestAcceptAnsweredFirst: a peer that connected, wrote a short stream and
// answered before Accept ran still has its connection and bytes taken
// (the answer and the connection are both ready: a plain select between
// them picked the answer half the time and lost the stream); a command that
// failed before connecting returns its error.
func TestAcceptAnsweredFirst(t *testing.T) {
	for i := range 20 {
		ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("short stream"))
		c.Close()
		done := make(chan error, 1)
		done <- nil
		time.Sleep(time.Millisecond)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		got, err := Accept(ctx, ln, done)
		cancel()
		if err != nil {
			t.Fatalf("try %d: %v", i, err)
		}
		b, _ := io.ReadAll(got)
		got.Close()
		ln.Close()
		if string(b) != "short stream" {
			t.Fatalf("try %d: read %q", i, b)
		}
		if err := <-done; err != nil {
			t.Fatalf("try %d: the command's result was not put back: %v", i, err)
		}
	}
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	done <- errors.New("no such snapshot")
	if _, err := Accept(context.Background(), ln, done); err == nil || err.Error() != "no such snapshot" {
		t.Fatalf("failed command: %v", err)
	}
}
