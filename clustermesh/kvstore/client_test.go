package kvstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

func connect(t *testing.T, endpoint string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Connect(ctx, Config{
		Endpoints:      []string{endpoint},
		DialTimeout:    5 * time.Second,
		RequestTimeout: 5 * time.Second,
		BackoffMin:     10 * time.Millisecond,
		BackoffMax:     200 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestConnectErrors(t *testing.T) {
	ctx := testCtx(t)
	if _, err := Connect(ctx, Config{}); err == nil || !strings.Contains(err.Error(), "no etcd endpoints") {
		t.Errorf("Connect without endpoints = %v", err)
	}
	// Nothing listens on a port that was just free.
	addr := etcdtest.FreeAddr(t)
	start := time.Now()
	_, err := Connect(ctx, Config{Endpoints: []string{"http://" + addr}, DialTimeout: 300 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "no etcd endpoint answered") || !strings.Contains(err.Error(), addr) {
		t.Errorf("Connect to a closed port = %v, want an error naming %s", err, addr)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Connect to a closed port took %s despite a 300ms dial timeout", d)
	}
}

func TestBasicOps(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)

	if _, found, err := c.Get(ctx, "a/missing"); err != nil || found {
		t.Fatalf("Get missing = %v, %v", found, err)
	}
	if err := c.Put(ctx, "a/1", []byte("one")); err != nil {
		t.Fatal(err)
	}
	kv, found, err := c.Get(ctx, "a/1")
	if err != nil || !found || string(kv.Value) != "one" || kv.ModRevision == 0 || kv.CreateRevision == 0 {
		t.Fatalf("Get = %+v, %v, %v", kv, found, err)
	}

	// GetPrefix in several pages is still one sorted snapshot.
	defer func(n int64) { listPageSize = n }(listPageSize)
	listPageSize = 3
	for i := range 10 {
		if err := c.Put(ctx, fmt.Sprintf("p/%02d", i), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Put(ctx, "p0", []byte("outside")); err != nil { // shares the text prefix "p", not "p/"
		t.Fatal(err)
	}
	kvs, rev, err := c.GetPrefix(ctx, "p/")
	if err != nil {
		t.Fatal(err)
	}
	if len(kvs) != 10 || rev == 0 {
		t.Fatalf("GetPrefix: %d keys at rev %d, want 10", len(kvs), rev)
	}
	for i, kv := range kvs {
		if want := fmt.Sprintf("p/%02d", i); kv.Key != want || kv.Value[0] != byte(i) {
			t.Errorf("kvs[%d] = %s %v, want %s", i, kv.Key, kv.Value, want)
		}
	}

	if err := c.Delete(ctx, "a/1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "a/1"); err != nil {
		t.Errorf("deleting a missing key: %v", err)
	}
	n, err := c.DeletePrefix(ctx, "p/")
	if err != nil || n != 10 {
		t.Fatalf("DeletePrefix = %d, %v", n, err)
	}
	if _, found, _ := c.Get(ctx, "p0"); !found {
		t.Error("DeletePrefix p/ removed p0")
	}
	if _, err := c.DeletePrefix(ctx, ""); err == nil {
		t.Error("DeletePrefix(\"\") must be refused")
	}

	st := c.Stats()
	if st.Ops["put"].Count < 11 || st.Ops["get_prefix"].Count != 1 || st.Ops["delete"].Count != 2 || st.Ops["put"].Latency <= 0 {
		t.Errorf("stats not counted: %+v", st.Ops)
	}
}

// GetPrefixSince returns the keys written since a revision, in pages,
// and the count of every key under the prefix, from which a reader
// tells that keys were deleted.
func TestGetPrefixSince(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)
	defer func(n int64) { listPageSize = n }(listPageSize)
	listPageSize = 2
	for i := range 10 {
		if err := c.Put(ctx, fmt.Sprintf("p/%02d", i), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	_, rev, err := c.GetPrefix(ctx, "p/")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"p/03", "p/07", "p/10", "p/05"} {
		if err := c.Put(ctx, k, []byte("new")); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Delete(ctx, "p/01"); err != nil {
		t.Fatal(err)
	}
	kvs, count, rev2, err := c.GetPrefixSince(ctx, "p/", rev+1)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range kvs {
		keys = append(keys, kv.Key)
		if string(kv.Value) != "new" {
			t.Errorf("%s = %q", kv.Key, kv.Value)
		}
	}
	if want := []string{"p/03", "p/05", "p/07", "p/10"}; !slices.Equal(keys, want) || count != 10 || rev2 != rev+5 {
		t.Fatalf("GetPrefixSince = %v, count %d at rev %d; want %v, count 10 at rev %d", keys, count, rev2, want, rev+5)
	}
	if kvs, count, _, err := c.GetPrefixSince(ctx, "p/", rev2+1); err != nil || len(kvs) != 0 || count != 10 {
		t.Fatalf("nothing changed: %v, count %d, %v", kvs, count, err)
	}
}

func TestCreateOnlyAndTxn(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)

	created, err := c.CreateOnly(ctx, "k", []byte("first"))
	if err != nil || !created {
		t.Fatalf("first CreateOnly = %v, %v", created, err)
	}
	created, err = c.CreateOnly(ctx, "k", []byte("second"))
	if err != nil || created {
		t.Fatalf("second CreateOnly = %v, %v", created, err)
	}
	kv, _, _ := c.Get(ctx, "k")
	if string(kv.Value) != "first" {
		t.Errorf("CreateOnly overwrote: %q", kv.Value)
	}

	// Read-modify-write guarded by the revision read.
	ok, err := c.Txn(ctx, []Cond{KeyModRevision("k", kv.ModRevision)}, []Op{OpPut("k", []byte("v2"))})
	if err != nil || !ok {
		t.Fatalf("Txn with current revision = %v, %v", ok, err)
	}
	ok, err = c.Txn(ctx, []Cond{KeyModRevision("k", kv.ModRevision)}, []Op{OpPut("k", []byte("v3"))})
	if err != nil || ok {
		t.Fatalf("Txn with stale revision = %v, %v", ok, err)
	}
	if ok, _ := c.Txn(ctx, []Cond{KeyValueIs("k", []byte("v2")), KeyExists("k")}, nil); !ok {
		t.Error("KeyValueIs/KeyExists did not hold")
	}
	if ok, _ := c.Txn(ctx, []Cond{KeyModRevision("nope", 0), KeyMissing("nope")}, nil); !ok {
		t.Error("a missing key must have ModRevision 0")
	}

	// PrefixEmpty: holds for an empty range, fails as soon as one key exists.
	if ok, _ := c.Txn(ctx, []Cond{PrefixEmpty("refs/")}, []Op{OpDelete("k")}); !ok {
		t.Fatal("PrefixEmpty on an empty prefix did not hold")
	}
	c.Put(ctx, "k", []byte("again"))
	c.Put(ctx, "refs/x", nil)
	if ok, _ := c.Txn(ctx, []Cond{PrefixEmpty("refs/")}, []Op{OpDelete("k")}); ok {
		t.Fatal("PrefixEmpty held although refs/x exists")
	}
	if _, found, _ := c.Get(ctx, "k"); !found {
		t.Fatal("failed Txn applied its ops")
	}
}

func TestLeaseRegrant(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)

	l, err := c.GrantLease(ctx, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	regranted := make(chan LeaseID, 1)
	l.OnRegrant(func(ctx context.Context, id LeaseID) {
		if err := c.PutLeased(ctx, "node", []byte("back"), l); err != nil {
			t.Errorf("re-put after regrant: %v", err)
		}
		regranted <- id
	})
	if err := c.PutLeased(ctx, "node", []byte("up"), l); err != nil {
		t.Fatal(err)
	}
	// The keepalive holds the key well past the TTL.
	time.Sleep(1600 * time.Millisecond)
	if _, found, _ := c.Get(ctx, "node"); !found {
		t.Fatal("leased key expired although the lease is kept alive")
	}

	// Losing the lease (here: revoked behind the client's back) deletes
	// the key; the Lease gets a new one and tells its owner.
	old := l.ID()
	if err := c.RevokeLease(ctx, old); err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-regranted:
		if id == old || id != l.ID() {
			t.Errorf("regrant gave %d (old %d, current %d)", id, old, l.ID())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no regrant within 10s after the lease was revoked")
	}
	kv, found, _ := c.Get(ctx, "node")
	if !found || string(kv.Value) != "back" || kv.Lease != l.ID() {
		t.Errorf("after regrant key = %+v, %v", kv, found)
	}
	if got := c.Stats().LeaseRegrants; got != 1 {
		t.Errorf("LeaseRegrants = %d", got)
	}

	// Close revokes: the key vanishes at once.
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, found, _ := c.Get(ctx, "node"); found {
		t.Error("key survived Lease.Close")
	}
	// Writing with a dead lease names the problem.
	err = c.PutLeased(ctx, "node", nil, l)
	if !errors.Is(err, ErrLeaseLost) {
		t.Errorf("PutLeased with a revoked lease = %v, want ErrLeaseLost", err)
	}
}

// A write that finds the lease gone triggers the re-grant at once, instead
// of at the next keepalive (TTL/3 away, 20 s here).
func TestLeaseLossNoticedOnWrite(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)
	l, err := c.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	regranted := make(chan LeaseID, 1)
	l.OnRegrant(func(_ context.Context, id LeaseID) { regranted <- id })
	old := l.ID()
	time.Sleep(100 * time.Millisecond) // let the first keepalive go out
	if err := c.RevokeLease(ctx, old); err != nil {
		t.Fatal(err)
	}
	if err := c.PutLeased(ctx, "k", nil, l); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("PutLeased on a revoked lease = %v, want ErrLeaseLost", err)
	}
	select {
	case id := <-regranted:
		if id == old {
			t.Fatal("regranted the same lease ID")
		}
	case <-time.After(3 * time.Second):
		t.Fatal("lease not re-granted within 3s of a write reporting it lost")
	}
	if err := c.PutLeased(ctx, "k", nil, l); err != nil {
		t.Fatalf("PutLeased after regrant: %v", err)
	}
}

// A dead member listed first must not keep the client from the live one.
func TestConnectSkipsDeadFirstEndpoint(t *testing.T) {
	ctx := context.Background()
	live := etcdtest.Start(t).Endpoint
	dead := "http://" + etcdtest.FreeAddr(t)
	start := time.Now()
	c, err := Connect(ctx, Config{Endpoints: []string{dead, live}, DialTimeout: 3 * time.Second})
	if err != nil {
		t.Fatalf("connect with a dead first endpoint: %v", err)
	}
	defer c.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("connect took %s: the dead endpoint was waited for", d)
	}
	if err := c.Put(ctx, "isthmus/probe", []byte("x")); err != nil {
		t.Fatal(err)
	}
}

// WriteOps writes in transactions of EmbeddedMaxTxnOps, and in etcd's
// default size where the etcd refuses that many (this test etcd keeps its
// default limit).
func TestWriteOpsFallsBackToTheDefaultTxnSize(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t).Endpoint)
	ops := make([]Op, 1500)
	for i := range ops {
		ops[i] = OpPut(fmt.Sprintf("w/%04d", i), []byte("v"))
	}
	if _, err := c.Txn(ctx, nil, ops[:EmbeddedMaxTxnOps]); !TooManyOps(err) {
		t.Fatalf("a transaction of %d: %v, want etcd's too many operations", EmbeddedMaxTxnOps, err)
	}
	ops = append(ops, OpDelete("w/0000"))
	if err := c.WriteOps(ctx, ops); err != nil {
		t.Fatal(err)
	}
	kvs, _, err := c.GetPrefix(ctx, "w/")
	if err != nil {
		t.Fatal(err)
	}
	if len(kvs) != 1499 || kvs[0].Key != "w/0001" {
		t.Fatalf("%d keys from %q, want 1499 from w/0001", len(kvs), kvs[0].Key)
	}
}
