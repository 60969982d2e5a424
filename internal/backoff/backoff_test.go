package backoff

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	b := Backoff{Min: 10 * time.Millisecond, Max: 80 * time.Millisecond}
	for i, hi := range []time.Duration{10, 20, 40, 80, 80, 80} {
		hi *= time.Millisecond
		d := b.Next()
		if d < hi/2 || d > hi {
			t.Errorf("attempt %d: %s not in [%s, %s]", i, d, hi/2, hi)
		}
	}
	b.attempt = 1000 // no overflow into negative waits
	if d := b.Next(); d < 40*time.Millisecond || d > 80*time.Millisecond {
		t.Errorf("after many attempts: %s", d)
	}
	b.Reset()
	if d := b.Next(); d > 10*time.Millisecond {
		t.Errorf("after Reset: %s", d)
	}
}
