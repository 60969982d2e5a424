package objects

import (
	"fmt"
	"reflect"
	"sync"
	"testing"
)

// A DecodeCache gives what Decode gives; a value equal to the one last
// decoded for its key gives the same objects (decoded once), another
// value or a forgotten key is decoded again, and errors are Decode's.
func TestDecodeCache(t *testing.T) {
	var c DecodeCache
	v1 := []byte(`{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"a"},"spec":{"vips":["10.96.0.1"],"ports":[{"port":80}]}}`)
	v2 := []byte(`{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"a"},"spec":{"vips":["10.96.0.2"],"ports":[{"port":80}]}}`)
	want1, _ := Decode(v1)
	a, err := c.Decode("k", v1)
	if err != nil || !reflect.DeepEqual(a, want1) {
		t.Fatalf("first decode %v %v, want %v", a, err, want1)
	}
	if b, _ := c.Decode("k", append([]byte(nil), v1...)); b[0] != a[0] {
		t.Error("an equal value was decoded again")
	}
	if b, _ := c.Decode("k", v2); b[0].(*Service).Spec.VIPs[0] != "10.96.0.2" {
		t.Errorf("another value gave %v", b[0])
	}
	if b, _ := c.Decode("other", v1); b[0] == a[0] {
		t.Error("another key shared the objects")
	}
	c.Forget("k")
	if b, _ := c.Decode("k", v2); len(b) != 1 {
		t.Errorf("after Forget: %v", b)
	}
	if _, err := c.Decode("bad", []byte(`{"kind":"Service"}`)); err == nil {
		t.Error("an invalid value decoded")
	}
	// Readers that come at once share one decode.
	for i := range 20 {
		v := fmt.Appendf(nil, `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"a"},"spec":{"vips":["10.96.1.%d"],"ports":[{"port":80}]}}`, i)
		var got [2][]Object
		var wg sync.WaitGroup
		for j := range got {
			wg.Go(func() { got[j], _ = c.Decode("k", v) })
		}
		wg.Wait()
		if got[0][0] != got[1][0] {
			t.Fatal("two readers at once decoded the same value twice")
		}
	}
	var none *DecodeCache
	if b, err := none.Decode("k", v1); err != nil || !reflect.DeepEqual(b, want1) {
		t.Errorf("nil cache: %v %v", b, err)
	}
}
