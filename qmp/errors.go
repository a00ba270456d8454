package qmp

import (
	"errors"
	"fmt"
)

// Error classes that QEMU uses and QMP clients know. Handlers normally
// return GenericError; the others exist for compatibility with clients that
// look at the class.
const (
	ClassGenericError    = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
	ClassDeviceNotFound  = "DeviceNotFound"
	ClassDeviceNotActive = "DeviceNotActive"
)

// Error is a QMP error reply. Handlers return it to choose the class; any
// other error becomes a GenericError carrying the error's text. The client
// returns it for error replies.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error returns the description; the class is in the Class field.
func (e *Error) Error() string { return e.Desc }

// Errorf returns a GenericError with a formatted description.
func Errorf(format string, a ...any) *Error {
	return &Error{Class: ClassGenericError, Desc: fmt.Sprintf(format, a...)}
}

// toError turns a handler's error into the error object sent to the
// client. A wrapped *Error gives the class; the description is the whole
// error text, so that context added by wrapping is kept.
func toError(err error) *Error {
	var qe *Error
	if errors.As(err, &qe) {
		class := qe.Class
		if class == "" {
			class = ClassGenericError
		}
		desc := qe.Desc
		if err != error(qe) {
			desc = err.Error()
		}
		return &Error{Class: class, Desc: desc}
	}
	return &Error{Class: ClassGenericError, Desc: err.Error()}
}
