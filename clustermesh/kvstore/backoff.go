package kvstore

import (
	"context"
	"math/rand/v2"
	"time"
)

// backoff yields exponentially growing waits with jitter, so that many
// clients that lost the same server do not come back in lock step (the
// thundering herd of reconnecting agents).
type backoff struct {
	min, max time.Duration
	attempt  int
}

// next returns the wait before the next attempt: a random duration in
// [d/2, d] where d doubles from min up to max.
func (b *backoff) next() time.Duration {
	d := b.min << min(b.attempt, 30)
	if d <= 0 || d > b.max {
		d = b.max
	}
	b.attempt++
	half := d / 2
	return half + rand.N(half+1)
}

func (b *backoff) reset() { b.attempt = 0 }

// wait sleeps for the next backoff, returning ctx's error if it ends first.
func (b *backoff) wait(ctx context.Context) error {
	t := time.NewTimer(b.next())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
