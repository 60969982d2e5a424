package strictjson

import (
	"errors"
	"testing"
)

func TestDecode(t *testing.T) {
	type rec struct {
		A int `json:"a"`
	}
	var r rec
	if err := Decode([]byte(`{"a": 1} `), &r); err != nil || r.A != 1 {
		t.Fatalf("valid: %v %+v", err, r)
	}
	if err := Decode([]byte(`{"a": 1, "b": 2}`), &r); err == nil {
		t.Fatal("unknown field accepted")
	}
	for _, in := range []string{`{"a": 1}{}`, `{"a": 1} x`, `{"a": 1}]`} {
		if err := Decode([]byte(in), &r); !errors.Is(err, ErrTrailingData) {
			t.Fatalf("%q: %v, want trailing data", in, err)
		}
	}
	if err := Decode([]byte(`{"a": `), &r); err == nil {
		t.Fatal("truncated input accepted")
	}
}
