package kvstore

import (
	"context"
	"sync"
	"time"
)

// SyncLoop is the loop of a server-side syncer that derives records from
// what it watches (the service syncer, LB-IPAM): it watches Prefixes,
// hands every event to Apply, and calls Write once something changed and
// Ready says the inputs are complete (every prefix listed once, so a
// partial view never deletes records), at most once per Debounce. A failed
// Write is retried with a delay doubling up to 10 s (Failed is told).
type SyncLoop struct {
	Prefixes []string
	Debounce time.Duration
	// Apply takes one event of prefix and reports whether a write may be
	// needed.
	Apply func(prefix string, ev Event) bool
	Ready func() bool
	Write func(ctx context.Context) error
	// Failed is told of a failed Write and when it is tried again.
	Failed func(err error, retry time.Duration)
}

// syncLoopMaxDrain bounds the queued events applied before a write: a
// flood must not hold the write back.
const syncLoopMaxDrain = 10_000

type prefixEvent struct {
	prefix string
	ev     Event
}

// RunSyncLoop runs l until ctx ends.
func (c *Client) RunSyncLoop(ctx context.Context, l SyncLoop) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan prefixEvent)
	var wg sync.WaitGroup
	for _, p := range l.Prefixes {
		ch := c.WatchPrefix(ctx, p)
		wg.Go(func() {
			for ev := range ch {
				select {
				case events <- prefixEvent{p, ev}:
				case <-ctx.Done():
					return
				}
			}
		})
	}
	defer wg.Wait()
	defer cancel()

	// A write is due once something changed; it waits until Debounce has
	// passed since the last one (or the retry delay after a failure).
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	armed := false
	var last time.Time // end of the last write
	retry := time.Duration(0)
	arm := func() {
		if armed {
			return
		}
		armed = true
		timer.Reset(max(time.Until(last.Add(l.Debounce)), retry))
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case e := <-events:
			if l.Apply(e.prefix, e.ev) && l.Ready() {
				arm()
			}
		case <-timer.C:
			armed = false
			// What is queued already goes into this write.
		drain:
			for range syncLoopMaxDrain {
				select {
				case e := <-events:
					l.Apply(e.prefix, e.ev)
				default:
					break drain
				}
			}
			if !l.Ready() {
				continue
			}
			err := l.Write(ctx)
			last = time.Now()
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				retry = min(max(2*retry, l.Debounce), 10*time.Second)
				if l.Failed != nil {
					l.Failed(err, retry)
				}
				arm()
				continue
			}
			retry = 0
		}
	}
}
