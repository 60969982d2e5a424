// Package backoff yields exponentially growing waits with jitter, so that
// many clients that lost the same server do not come back in lock step
// (the thundering herd of reconnecting agents and mirrors).
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff doubles from Min up to Max; the zero attempt count starts at Min.
type Backoff struct {
	Min, Max time.Duration
	attempt  int
}

// Next returns the wait before the next attempt: a random duration in
// [d/2, d] where d doubles from Min up to Max.
func (b *Backoff) Next() time.Duration {
	d := b.Min << min(b.attempt, 30)
	if d <= 0 || d > b.Max {
		d = b.Max
	}
	b.attempt++
	half := d / 2
	return half + rand.N(half+1)
}

// Reset starts over at Min.
func (b *Backoff) Reset() { b.attempt = 0 }

// Wait sleeps for the next wait, returning ctx's error if it ends first.
func (b *Backoff) Wait(ctx context.Context) error {
	t := time.NewTimer(b.Next())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
