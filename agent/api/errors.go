package api

import (
	"errors"
	"fmt"
	"net/http"
)

// Error is an error with the HTTP status the API answers it with. The
// client returns it for every non-2xx answer.
type Error struct {
	Status int
	Err    error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Errorf builds an error answered with status (fmt.Errorf rules, %w works).
func Errorf(status int, format string, args ...any) error {
	return &Error{Status: status, Err: fmt.Errorf(format, args...)}
}

// WithStatus makes err answer with status, keeping its message.
func WithStatus(status int, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Status: status, Err: err}
}

// StatusOf is the HTTP status err is answered with: the outermost Error's
// status, or 500.
func StatusOf(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return http.StatusInternalServerError
}

// IsNotFound reports whether err is answered with 404.
func IsNotFound(err error) bool { return StatusOf(err) == http.StatusNotFound }
