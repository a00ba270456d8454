package unixsock

import (
	"net"

	"golang.org/x/sys/unix"
)

// PeerCred is the process at the other end of uc, as the kernel recorded
// it when that process connected (SO_PEERCRED).
func PeerCred(uc *net.UnixConn) (*unix.Ucred, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, credErr
}

// PeerAttrs names the process at the other end of uc for log lines: its
// pid and uid, or nothing when they cannot be had.
func PeerAttrs(uc *net.UnixConn) []any {
	cred, err := PeerCred(uc)
	if err != nil {
		return nil
	}
	return []any{"peer_pid", cred.Pid, "peer_uid", cred.Uid}
}
