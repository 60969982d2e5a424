package kvstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/isthmus-mesh/isthmus/internal/backoff"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// EventType says what an Event reports.
type EventType int

const (
	// EventUpsert: the key was created or changed.
	EventUpsert EventType = iota
	// EventDelete: the key was deleted (or, after a re-list, is known to
	// be gone).
	EventDelete
	// EventListDone: a complete (re)list has been delivered; every key
	// that exists at Event.Revision has been reported and every key that
	// vanished has been reported deleted.
	EventListDone
)

func (t EventType) String() string {
	switch t {
	case EventUpsert:
		return "upsert"
	case EventDelete:
		return "delete"
	case EventListDone:
		return "list-done"
	}
	return fmt.Sprintf("EventType(%d)", int(t))
}

// Event is one change seen by WatchPrefix.
type Event struct {
	Type  EventType
	Key   string // empty for EventListDone
	Value []byte // nil for EventDelete and EventListDone
	// Revision is the key's ModRevision for upserts, the deleting
	// revision for deletes, and the list's revision for EventListDone.
	Revision int64
}

// WatchPrefix streams the keys under prefix: first a list (one Upsert per
// existing key, then EventListDone), then every change from the list's
// revision on. When the watch fails (history compacted while disconnected,
// leader lost, stream closed), it waits with backoff and lists again,
// reporting only keys whose revision changed, a Delete for every key that
// existed before and did not come back, and EventListDone. So a consumer
// that applies the events in order is never left with stale keys.
//
// The channel is closed when ctx ends or the client is closed. Events are
// delivered unbuffered: a slow consumer slows the watch, it never loses
// events.
func (c *Client) WatchPrefix(ctx context.Context, prefix string) <-chan Event {
	ch := make(chan Event)
	go func() {
		defer close(ch)
		c.stats.watching(1)
		defer c.stats.watching(-1)
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stop := context.AfterFunc(c.ctx, cancel)
		defer stop()
		w := &watcher{c: c, prefix: prefix, out: ch, known: map[string]knownKey{}}
		w.run(ctx)
	}()
	return ch
}

type watcher struct {
	c      *Client
	prefix string
	out    chan<- Event
	// known maps every key the consumer was told about to its
	// ModRevision and the last list that found it, so a re-list can skip
	// unchanged keys and find the vanished ones.
	known map[string]knownKey
	lists uint64 // lists started
}

type knownKey struct {
	rev  int64
	list uint64
}

func (w *watcher) send(ctx context.Context, ev Event) bool {
	select {
	case w.out <- ev:
		if ev.Type != EventListDone {
			w.c.stats.watchEvent()
		}
		return true
	case <-ctx.Done():
		return false
	}
}

func (w *watcher) run(ctx context.Context) {
	log := w.c.log.With("prefix", w.prefix)
	b := backoff.Backoff{Min: w.c.cfg.BackoffMin, Max: w.c.cfg.BackoffMax}
	for first := true; ; first = false {
		if !first {
			w.c.stats.watchRelist()
		}
		rev, err := w.list(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("kvstore: watch list failed, retrying", "err", err)
			if b.Wait(ctx) != nil {
				return
			}
			continue
		}
		if rev < 0 { // ctx ended while sending
			return
		}
		b.Reset()
		err = w.watch(ctx, rev)
		if ctx.Err() != nil {
			return
		}
		w.c.stats.watchError()
		log.Warn("kvstore: watch failed, re-listing", "err", err)
		if b.Wait(ctx) != nil {
			return
		}
	}
}

// errStopped ends a list whose consumer went away.
var errStopped = errors.New("watch stopped")

// list delivers a full snapshot and returns its revision (-1 if ctx ended
// while delivering). Each page is delivered as it arrives (Client.listPages);
// if a later page fails, what was delivered stays known and the next list
// reports only what changed since, and deletes what vanished.
func (w *watcher) list(ctx context.Context) (int64, error) {
	w.lists++
	gen := w.lists
	rev, err := w.c.listPages(ctx, w.prefix, func(kvs []KeyValue) error {
		for _, kv := range kvs {
			k, ok := w.known[kv.Key]
			w.known[kv.Key] = knownKey{rev: kv.ModRevision, list: gen}
			if ok && k.rev == kv.ModRevision {
				continue // unchanged since the consumer last heard of it
			}
			if !w.send(ctx, Event{Type: EventUpsert, Key: kv.Key, Value: kv.Value, Revision: kv.ModRevision}) {
				return errStopped
			}
		}
		return nil
	})
	if errors.Is(err, errStopped) {
		return -1, nil
	}
	if err != nil {
		return 0, err
	}
	// Mark and sweep: whatever the consumer knew that is not in the new
	// snapshot was deleted while we were not watching.
	for key, k := range w.known {
		if k.list == gen {
			continue
		}
		delete(w.known, key)
		w.c.stats.watchStaleDelete()
		if !w.send(ctx, Event{Type: EventDelete, Key: key, Revision: rev}) {
			return -1, nil
		}
	}
	if !w.send(ctx, Event{Type: EventListDone, Revision: rev}) {
		return -1, nil
	}
	return rev, nil
}

// watch delivers changes after rev until the watch fails or ctx ends.
func (w *watcher) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// WithRequireLeader: a member cut off from its leader ends the watch
	// instead of silently delivering nothing.
	wch := w.c.cli.Watch(clientv3.WithRequireLeader(wctx), w.prefix,
		clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if resp.CompactRevision != 0 {
				return fmt.Errorf("history compacted at revision %d (watching from %d): %w", resp.CompactRevision, rev+1, err)
			}
			return err
		}
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			var out Event
			switch ev.Type {
			case clientv3.EventTypePut:
				w.known[key] = knownKey{rev: ev.Kv.ModRevision, list: w.lists}
				out = Event{Type: EventUpsert, Key: key, Value: ev.Kv.Value, Revision: ev.Kv.ModRevision}
			case clientv3.EventTypeDelete:
				if _, ok := w.known[key]; !ok {
					continue
				}
				delete(w.known, key)
				out = Event{Type: EventDelete, Key: key, Revision: ev.Kv.ModRevision}
			}
			if !w.send(ctx, out) {
				return ctx.Err()
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return fmt.Errorf("watch stream of %s closed", w.prefix)
}
