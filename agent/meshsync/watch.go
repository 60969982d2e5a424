package meshsync

import (
	"context"
	"sync"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
)

// Watch follows every prefix of WatchedPrefixes into t until ctx ends or c
// is closed. The kvstore watcher re-lists after any failure and reports
// what vanished meanwhile, so the tables converge after an outage without
// ever being flushed.
func Watch(ctx context.Context, c *kvstore.Client, t *Tables) {
	var wg sync.WaitGroup
	for _, p := range WatchedPrefixes(t.local.Cluster) {
		wg.Go(func() {
			for ev := range c.WatchPrefix(ctx, p) {
				t.Handle(p, ev)
			}
		})
	}
	wg.Wait()
}
