// Package unixsock creates the unix sockets thinblk listens on (vhost-user
// disks, the QMP control socket) the same careful way: a socket file left
// by a dead process is replaced, one that something listens on is not, and
// nobody can connect before the socket has its final permissions. It also
// names the process at the other end of an accepted connection.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Listen creates a listening unix socket at path with permission bits
// mode and returns it with the socket file's identity, for Remove. The
// listener does not unlink the file on Close: call Remove.
func Listen(path string, mode os.FileMode) (*net.UnixListener, os.FileInfo, error) {
	if err := removeStale(path); err != nil {
		return nil, nil, err
	}
	ln, err := bindInPlace(path, mode.Perm())
	if err != nil {
		return nil, nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("stat socket %s: %w", path, err)
	}
	return ln, fi, nil
}

// Remove deletes the socket file at path if it is still the one that fi
// describes (another process may have replaced it since). Inode numbers are
// reused at once, so the bind time must match too.
func Remove(path string, fi os.FileInfo) error {
	cur, err := os.Stat(path)
	if err != nil || !os.SameFile(cur, fi) || !cur.ModTime().Equal(fi.ModTime()) {
		return nil
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove socket %s: %w", path, err)
	}
	return nil
}

// removeStale removes path if it is a socket that nobody listens on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("socket %s is in use: another process listens on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("probe existing socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// tmpSeq keeps temporary socket names of concurrent Listens apart.
var tmpSeq atomic.Uint64

// bindInPlace binds under a temporary name, sets the mode, then links the
// socket into place: nobody can connect while it still has the umask's
// permissions, and a path that appeared meanwhile is never replaced. Where
// a temporary name cannot work (path too long, no hard links) it binds in
// place and then sets the mode.
func bindInPlace(path string, mode os.FileMode) (*net.UnixListener, error) {
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".sock%d.%d.tmp", os.Getpid(), tmpSeq.Add(1)))
	if len(tmp) < len(unix.RawSockaddrUnix{}.Path) {
		os.Remove(tmp) // left over by an earlier process with this pid
		ln, err := bindChmod(tmp, mode)
		if err != nil {
			return nil, err
		}
		err = os.Link(tmp, path)
		os.Remove(tmp)
		if err == nil {
			return ln, nil
		}
		ln.Close()
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("put socket %s in place: %w", path, err)
		}
	}
	return bindChmod(path, mode)
}

func bindChmod(path string, mode os.FileMode) (*net.UnixListener, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // Remove deletes it, after checking it is ours
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("chmod socket %s: %w", path, err)
	}
	return ln, nil
}
