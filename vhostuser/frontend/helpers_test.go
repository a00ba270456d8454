package frontend

import (
	"errors"
	"net"
)

func asOpError(err error, op **net.OpError) bool { return errors.As(err, op) }
