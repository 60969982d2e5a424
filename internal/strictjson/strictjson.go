// Package strictjson decodes JSON from trust boundaries and state files the
// one way Isthmus does it: unknown fields and anything after the value are
// errors, so a typo or a truncated write never passes as valid.
package strictjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
)

// ErrTrailingData is returned when something follows the JSON value.
var ErrTrailingData = errors.New("trailing data after the JSON value")

// Decode decodes data into v, rejecting unknown fields and trailing data.
func Decode(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return ErrTrailingData
	}
	return nil
}
