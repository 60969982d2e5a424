package kvstore

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// next reads one event or fails after a timeout.
func next(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("watch channel closed")
		}
		return ev
	case <-time.After(15 * time.Second):
		t.Fatal("no watch event within 15s")
	}
	return Event{}
}

func describe(ev Event) string {
	if ev.Type == EventListDone {
		return "list-done"
	}
	if ev.Type == EventDelete {
		return "delete " + ev.Key
	}
	return fmt.Sprintf("upsert %s=%s", ev.Key, ev.Value)
}

func expect(t *testing.T, ch <-chan Event, want ...string) {
	t.Helper()
	for _, w := range want {
		if got := describe(next(t, ch)); got != w {
			t.Fatalf("event %q, want %q", got, w)
		}
	}
}

func TestWatchPrefix(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)
	c.Put(ctx, "w/a", []byte("1"))
	c.Put(ctx, "w/b", []byte("2"))
	c.Put(ctx, "x/other", []byte("x"))

	wctx, cancel := context.WithCancel(ctx)
	ch := c.WatchPrefix(wctx, "w/")
	expect(t, ch, "upsert w/a=1", "upsert w/b=2", "list-done")

	c.Put(ctx, "w/c", []byte("3"))
	c.Put(ctx, "x/other", []byte("y")) // not under the prefix
	c.Delete(ctx, "w/a")
	c.Put(ctx, "w/b", []byte("22"))
	expect(t, ch, "upsert w/c=3", "delete w/a", "upsert w/b=22")

	cancel()
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("event after cancel")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed after cancel")
	}
}

// TestWatchRelistDeletesStale cuts the watcher off, changes and compacts
// etcd behind its back, and checks that after reconnecting it re-lists,
// reports only the changes and synthesises the deletion it missed.
func TestWatchRelistDeletesStale(t *testing.T) {
	ctx := testCtx(t)
	etcd := etcdtest.Start(t)
	direct := connect(t, etcd.Endpoint)
	proxy := etcdtest.StartProxy(t, etcd.Endpoint[len("http://"):])
	viaProxy := connect(t, "http://"+proxy.Addr)

	for _, k := range []string{"a", "b", "c"} {
		direct.Put(ctx, "s/"+k, []byte(k))
	}
	ch := viaProxy.WatchPrefix(ctx, "s/")
	expect(t, ch, "upsert s/a=a", "upsert s/b=b", "upsert s/c=c", "list-done")

	proxy.Cut()
	direct.Delete(ctx, "s/a")
	direct.Put(ctx, "s/b", []byte("B"))
	direct.Put(ctx, "s/d", []byte("d"))
	// Compact the history, so the watch cannot resume from where it was.
	resp, err := direct.cli.Get(ctx, "s/d")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	proxy.Restore()

	// c did not change and is not reported again; a is gone.
	expect(t, ch, "upsert s/b=B", "upsert s/d=d", "delete s/a", "list-done")
	st := viaProxy.Stats()
	if st.WatchRelists != 1 || st.WatchStaleDeletes != 1 || st.WatchErrors != 1 {
		t.Errorf("stats after relist: relists=%d stale=%d errors=%d", st.WatchRelists, st.WatchStaleDeletes, st.WatchErrors)
	}

	// The watch goes on after the relist.
	direct.Delete(ctx, "s/c")
	expect(t, ch, "delete s/c")
}

// TestWatchListPagesFailOver delivers a list page by page and breaks it
// between pages: the history is compacted while the watcher is cut off,
// so the rest of that list fails and a new one is made. What the consumer
// ends up with at the first list-done must be exactly the store's keys:
// the key deleted after it was delivered is reported deleted, the changed
// one reported with its new value, none lost or left over.
func TestWatchListPagesFailOver(t *testing.T) {
	ctx := testCtx(t)
	etcd := etcdtest.Start(t)
	direct := connect(t, etcd.Endpoint)
	proxy := etcdtest.StartProxy(t, etcd.Endpoint[len("http://"):])
	viaProxy := connect(t, "http://"+proxy.Addr)
	defer func(n int64) { listPageSize = n }(listPageSize)
	listPageSize = 3

	for i := range 10 {
		direct.Put(ctx, fmt.Sprintf("f/%02d", i), []byte(fmt.Sprint(i)))
	}
	ch := viaProxy.WatchPrefix(ctx, "f/")
	got := map[string]string{}
	apply := func(ev Event) bool {
		switch ev.Type {
		case EventUpsert:
			got[ev.Key] = string(ev.Value)
		case EventDelete:
			delete(got, ev.Key)
		case EventListDone:
			return true
		}
		return false
	}
	// The first page is being delivered (the consumer holds its third
	// key): cut the watcher off and change the store behind its back.
	for range 2 {
		if apply(next(t, ch)) {
			t.Fatal("list done after two keys")
		}
	}
	proxy.Cut()
	direct.Delete(ctx, "f/00") // delivered already
	direct.Delete(ctx, "f/08") // on a later page
	direct.Put(ctx, "f/05", []byte("five"))
	direct.Put(ctx, "f/10", []byte("ten"))
	resp, err := direct.cli.Get(ctx, "f/10")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	proxy.Restore()
	for !apply(next(t, ch)) {
	}
	kvs, _, err := direct.GetPrefix(ctx, "f/")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for _, kv := range kvs {
		want[kv.Key] = string(kv.Value)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after the list: %v\nthe store has: %v", got, want)
	}
	if st := viaProxy.Stats(); st.WatchRelists < 1 || st.WatchStaleDeletes < 1 {
		t.Errorf("the broken list was not redone: relists=%d stale deletes=%d", st.WatchRelists, st.WatchStaleDeletes)
	}
}
