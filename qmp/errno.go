package qmp

import "syscall"

var (
	errPipe      = syscall.EPIPE
	errConnReset = syscall.ECONNRESET
)
