package identity

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

func etcdCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func kvClient(t *testing.T, endpoint string) *kvstore.Client {
	t.Helper()
	c, err := kvstore.Connect(etcdCtx(t), kvstore.Config{
		Endpoints: []string{endpoint}, BackoffMin: 5 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newTestEtcd(t *testing.T, endpoint, node string) *Etcd {
	t.Helper()
	a, err := NewEtcd(kvClient(t, endpoint), "c1", 3, node, WithLeaseTTL(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func meshLabels(app string) Labels {
	return Labels{"app": app, LabelNamespace: "default", LabelCluster: "c1"}
}

func TestNewEtcdArgs(t *testing.T) {
	kv := kvClient(t, etcdtest.Start(t).Endpoint)
	for _, tt := range []struct {
		cluster string
		id      uint32
		node    string
		want    string
	}{
		{"C1", 1, "n", "cluster name"},
		{"c1", 0, "n", "cluster ID 0"},
		{"c1", 4096, "n", "cluster ID 4096"},
		{"c1", 1, "a/b", "node name"},
	} {
		if _, err := NewEtcd(kv, tt.cluster, tt.id, tt.node); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("NewEtcd(%q, %d, %q) = %v, want %q", tt.cluster, tt.id, tt.node, err, tt.want)
		}
	}
	if _, err := NewEtcd(nil, "c1", 1, "n"); err == nil {
		t.Error("NewEtcd without client: want error")
	}
}

func TestEtcdAllocateAndRelease(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	a := newTestEtcd(t, etcd.Endpoint, "n1")
	kv := kvClient(t, etcd.Endpoint)

	web, err := a.Allocate(ctx, meshLabels("web"))
	if err != nil {
		t.Fatal(err)
	}
	if ClusterIDOf(web) != 3 || web&MaxLocal == 0 {
		t.Fatalf("id %#x is not a cluster-3 identity", web)
	}
	again, err := a.Allocate(ctx, maps.Clone(meshLabels("web")))
	if err != nil || again != web {
		t.Fatalf("same labels: %d, %v; want %d", again, err, web)
	}
	db, _ := a.Allocate(ctx, meshLabels("db"))
	if db == web {
		t.Fatal("different labels, same ID")
	}
	if got, ok := a.Get(web); !ok || !maps.Equal(got, meshLabels("web")) {
		t.Errorf("Get = %v, %v", got, ok)
	}
	if l, ok := a.Get(1); !ok || l[LabelReserved] != "host" {
		t.Errorf("Get(host) = %v", l)
	}
	if list := a.List(); len(list) != 2 {
		t.Errorf("List = %v", list)
	}

	// The three keys are in etcd, the value key leased.
	key := meshLabels("web").String()
	master, found, _ := kv.Get(ctx, records.IdentityIDKey(web))
	if rec, err := records.DecodeIdentity(master.Value); !found || err != nil || !maps.Equal(rec.Labels, meshLabels("web")) {
		t.Fatalf("master: %s %v", master.Value, err)
	}
	if _, found, _ := kv.Get(ctx, records.IdentityLabelsKey(key)); !found {
		t.Fatal("no label claim")
	}
	ref, found, _ := kv.Get(ctx, records.IdentityValueKey(key, "n1"))
	if !found || ref.Lease == 0 {
		t.Fatalf("value key: found=%v lease=%d", found, ref.Lease)
	}

	// Two references: the first release keeps the value key.
	if err := a.Release(ctx, web); err != nil {
		t.Fatal(err)
	}
	if _, found, _ := kv.Get(ctx, records.IdentityValueKey(key, "n1")); !found {
		t.Fatal("value key deleted while still referenced")
	}
	if err := a.Release(ctx, web); err != nil {
		t.Fatal(err)
	}
	if _, found, _ := kv.Get(ctx, records.IdentityValueKey(key, "n1")); found {
		t.Fatal("value key survived the last release")
	}
	if err := a.Release(ctx, web); !errors.Is(err, ErrNotFound) {
		t.Errorf("third release = %v, want ErrNotFound", err)
	}
	if err := a.Release(ctx, 2); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Errorf("release world = %v", err)
	}
	// The master stays until GC: allocating again rejoins the same ID.
	if id, err := a.Allocate(ctx, meshLabels("web")); err != nil || id != web {
		t.Errorf("re-allocate after release = %d, %v; want %d", id, err, web)
	}

	for _, l := range []Labels{nil, {"bad key": "v"}, {"app": "x", LabelCluster: "c2"}} {
		if _, err := a.Allocate(ctx, l); err == nil {
			t.Errorf("Allocate(%v): want error", l)
		}
	}
}

// TestEtcdRace: 10 allocators, each with its own etcd client and node
// name, allocate the same label sets in different orders at the same time;
// all must end with identical IDs and one master per label set.
func TestEtcdRace(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	const allocators, sets = 10, 20
	as := make([]*Etcd, allocators)
	for i := range as {
		as[i] = newTestEtcd(t, etcd.Endpoint, fmt.Sprintf("node-%d", i))
	}
	ids := make([]map[string]uint32, allocators)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, a := range as {
		ids[i] = map[string]uint32{}
		wg.Go(func() {
			<-start
			for _, j := range rand.Perm(sets) {
				l := meshLabels(fmt.Sprint("app", j))
				id, err := a.Allocate(ctx, l)
				if err != nil {
					t.Errorf("allocator %d: %v", i, err)
					return
				}
				ids[i][l.String()] = id
			}
		})
	}
	close(start)
	wg.Wait()
	if t.Failed() {
		return
	}
	seen := map[uint32]string{}
	for key, id := range ids[0] {
		for i := 1; i < allocators; i++ {
			if ids[i][key] != id {
				t.Errorf("labels %q: allocator 0 got %d, allocator %d got %d", key, id, i, ids[i][key])
			}
		}
		if other, dup := seen[id]; dup {
			t.Errorf("ID %d given to %q and %q", id, key, other)
		}
		seen[id] = key
	}
	kv := kvClient(t, etcd.Endpoint)
	masters, _, _ := kv.GetPrefix(ctx, records.IdentityIDPrefix)
	values, _, _ := kv.GetPrefix(ctx, records.IdentityValuePrefix)
	if len(masters) != sets || len(values) != sets*allocators {
		t.Errorf("%d masters and %d value keys, want %d and %d", len(masters), len(values), sets, sets*allocators)
	}
	var st EtcdStats
	for _, a := range as {
		s := a.Stats()
		st.Allocated += s.Allocated
		st.Joined += s.Joined
		st.Conflicts += s.Conflicts
	}
	if st.Allocated != sets || st.Joined != sets*(allocators-1) {
		t.Errorf("stats: %+v, want %d allocated and %d joined", st, sets, sets*(allocators-1))
	}
	t.Logf("race: %+v", st)
}

func TestEtcdExhaustion(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	a := newTestEtcd(t, etcd.Endpoint, "n1")
	a.maxLocal = 3
	for _, app := range []string{"a", "b", "c"} {
		if _, err := a.Allocate(ctx, meshLabels(app)); err != nil {
			t.Fatal(err)
		}
	}
	_, err := a.Allocate(ctx, meshLabels("d"))
	if err == nil || !strings.Contains(err.Error(), "exhausted") || !strings.Contains(err.Error(), "cluster c1 (ID 3)") {
		t.Fatalf("4th allocation with limit 3 = %v, want a clear exhaustion error", err)
	}
	// Another node, which has never listed, learns the same.
	b := newTestEtcd(t, etcd.Endpoint, "n2")
	b.maxLocal = 3
	if _, err := b.Allocate(ctx, meshLabels("e")); err == nil || !strings.Contains(err.Error(), "exhausted") {
		t.Fatalf("other node: %v", err)
	}
	// Existing label sets still resolve when the space is full.
	if _, err := b.Allocate(ctx, meshLabels("a")); err != nil {
		t.Fatal(err)
	}
}

func TestEtcdGC(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	a := newTestEtcd(t, etcd.Endpoint, "n1")
	b := newTestEtcd(t, etcd.Endpoint, "n2")
	kv := kvClient(t, etcd.Endpoint)

	shared, _ := a.Allocate(ctx, meshLabels("shared"))
	if id, _ := b.Allocate(ctx, meshLabels("shared")); id != shared {
		t.Fatalf("b got %d for shared, a got %d", id, shared)
	}
	only, _ := a.Allocate(ctx, meshLabels("only-a"))
	if n, err := a.GC(ctx, 0); err != nil || n != 0 {
		t.Fatalf("GC with everything referenced = %d, %v", n, err)
	}
	a.Release(ctx, shared)
	a.Release(ctx, only)
	n, err := a.GC(ctx, 0)
	if err != nil || n != 1 {
		t.Fatalf("GC = %d, %v; want 1 (only-a)", n, err)
	}
	if _, found, _ := kv.Get(ctx, records.IdentityIDKey(only)); found {
		t.Error("unreferenced master survived GC")
	}
	if _, found, _ := kv.Get(ctx, records.IdentityLabelsKey(meshLabels("only-a").String())); found {
		t.Error("claim of a collected identity survived GC")
	}
	if _, found, _ := kv.Get(ctx, records.IdentityIDKey(shared)); !found {
		t.Error("master still referenced by n2 was collected")
	}
	if _, ok := a.Get(only); ok {
		t.Error("collected identity still in the cache")
	}

	// A node that goes away (its lease revoked) no longer holds anything.
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := a.GC(ctx, 0); err != nil || n != 1 {
		t.Fatalf("GC after n2 left = %d, %v", n, err)
	}
	if masters, _, _ := kv.GetPrefix(ctx, records.StatePrefix(records.KindIdentities)); len(masters) != 0 {
		t.Errorf("identity keys left: %d", len(masters))
	}
	// The labels can be allocated again from scratch.
	if _, err := a.Allocate(ctx, meshLabels("only-a")); err != nil {
		t.Fatal(err)
	}
}

func TestEtcdWatch(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	writer := newTestEtcd(t, etcd.Endpoint, "writer")
	reader := newTestEtcd(t, etcd.Endpoint, "reader")
	kv := kvClient(t, etcd.Endpoint)

	before, _ := writer.Allocate(ctx, meshLabels("before"))
	if err := reader.Watch(ctx); err != nil {
		t.Fatal(err)
	}
	// The first list is complete when Watch returns.
	if l, ok := reader.Get(before); !ok || l["app"] != "before" {
		t.Fatalf("after Watch: Get(%d) = %v, %v", before, l, ok)
	}
	after, _ := writer.Allocate(ctx, meshLabels("after"))
	eventually(t, func() bool { _, ok := reader.Get(after); return ok }, "new identity reaches the watcher")

	// Bad records written by hand are skipped and counted, not cached.
	bad := uint32(3<<20 | 999)
	kv.Put(ctx, records.IdentityIDKey(bad), []byte(`{"version":1,"id":1,"labels":{}}`))
	foreign := uint32(5<<20 | 1) // another cluster's ID in our etcd: ignored
	kv.Put(ctx, records.IdentityIDKey(foreign), []byte(`{"version":1,"id":5242881,"labels":{"a":"b"}}`))
	eventually(t, func() bool { return reader.Stats().BadRecords == 1 }, "bad record counted")
	if _, ok := reader.Get(bad); ok {
		t.Error("bad record cached")
	}
	if _, ok := reader.Get(foreign); ok {
		t.Error("foreign identity cached")
	}
	kv.Delete(ctx, records.IdentityIDKey(bad))
	kv.Delete(ctx, records.IdentityIDKey(foreign))

	writer.Release(ctx, after)
	if n, err := writer.GC(ctx, 0); err != nil || n != 1 {
		t.Fatalf("GC = %d, %v", n, err)
	}
	eventually(t, func() bool { _, ok := reader.Get(after); return !ok }, "collected identity leaves the watcher's cache")
	if list := reader.List(); len(list) != 1 || list[0].ID != before {
		t.Errorf("reader List = %v", list)
	}
}

// TestEtcdLeaseLoss: when the node's lease is lost, its value keys vanish;
// the re-granted lease puts them back.
func TestEtcdLeaseLoss(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	a := newTestEtcd(t, etcd.Endpoint, "n1")
	kv := kvClient(t, etcd.Endpoint)
	id, err := a.Allocate(ctx, meshLabels("web"))
	if err != nil {
		t.Fatal(err)
	}
	valueKey := records.IdentityValueKey(meshLabels("web").String(), "n1")
	old := a.lease.ID()
	if err := kv.RevokeLease(ctx, old); err != nil {
		t.Fatal(err)
	}
	// The next write with the dead lease notices the loss at once.
	if _, err := a.Allocate(ctx, meshLabels("db")); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() bool {
		v, found, _ := kv.Get(ctx, valueKey)
		return found && v.Lease != kvstore.LeaseID(old)
	}, "value key restored under the new lease")
	if got, _ := a.Allocate(ctx, meshLabels("web")); got != id {
		t.Errorf("after restore web = %d, want %d", got, id)
	}
}

func eventually(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// records cannot import this package (we import it), so it repeats a few
// constants and the label rules; they must agree.
func TestRecordsAgree(t *testing.T) {
	if records.MaxClusterID != MaxClusterID || records.MaxReservedIdentity != MaxReserved || records.LabelCluster != LabelCluster {
		t.Fatal("records constants differ from identity's")
	}
	l := Labels{"z": "1", "a": "", LabelCluster: "c1", "x.io/y": "v-1.2_3"}
	if records.LabelsString(l) != l.String() {
		t.Fatalf("LabelsString %q != String %q", records.LabelsString(l), l.String())
	}
	for _, s := range []string{"a=1", "a.b/c=d", "A=B", "-a=1", "a=-1", "a/b/c=1", "a=" + strings.Repeat("v", 64), "UP.io/a=1", "a_b=c.d"} {
		_, errI := ParseLabels(s)
		_, errR := records.ParseLabelsString(s)
		if (errI == nil) != (errR == nil) {
			t.Errorf("%q: identity says %v, records says %v", s, errI, errR)
		}
	}
}

// With a lease shared with the agent, Close deletes only this allocator's
// keys and leaves the lease alone.
func TestEtcdSharedLeaseClose(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	kv := kvClient(t, etcd.Endpoint)
	lease, err := kv.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	kv.PutLeased(ctx, "agent/key", nil, lease)
	a, err := NewEtcd(kv, "c1", 3, "n1", WithLease(lease))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(ctx, meshLabels("web")); err != nil {
		t.Fatal(err)
	}
	valueKey := records.IdentityValueKey(meshLabels("web").String(), "n1")
	if v, _, _ := kv.Get(ctx, valueKey); v.Lease != lease.ID() {
		t.Fatalf("value key on lease %d, want the shared %d", v.Lease, lease.ID())
	}
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, found, _ := kv.Get(ctx, valueKey); found {
		t.Error("value key survived Close")
	}
	if _, found, _ := kv.Get(ctx, "agent/key"); !found {
		t.Error("Close revoked the shared lease")
	}
}

// An unreferenced master survives GC for the grace period: a node cut off
// past its lease TTL gets its identities back when it reconnects. Only a
// master found unreferenced and unchanged on a pass at least grace ago is
// deleted.
func TestEtcdGCGrace(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	a := newTestEtcd(t, etcd.Endpoint, "n1")
	gc := newTestEtcd(t, etcd.Endpoint, "gc")
	kv := kvClient(t, etcd.Endpoint)

	id, err := a.Allocate(ctx, meshLabels("partitioned"))
	if err != nil {
		t.Fatal(err)
	}
	const grace = 400 * time.Millisecond
	a.Release(ctx, id) // as if n1's lease had expired
	for i, wait := range []time.Duration{0, grace / 4} {
		time.Sleep(wait)
		if n, err := gc.GC(ctx, grace); err != nil || n != 0 {
			t.Fatalf("pass %d within the grace period: GC = %d, %v; want 0", i, n, err)
		}
	}
	if _, found, _ := kv.Get(ctx, records.IdentityIDKey(id)); !found {
		t.Fatal("master deleted within the grace period")
	}
	// The node comes back within the grace period: same ID, and the clock
	// starts over when it lets go again.
	if again, err := a.Allocate(ctx, meshLabels("partitioned")); err != nil || again != id {
		t.Fatalf("re-allocation within the grace period = %d, %v; want %d", again, err, id)
	}
	time.Sleep(grace)
	if n, err := gc.GC(ctx, grace); err != nil || n != 0 {
		t.Fatalf("GC of a referenced master = %d, %v", n, err)
	}
	a.Release(ctx, id)
	if n, err := gc.GC(ctx, grace); err != nil || n != 0 {
		t.Fatalf("first pass after the release = %d, %v; want 0", n, err)
	}
	time.Sleep(grace)
	if n, err := gc.GC(ctx, grace); err != nil || n != 1 {
		t.Fatalf("pass after the grace period = %d, %v; want 1", n, err)
	}
	if _, found, _ := kv.Get(ctx, records.IdentityIDKey(id)); found {
		t.Error("master survived a grace period unreferenced")
	}
}

// TestEtcdLeaseLossReallocated: a node cut off from etcd past its lease TTL
// while GC collects its identity and another node allocates the labels
// anew cannot restore its reference with the old ID. It drops the
// reference, reports it (WithOnLost), leaves no value key behind, and an
// Allocate of the labels joins their new ID.
func TestEtcdLeaseLossReallocated(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	proxy := etcdtest.StartProxy(t, strings.TrimPrefix(etcd.Endpoint, "http://"))
	kv := kvClient(t, etcd.Endpoint)
	lost := make(chan []Identity, 4)
	a, err := NewEtcd(kvClient(t, "http://"+proxy.Addr), "c1", 3, "n1", WithLeaseTTL(2*time.Second),
		WithOnLost(func(ids []Identity) { lost <- ids }))
	if err != nil {
		t.Fatal(err)
	}
	old, err := a.Allocate(ctx, meshLabels("web"))
	if err != nil {
		t.Fatal(err)
	}
	kept, err := a.Allocate(ctx, meshLabels("db"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(ctx, meshLabels("web")); err != nil { // a second user of web
		t.Fatal(err)
	}

	// The partition: n1's lease expires, GC collects web, n2 gets web anew.
	proxy.Cut()
	if err := kv.RevokeLease(ctx, a.lease.ID()); err != nil {
		t.Fatal(err)
	}
	gc := newTestEtcd(t, etcd.Endpoint, "gc")
	if n, err := gc.GC(ctx, 0); err != nil || n != 2 {
		t.Fatalf("GC = %d, %v; want web and db collected", n, err)
	}
	n2 := newTestEtcd(t, etcd.Endpoint, "n2")
	moved, err := n2.Allocate(ctx, meshLabels("web"))
	if err != nil || moved == old {
		t.Fatalf("n2 allocated web = %d, %v; want a new ID (old %d)", moved, err, old)
	}
	proxy.Restore()

	select {
	case ids := <-lost:
		if len(ids) != 1 || ids[0].ID != old || ids[0].Labels.String() != meshLabels("web").String() {
			t.Fatalf("lost %v; want only web's %d", ids, old)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no lost identities reported after the lease came back")
	}
	if a.Holds(old) || !a.Holds(kept) {
		t.Errorf("after restore: holds web's old ID %v (want false), db's %v (want true)", a.Holds(old), a.Holds(kept))
	}
	// db, collected but not taken, came back with its ID.
	if _, found, _ := kv.Get(ctx, records.IdentityIDKey(kept)); !found {
		t.Error("db's master was not re-created with its ID")
	}
	webValue := records.IdentityValueKey(meshLabels("web").String(), "n1")
	if _, found, _ := kv.Get(ctx, webValue); found {
		t.Error("n1 references web's new ID without a local reference")
	}
	if err := a.Release(ctx, old); !errors.Is(err, ErrNotFound) {
		t.Errorf("release of the lost ID: %v; want ErrNotFound", err)
	}
	if got, err := a.Allocate(ctx, meshLabels("web")); err != nil || got != moved {
		t.Fatalf("re-allocation of web = %d, %v; want %d", got, err, moved)
	}
	if _, found, _ := kv.Get(ctx, webValue); !found {
		t.Error("re-allocation did not reference web's new ID")
	}
}

// An Allocate of labels the node already references answers from memory,
// also while another Allocate waits for an unreachable etcd.
func TestEtcdCachedAllocateDoesNotWait(t *testing.T) {
	ctx := etcdCtx(t)
	etcd := etcdtest.Start(t)
	proxy := etcdtest.StartProxy(t, strings.TrimPrefix(etcd.Endpoint, "http://"))
	a, err := NewEtcd(kvClient(t, "http://"+proxy.Addr), "c1", 3, "n1", WithLeaseTTL(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	id, err := a.Allocate(ctx, meshLabels("web"))
	if err != nil {
		t.Fatal(err)
	}
	proxy.Cut()
	slow := make(chan error, 1)
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	go func() {
		_, err := a.Allocate(sctx, meshLabels("new"))
		slow <- err
	}()
	time.Sleep(200 * time.Millisecond) // let it reach etcd
	start := time.Now()
	got, err := a.Allocate(ctx, meshLabels("web"))
	if err != nil || got != id {
		t.Fatalf("cached allocate = %d, %v; want %d", got, err, id)
	}
	if err := a.Release(ctx, id); err != nil { // not the last reference
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("cached allocate and release took %s behind an allocation waiting for etcd", d)
	}
	select {
	case err := <-slow:
		t.Fatalf("allocation of new labels returned while etcd is cut: %v", err)
	default:
	}
	cancel()
	<-slow
}
