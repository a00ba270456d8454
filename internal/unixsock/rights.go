package unixsock

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// Descriptors travel over a unix stream socket as SCM_RIGHTS control
// messages riding the first bytes of a message; the vhost-user connection
// and serve's hand-over connection both pass them this way.

// ParseRights takes the descriptors out of a received control message,
// close-on-exec, as files called name. It returns every descriptor it
// took even with an error, for the caller to close.
func ParseRights(oob []byte, name string) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var files []*os.File
	var perr error
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			perr = fmt.Errorf("parse rights: %w", err)
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), name))
		}
	}
	return files, perr
}

// WriteWithFiles sends b with the descriptors of files attached to its
// first bytes (the rest follows plainly if the socket took only part).
// The files stay open.
func WriteWithFiles(uc *net.UnixConn, b []byte, files []*os.File) error {
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, _, err := uc.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n < len(b) {
		_, err = uc.Write(b[n:])
	}
	return err
}

// CloseFiles closes every file in files that is not nil.
func CloseFiles(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}
