package meshsync

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	os.Exit(m.Run())
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func connect(t *testing.T, e *etcdtest.Etcd) *kvstore.Client {
	t.Helper()
	c, err := kvstore.Connect(testCtx(t), kvstore.Config{
		Endpoints: []string{e.Endpoint}, DialTimeout: 5 * time.Second, RequestTimeout: 5 * time.Second,
		BackoffMin: 10 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw is a plain etcd client for what a test does behind the agent's back
// (writing bad records, revoking leases), as an operator with etcdctl would.
func raw(t *testing.T, e *etcdtest.Etcd) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{e.Endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// eventually polls cond until it holds or fails the test after 15 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func keysUnder(t *testing.T, c *kvstore.Client, prefix string) map[string][]byte {
	t.Helper()
	kvs, _, err := c.GetPrefix(testCtx(t), prefix)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, kv := range kvs {
		out[kv.Key] = kv.Value
	}
	return out
}

var node1 = NodeInfo{
	Local:    Local{Cluster: "c1", ClusterID: 1, Node: "node1"},
	IPs:      []netip.Addr{netip.MustParseAddr("192.0.2.11"), netip.MustParseAddr("2001:db8::11")},
	PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24"), netip.MustParsePrefix("fd00:1:1::/64")},
	BootID:   "6f1c2a9e-0000-4000-8000-000000000001",
}

func TestRecords(t *testing.T) {
	recs, err := Records(node1, []Endpoint{
		{Name: "web", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.2"), netip.MustParseAddr("fd00:1:1::2")}, Identity: 1<<20 | 7},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 {
		t.Fatalf("records %v", recs)
	}
	n, err := records.ValidateNode(records.NodeKey("c1", "node1"), recs[records.NodeKey("c1", "node1")], "c1", 1)
	if err != nil || n.BootID != node1.BootID || len(n.PodCIDRs) != 2 || len(n.IPs) != 2 {
		t.Errorf("node record %+v, %v", n, err)
	}
	for _, tc := range []struct{ ip, host string }{{"10.1.1.2", "192.0.2.11"}, {"fd00:1:1::2", "2001:db8::11"}} {
		p := netip.MustParsePrefix(tc.ip + "/" + map[bool]string{true: "32", false: "128"}[netip.MustParseAddr(tc.ip).Is4()])
		key := records.IPCacheKey("c1", "node1", p)
		e, err := records.ValidateIPCacheEntry(key, recs[key], "c1", 1)
		if err != nil || e.HostIP.String() != tc.host || e.Identity != 1<<20|7 || e.OwnerName != "web" || e.OwnerNamespace != "default" {
			t.Errorf("ipcache %s: %+v, %v", key, e, err)
		}
	}
	// A node with only an IPv4 underlay hosts IPv6 pods behind it too.
	if got := HostIPFor(node1.IPs[:1], netip.MustParseAddr("fd00::1")); got != node1.IPs[0] {
		t.Errorf("HostIPFor = %s", got)
	}
}

func TestPublisher(t *testing.T) {
	ctx := testCtx(t)
	e := etcdtest.Start(t)
	c := connect(t, e)
	lease, err := c.GrantLease(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pub := NewPublisher(c, lease, nil)
	go pub.Run(ctx)

	web := Endpoint{Name: "web", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.2")}, Identity: 1<<20 | 7}
	db := Endpoint{Name: "db", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.3")}, Identity: 1<<20 | 8}
	want, err := Records(node1, []Endpoint{web, db})
	if err != nil {
		t.Fatal(err)
	}
	pub.Set(want)
	eventually(t, "records published", func() bool {
		synced, _, _ := pub.Status()
		return synced
	})
	got := keysUnder(t, c, records.StateRoot)
	if len(got) != 3 {
		t.Fatalf("etcd holds %v", got)
	}
	for k, v := range want {
		if string(got[k]) != string(v) {
			t.Errorf("%s = %s, want %s", k, got[k], v)
		}
	}

	// An endpoint deleted: its record goes.
	want2, _ := Records(node1, []Endpoint{web})
	pub.Set(want2)
	dbKey := records.IPCacheKey("c1", "node1", netip.MustParsePrefix("10.1.1.3/32"))
	eventually(t, "db record deleted", func() bool { _, ok := keysUnder(t, c, records.StateRoot)[dbKey]; return !ok })

	// The lease is revoked behind the publisher's back (an etcd restore, an
	// operator, a partition longer than the TTL): the keys die with it, the
	// lease is re-granted and everything is written again.
	if _, err := raw(t, e).Revoke(ctx, clientv3.LeaseID(lease.ID())); err != nil {
		t.Fatal(err)
	}
	old := lease.ID()
	eventually(t, "records re-published under a new lease", func() bool {
		kv, found, err := c.Get(ctx, records.NodeKey("c1", "node1"))
		return err == nil && found && kv.Lease != old && len(keysUnder(t, c, records.StateRoot)) == 2
	})

	// Revoked for good (what a node that is gone amounts to): nothing of
	// it is left.
	if err := lease.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := keysUnder(t, c, records.StateRoot); len(got) != 0 {
		t.Errorf("after revoke etcd still holds %v", got)
	}
}

func TestPublisherAdoptsStaleRecords(t *testing.T) {
	ctx := testCtx(t)
	e := etcdtest.Start(t)
	c := connect(t, e)

	// An earlier run published web and db, then died; its lease lives on.
	oldLease, err := c.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	web := Endpoint{Name: "web", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.2")}, Identity: 1<<20 | 7}
	db := Endpoint{Name: "db", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.3")}, Identity: 1<<20 | 8}
	old, _ := Records(node1, []Endpoint{web, db})
	for k, v := range old {
		if err := c.PutLeased(ctx, k, v, oldLease); err != nil {
			t.Fatal(err)
		}
	}
	// Another node's record is none of this node's business.
	other, _ := records.IPCacheEntry{Prefix: netip.MustParsePrefix("10.1.2.2/32"), Identity: 1<<20 | 7,
		HostIP: netip.MustParseAddr("192.0.2.12"), Cluster: "c1"}.Marshal()
	otherKey := records.IPCacheKey("c1", "node1", netip.MustParsePrefix("10.1.2.2/32"))
	if err := c.Put(ctx, otherKey, other); err != nil {
		t.Fatal(err)
	}

	// The new run knows only web.
	lease, err := c.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	pub := NewPublisher(c, lease, nil)
	if err := pub.AdoptStale(ctx, "c1", node1.IPs); err != nil {
		t.Fatal(err)
	}
	now, _ := Records(node1, []Endpoint{web})
	pub.Set(now)
	if err := pub.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	got := keysUnder(t, c, records.StateRoot)
	dbKey := records.IPCacheKey("c1", "node1", netip.MustParsePrefix("10.1.1.3/32"))
	if _, ok := got[dbKey]; ok {
		t.Error("stale record of the earlier run survived")
	}
	if _, ok := got[otherKey]; !ok {
		t.Error("another node's record was deleted")
	}
	for k := range now {
		kv, found, _ := c.Get(ctx, k)
		if !found || kv.Lease != lease.ID() {
			t.Errorf("%s not moved to the new lease (found %v, lease %v)", k, found, kv.Lease)
		}
	}
}

func TestPublisherManyRecords(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t))
	lease, err := c.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	pub := NewPublisher(c, lease, nil)
	var eps []Endpoint
	for i := range 300 {
		eps = append(eps, Endpoint{Name: "p" + strconv.Itoa(i), Namespace: "default",
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(1 + i/250), byte(1 + i%250)})}, Identity: 1<<20 | 7})
	}
	recs, err := Records(node1, eps)
	if err != nil {
		t.Fatal(err)
	}
	pub.Set(recs)
	if err := pub.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got := keysUnder(t, c, records.StateRoot); len(got) != 301 {
		t.Fatalf("%d keys published, want 301", len(got))
	}
	recs2, _ := Records(node1, eps[:10])
	pub.Set(recs2)
	if err := pub.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got := keysUnder(t, c, records.StateRoot); len(got) != 11 {
		t.Fatalf("%d keys left, want 11", len(got))
	}
	if synced, n, err := pub.Status(); !synced || n != 11 || err != nil {
		t.Errorf("status %v %d %v", synced, n, err)
	}
}

func TestClaimNodeName(t *testing.T) {
	ctx := testCtx(t)
	c := connect(t, etcdtest.Start(t))
	first, err := c.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	second, err := c.GrantLease(ctx, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// Nothing published yet: free.
	if err := ClaimNodeName(ctx, c, node1.Local, node1.IPs, first.ID()); err != nil {
		t.Fatalf("free name: %v", err)
	}
	recs, _ := Records(node1, nil)
	for k, v := range recs {
		if err := c.PutLeased(ctx, k, v, first); err != nil {
			t.Fatal(err)
		}
	}
	// The same node again (a restart: same addresses, new lease): fine.
	if err := ClaimNodeName(ctx, c, node1.Local, node1.IPs, second.ID()); err != nil {
		t.Errorf("restart of the same node: %v", err)
	}
	// Another host with the same name: refused, saying what to do.
	other := []netip.Addr{netip.MustParseAddr("192.0.2.99")}
	err = ClaimNodeName(ctx, c, node1.Local, other, second.ID())
	if !errors.Is(err, ErrNodeNameTaken) || !strings.Contains(err.Error(), "--node-name") {
		t.Errorf("duplicate name: got %v, want ErrNodeNameTaken naming --node-name", err)
	}
	// Once the first node's lease is gone, its name is free.
	if err := first.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ClaimNodeName(ctx, c, node1.Local, other, second.ID()); err != nil {
		t.Errorf("after the holder's lease ended: %v", err)
	}
}
