package mirror

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// pipelineMirror is a kind mirror of c2's ipcache writing into a real
// embedded etcd (fsync off).
func pipelineMirror(t *testing.T) (context.Context, *etcdserver.Server, *kindMirror) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := etcdserver.Start(ctx, etcdserver.Config{
		ClusterName: "c1", ClusterID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
		DataDir: filepath.Join(t.TempDir(), "c1"), ListenClient: etcdtest.FreeAddr(t), ListenPeer: etcdtest.FreeAddr(t),
		UnsafeNoFsync: true, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	m, err := New(Config{Local: srv.ClusterConfig(), Client: srv.Client(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	rcfg := records.ClusterConfig{Version: records.CurrentVersion, Name: "c2", ID: 2,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}}
	r := newRemote(m, Remote{Name: "c2", ClusterID: 2}, newStatusBox("c2"))
	sg := newSessionGate("c2", rcfg, m.cfg.limits())
	close(sg.nodesListed)
	km := newKindMirror(r, records.KindIP, 2, sg)
	return ctx, srv, km
}

// Batches of cache writes go out side by side (a live change does not wait
// for the commit of the batch before it), but a batch that names a key of
// one in flight waits for it: etcd may apply concurrent transactions in
// any order, and a key's writes must land in the order they were queued.
// The first batch is held; a disjoint second one must start meanwhile, a
// third that deletes the first one's key must not, and the cache ends as
// the remote is.
func TestPipelinedBatchesKeepKeyOrder(t *testing.T) {
	ctx, srv, km := pipelineMirror(t)

	// The commits, in the order they start; the first waits for release.
	var mu sync.Mutex
	var started [][]kvstore.Op
	release := make(chan struct{})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	defer releaseOnce() // a failed check must not leave a commit held
	km.commit = func(ctx context.Context, ops []kvstore.Op) error {
		mu.Lock()
		started = append(started, ops)
		first := len(started) == 1
		mu.Unlock()
		if first {
			<-release
		}
		return km.write(ctx, ops)
	}
	nStarted := func() int { mu.Lock(); defer mu.Unlock(); return len(started) }
	waitStarted := func(n int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); nStarted() < n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d commits started, want %d", nStarted(), n)
			}
		}
	}

	entry := func(a string) (string, string, []byte) {
		p := netip.MustParsePrefix(a + "/32")
		key := records.IPCacheKey("c2", "n1", p)
		ck, err := records.CacheKey(key, "c2")
		if err != nil {
			t.Fatal(err)
		}
		v, err := records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 1, Cluster: "c2"}.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		return key, ck, v
	}
	keyA, cacheA, vA := entry("10.2.0.1")
	keyB, cacheB, vB := entry("10.2.0.2")
	step := func(ev kvstore.Event) {
		t.Helper()
		if err := km.handle(ctx, ev); err != nil {
			t.Fatal(err)
		}
		if err := km.flush(ctx); err != nil {
			t.Fatal(err)
		}
	}

	step(kvstore.Event{Type: kvstore.EventUpsert, Key: keyA, Value: vA}) // held
	waitStarted(1)
	second := make(chan error, 1)
	go func() {
		if err := km.handle(ctx, kvstore.Event{Type: kvstore.EventUpsert, Key: keyB, Value: vB}); err != nil {
			second <- err
			return
		}
		second <- km.flush(ctx)
	}()
	waitStarted(2) // disjoint: it goes out while the first is held
	if err := <-second; err != nil {
		t.Fatal(err)
	}

	third := make(chan error, 1)
	go func() {
		if err := km.handle(ctx, kvstore.Event{Type: kvstore.EventDelete, Key: keyA}); err != nil {
			third <- err
			return
		}
		third <- km.flush(ctx)
	}()
	time.Sleep(200 * time.Millisecond)
	if n := nStarted(); n != 2 {
		t.Fatalf("the delete of %s started while the put of it was in flight (%d commits started)", cacheA, n)
	}
	releaseOnce()
	if err := <-third; err != nil {
		t.Fatal(err)
	}
	if err := km.wait(); err != nil {
		t.Fatal(err)
	}
	if n := nStarted(); n != 3 {
		t.Fatalf("%d commits, want 3", n)
	}
	if _, found, err := srv.Client().Get(ctx, cacheA); err != nil || found {
		t.Fatalf("%s in the cache after its delete (found %v, err %v)", cacheA, found, err)
	}
	if _, found, err := srv.Client().Get(ctx, cacheB); err != nil || !found {
		t.Fatalf("%s not in the cache (err %v)", cacheB, err)
	}
}

// A kind mirror starts a transaction beyond its first only while no other
// kind mirror has one in flight: with another remote's in flight, a second
// batch waits for the first, as one transaction per kind mirror did before.
func TestExtraTransactionsAreShared(t *testing.T) {
	ctx, _, km := pipelineMirror(t)
	km.r.m.txns = 1 // another remote's transaction
	var mu sync.Mutex
	started := 0
	release := make(chan struct{})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	defer releaseOnce()
	km.commit = func(ctx context.Context, ops []kvstore.Op) error {
		mu.Lock()
		started++
		first := started == 1
		mu.Unlock()
		if first {
			<-release
		}
		return km.write(ctx, ops)
	}
	put := func(a string) error {
		p := netip.MustParsePrefix(a + "/32")
		v, err := records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 1, Cluster: "c2"}.Marshal()
		if err != nil {
			return err
		}
		if err := km.handle(ctx, kvstore.Event{Type: kvstore.EventUpsert, Key: records.IPCacheKey("c2", "n1", p), Value: v}); err != nil {
			return err
		}
		return km.flush(ctx)
	}
	if err := put("10.2.0.1"); err != nil { // held
		t.Fatal(err)
	}
	second := make(chan error, 1)
	go func() { second <- put("10.2.0.2") }()
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	n := started
	mu.Unlock()
	if n != 1 {
		t.Fatalf("%d transactions started while another remote had one in flight, want 1", n)
	}
	releaseOnce()
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	if err := km.wait(); err != nil {
		t.Fatal(err)
	}
}
