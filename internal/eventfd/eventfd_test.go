package eventfd

import (
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// polledFds lists the descriptors in the runtime's epoll set(s), read
// from /proc/self/fdinfo of every eventpoll descriptor of the process.
func polledFds(t *testing.T) map[int]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	polled := map[int]bool{}
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l != "anon_inode:[eventpoll]" {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		for _, line := range strings.Split(string(info), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "tfd:" {
				n, _ := strconv.Atoi(f[1])
				polled[n] = true
			}
		}
	}
	return polled
}

func TestAdoptLeavesThePoller(t *testing.T) {
	raw, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(raw), "kick") // as a received descriptor is
	if !polledFds(t)[raw] {
		t.Fatalf("a non-blocking eventfd from os.NewFile (fd %d) is not in the runtime's poller: the premise of this package is gone", raw)
	}
	e, err := Adopt(f)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	polled := polledFds(t)
	if polled[raw] || polled[e.Fd()] {
		t.Fatalf("adopted eventfd still polled by the runtime (fds %d, %d: %v)", raw, e.Fd(), polled)
	}
	if _, err := f.Stat(); err == nil {
		t.Fatal("Adopt left the *os.File open")
	}
	// Still non-blocking (the flag belongs to the description shared
	// with the front-end and must not change), and it works.
	if fl, err := unix.FcntlInt(uintptr(e.Fd()), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
		t.Fatalf("flags %#x, %v: want O_NONBLOCK kept", fl, err)
	}
	if ok, err := drain(e); ok || err != nil {
		t.Fatalf("drain of a clear eventfd = %v, %v", ok, err)
	}
	if err := e.Signal(); err != nil {
		t.Fatal(err)
	}
	if ok, err := drain(e); !ok || err != nil {
		t.Fatalf("drain after Signal = %v, %v", ok, err)
	}
	if e, err := Adopt(nil); e != nil || err != nil {
		t.Fatalf("Adopt(nil) = %v, %v", e, err)
	}
}

func TestFileSharesTheCounter(t *testing.T) {
	e, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	f, err := e.File("call")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Signal(); err != nil {
		t.Fatal(err)
	}
	back, err := Adopt(f)
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	if ok, err := drain(back); !ok || err != nil {
		t.Fatalf("signal not seen through File's descriptor: %v, %v", ok, err)
	}
}

// Close while signals run: no signal may write to the descriptor number
// after Close released it (another open would reuse it).
func TestCloseWhileSignalling(t *testing.T) {
	for range 50 {
		e, err := New()
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if err := e.Signal(); err != nil {
						if !errors.Is(err, os.ErrClosed) {
							t.Error(err)
						}
						return
					}
				}
			}()
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		// The number is free now; a new file takes it and must see no write.
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		w.Close()
		if b, _ := io.ReadAll(r); len(b) != 0 {
			t.Fatalf("%d bytes written after Close into the reused descriptor", len(b))
		}
		r.Close()
		if err := e.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	}
}

// drain reads and clears the counter; it reports whether it was set.
func drain(e *FD) (bool, error) {
	var b [8]byte
	_, err := unix.Read(e.Fd(), b[:])
	if errors.Is(err, unix.EAGAIN) {
		return false, nil
	}
	return err == nil, err
}
