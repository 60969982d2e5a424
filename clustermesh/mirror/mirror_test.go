package mirror_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

const wait = 15 * time.Second

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func marshal(t *testing.T, r interface{ Marshal() ([]byte, error) }) []byte {
	t.Helper()
	v, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func put(t *testing.T, kv *kvstore.Client, key string, value []byte) {
	t.Helper()
	if err := kv.Put(context.Background(), key, value); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

func del(t *testing.T, kv *kvstore.Client, key string) {
	t.Helper()
	if err := kv.Delete(context.Background(), key); err != nil {
		t.Fatalf("delete %s: %v", key, err)
	}
}

func node(c *servertest.Cluster, name, ip string) records.Node {
	return records.Node{Name: name, Cluster: c.Name, ClusterID: c.ID, IPs: []netip.Addr{netip.MustParseAddr(ip)}}
}

func identityOf(c *servertest.Cluster, n uint32) uint32 { return c.ID<<20 | n }

// seed writes one node, endpoint, identity and global Service into c, as
// its agents and `isthmus apply` would; the service syncer turns the
// Service into a service record.
func seed(t *testing.T, c *servertest.Cluster, ip string) (keys []string) {
	t.Helper()
	kv := c.KV()
	id := identityOf(c, 7)
	n := node(c, "n1", "192.168.0."+fmt.Sprint(c.ID))
	p := netip.MustParsePrefix(ip + "/32")
	n.PodCIDRs = []netip.Prefix{netip.PrefixFrom(p.Addr(), 24).Masked()}
	put(t, kv, records.NodeKey(c.Name, "n1"), marshal(t, n))
	put(t, kv, records.IPCacheKey(c.Name, "n1", p), marshal(t, records.IPCacheEntry{Prefix: p, Identity: id, HostIP: n.IPs[0], Cluster: c.Name}))
	put(t, kv, records.IdentityIDKey(id), marshal(t, records.IdentityRecord{ID: id, Labels: map[string]string{
		"isthmus.io/cluster": c.Name, "isthmus.io/namespace": "default", "app": "web"}}))
	svc := `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default",` +
		`"annotations":{"isthmus.io/global":"true"}},"spec":{"vips":["10.96.0.10"],"ports":[{"port":80,"targetPort":8080}],"selector":{"app":"web"}}}`
	put(t, kv, "isthmus/config/Service/default/web", []byte(svc))
	return []string{records.NodeKey(c.Name, "n1"), records.IPCacheKey(c.Name, "n1", p), records.IdentityIDKey(id),
		records.ServiceKey(c.Name, "default", "web")}
}

func status(c *servertest.Cluster, remote string) (mirror.Status, error) {
	kv, found, err := c.KV().Get(context.Background(), etcdserver.RemoteStatusKey(remote))
	if err != nil || !found {
		return mirror.Status{}, fmt.Errorf("no status of %s in %s: %v", remote, c.Name, err)
	}
	return mirror.DecodeStatus(kv.Value)
}

// mirrored checks that local's cache holds exactly the values of remote's
// state keys, and that the canaries and the mirrored config exist.
func mirrored(local, remote *servertest.Cluster, keys ...string) error {
	ctx := context.Background()
	for _, k := range keys {
		want, found, err := remote.KV().Get(ctx, k)
		if err != nil || !found {
			return fmt.Errorf("%s in %s: %v %v", k, remote.Name, found, err)
		}
		ck, err := records.CacheKey(k, remote.Name)
		if err != nil {
			return err
		}
		got, found, err := local.KV().Get(ctx, ck)
		if err != nil || !found {
			return fmt.Errorf("%s not in the cache of %s (%v)", ck, local.Name, err)
		}
		if !bytes.Equal(got.Value, want.Value) {
			return fmt.Errorf("%s in %s = %s, want %s", ck, local.Name, got.Value, want.Value)
		}
	}
	return synced(local, remote.Name)
}

func synced(local *servertest.Cluster, remote string) error {
	ctx := context.Background()
	for _, k := range records.Kinds {
		kv, found, err := local.KV().Get(ctx, records.SyncedKey(remote, k))
		if err != nil || !found {
			return fmt.Errorf("no canary %s in %s", records.SyncedKey(remote, k), local.Name)
		}
		if st, err := records.DecodeStamp(kv.Value); err != nil || st.Cluster != remote {
			return fmt.Errorf("canary %s = %s: %v", kv.Key, kv.Value, err)
		}
	}
	if _, found, _ := local.KV().Get(ctx, records.ClusterConfigKey(remote)); !found {
		return fmt.Errorf("no mirrored cluster config of %s in %s", remote, local.Name)
	}
	return nil
}

// cacheKeys lists the cache keys of kind k of remote in local.
func cacheKeys(t *testing.T, local *servertest.Cluster, k records.Kind, remote string) []string {
	t.Helper()
	kvs, _, err := local.KV().GetPrefix(context.Background(), records.CachePrefix(k, remote))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, kv := range kvs {
		out = append(out, strings.TrimPrefix(kv.Key, records.CachePrefix(k, remote)))
	}
	return out
}

func wantKeys(t *testing.T, local *servertest.Cluster, k records.Kind, remote string, want ...string) func() error {
	return func() error {
		if got := cacheKeys(t, local, k, remote); !slices.Equal(got, want) {
			return fmt.Errorf("cache of %s %s in %s = %v, want %v", remote, k, local.Name, got, want)
		}
		return nil
	}
}

func TestMirrorBothWays(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	keys1 := seed(t, c1, "10.1.0.5")
	keys2 := seed(t, c2, "10.2.0.5")
	servertest.Connect(t, c1, c2)
	servertest.Connect(t, c2, c1)

	servertest.Eventually(t, wait, "c1 mirrors c2", func() error { return mirrored(c1, c2, keys2...) })
	servertest.Eventually(t, wait, "c2 mirrors c1", func() error { return mirrored(c2, c1, keys1...) })

	// The service syncer of c2 published its global service with c2's
	// endpoint as backend; c1 has it in its cache.
	// (The syncer may publish the service before it has seen the
	// endpoint, then again with it.)
	servertest.Eventually(t, wait, "c2's service with its backend in c1's cache", func() error {
		kv, _, _ := c1.KV().Get(context.Background(), records.CachePrefix(records.KindServices, "c2")+"default/web")
		svc, err := records.ValidateService(records.ServiceKey("c2", "default", "web"), kv.Value, "c2", 2)
		if err != nil {
			return err
		}
		if !svc.Global || !svc.Shared || len(svc.Backends) != 1 || svc.Backends[0].IP != netip.MustParseAddr("10.2.0.5") || svc.Backends[0].Port != 8080 {
			return fmt.Errorf("mirrored service %+v", svc)
		}
		return nil
	})

	servertest.Eventually(t, wait, "status of c2 in c1", func() error {
		st, err := status(c1, "c2")
		if err != nil {
			return err
		}
		if st.State != mirror.StateConnected || !st.Connected || !st.Ready || st.ClusterID != 2 ||
			st.Nodes != 1 || st.Endpoints != 1 || st.Identities != 1 || st.Services != 1 || st.Invalid != 0 {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	if got := c1.API().Mirror.Status(); len(got) != 1 || got[0].Cluster != "c2" || !got[0].Ready {
		t.Errorf("in-memory status %+v", got)
	}

	// Changes follow: a node joins, an endpoint goes, the Service goes
	// (the syncer deletes its record, the mirror its copy).
	put(t, c2.KV(), records.NodeKey("c2", "n2"), marshal(t, node(c2, "n2", "192.168.0.22")))
	del(t, c2.KV(), keys2[1])
	del(t, c2.KV(), "isthmus/config/Service/default/web")
	servertest.Eventually(t, wait, "node n2 mirrored", wantKeys(t, c1, records.KindNodes, "c2", "n1", "n2"))
	servertest.Eventually(t, wait, "endpoint deletion mirrored", wantKeys(t, c1, records.KindIP, "c2"))
	servertest.Eventually(t, wait, "service deletion mirrored", wantKeys(t, c1, records.KindServices, "c2"))
	// c1's own view of c1 is untouched by all this.
	if err := mirrored(c2, c1, keys1...); err != nil {
		t.Error(err)
	}
}

// compact compacts c's etcd history up to now, so that a watcher that was
// away must re-list (and learn about deletions from the re-list).
func compact(t *testing.T, c *servertest.Cluster) {
	t.Helper()
	d, err := etcdserver.OpenDataDir(c.DataDir())
	if err != nil {
		t.Fatal(err)
	}
	kc, err := d.RootKVConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: kc.Endpoints, TLS: kc.TLS, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx := ctxT(t)
	resp, err := cli.Get(ctx, "isthmus/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
}

func TestMirrorNothingStaleAfterOutages(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	proxy := c2.Proxy
	servertest.Connect(t, c1, c2)
	for _, n := range []string{"n1", "n2", "n3"} {
		put(t, c2.KV(), records.NodeKey("c2", n), marshal(t, node(c2, n, "192.168.0.1")))
	}
	servertest.Eventually(t, wait, "c1 mirrors c2", wantKeys(t, c1, records.KindNodes, "c2", "n1", "n2", "n3"))
	servertest.Eventually(t, wait, "canaries", func() error { return synced(c1, "c2") })

	// The mirror loses c2; c2's server stops; records change directly in
	// its etcd and the history is compacted; c2 restarts; then the
	// mirror gets through again.
	proxy.Cut()
	servertest.Eventually(t, wait, "c2 unreachable", func() error {
		if st, err := status(c1, "c2"); err != nil || st.Connected || st.State != mirror.StateUnreachable || st.LastError == "" {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
	c2.Stop()
	c2.Start(t)
	del(t, c2.KV(), records.NodeKey("c2", "n2"))
	n3 := node(c2, "n3", "192.168.0.33")
	put(t, c2.KV(), records.NodeKey("c2", "n3"), marshal(t, n3))
	put(t, c2.KV(), records.NodeKey("c2", "n4"), marshal(t, node(c2, "n4", "192.168.0.4")))
	compact(t, c2)
	// Without a cache TTL the last state keeps serving meanwhile.
	if got := cacheKeys(t, c1, records.KindNodes, "c2"); !slices.Equal(got, []string{"n1", "n2", "n3"}) {
		t.Errorf("cache while c2 is unreachable = %v", got)
	}
	proxy.Restore()
	servertest.Eventually(t, wait, "after reconnect", wantKeys(t, c1, records.KindNodes, "c2", "n1", "n3", "n4"))
	servertest.Eventually(t, wait, "n3 updated", func() error { return mirrored(c1, c2, records.NodeKey("c2", "n3")) })

	// Now the mirror's own server is down while c2 changes: after its
	// restart (empty memory) the first list reconciles the cache.
	c1.Stop()
	del(t, c2.KV(), records.NodeKey("c2", "n1"))
	compact(t, c2)
	c1.Start(t)
	servertest.Eventually(t, wait, "after the mirror's restart", wantKeys(t, c1, records.KindNodes, "c2", "n3", "n4"))
	servertest.Eventually(t, wait, "status after restart", func() error {
		if st, err := status(c1, "c2"); err != nil || !st.Ready || st.Nodes != 2 {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
}

func TestCacheTTLDropsUnreachableRemote(t *testing.T) {
	c1 := servertest.New(t, "c1", 1, "10.1.0.0/16")
	c1.Config.Mirror.CacheTTL = time.Second
	c1.Start(t)
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	keys := seed(t, c2, "10.2.0.5")
	proxy := c2.Proxy
	servertest.Connect(t, c1, c2)
	servertest.Eventually(t, wait, "c1 mirrors c2", func() error { return mirrored(c1, c2, keys...) })

	proxy.Cut()
	cut := time.Now()
	servertest.Eventually(t, wait, "cache dropped after the TTL", func() error {
		for _, prefix := range []string{records.CacheRoot, records.SyncedPrefix + "c2/", records.ClusterConfigKey("c2")} {
			kvs, _, err := c1.KV().GetPrefix(context.Background(), prefix)
			if err != nil || len(kvs) != 0 {
				return fmt.Errorf("%d keys under %s (%v)", len(kvs), prefix, err)
			}
		}
		if st, err := status(c1, "c2"); err != nil || st.State != mirror.StateDropped || st.Ready || st.Nodes != 0 {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
	if d := time.Since(cut); d < time.Second {
		t.Errorf("dropped %s after the cut, before the TTL of 1s", d)
	}

	proxy.Restore()
	servertest.Eventually(t, wait, "mirrored again after the remote came back", func() error { return mirrored(c1, c2, keys...) })
}

func TestInvalidRecordsSkippedAndCounted(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	kv := c2.KV()
	good := node(c2, "good", "192.168.0.2")
	put(t, kv, records.NodeKey("c2", "good"), marshal(t, good))
	// Written straight into c2's etcd, as with etcdctl.
	put(t, kv, records.NodeKey("c2", "bad"), []byte(`{"version":1,"name":"bad",`))
	wrong := node(c2, "wrong", "192.168.0.3")
	wrong.Cluster = "c3"
	put(t, kv, records.NodeKey("c2", "wrong"), marshal(t, wrong))
	wrongID := node(c2, "wrongid", "192.168.0.4")
	wrongID.ClusterID = 3
	put(t, kv, records.NodeKey("c2", "wrongid"), marshal(t, wrongID))
	p := netip.MustParsePrefix("10.2.0.9/32")
	put(t, kv, records.IPCacheKey("c2", "n1", p), marshal(t, records.IPCacheEntry{Prefix: p, Identity: 3<<20 | 1, Cluster: "c2"}))
	put(t, kv, records.IdentityIDKey(3<<20|1), marshal(t, records.IdentityRecord{ID: 3<<20 | 1, Labels: map[string]string{"app": "x"}}))
	put(t, kv, records.IdentityIDKey(2<<20|1), marshal(t, records.IdentityRecord{ID: 2<<20 | 1, Labels: map[string]string{"app": "y"}}))
	// (Service records are not a place for junk: c2's service syncer owns
	// them and deletes what it did not write.)
	put(t, kv, records.IPCacheKey("c2", "n1", netip.MustParsePrefix("10.2.0.10/32")), []byte(`null`))

	servertest.Connect(t, c1, c2)
	servertest.Eventually(t, wait, "valid records mirrored", func() error {
		return mirrored(c1, c2, records.NodeKey("c2", "good"), records.IdentityIDKey(2<<20|1))
	})
	servertest.Eventually(t, wait, "invalid ones counted", func() error {
		st, err := status(c1, "c2")
		if err != nil || !st.Ready || st.Nodes != 1 || st.Identities != 1 || st.Endpoints != 0 || st.Services != 0 ||
			st.Invalid != 6 || st.Skipped < 6 || st.LastInvalid == "" {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
	if got := cacheKeys(t, c1, records.KindNodes, "c2"); !slices.Equal(got, []string{"good"}) {
		t.Errorf("nodes in the cache: %v", got)
	}
	if got := cacheKeys(t, c1, records.KindIdentities, "c2"); !slices.Equal(got, []string{fmt.Sprintf("id/%d", 2<<20|1)}) {
		t.Errorf("identities in the cache: %v", got)
	}

	// A repaired record comes in; a record that goes bad leaves the cache.
	put(t, kv, records.NodeKey("c2", "bad"), marshal(t, node(c2, "bad", "192.168.0.5")))
	put(t, kv, records.NodeKey("c2", "good"), []byte(`{"version":2}`))
	servertest.Eventually(t, wait, "repair and breakage mirrored", wantKeys(t, c1, records.KindNodes, "c2", "bad"))
	servertest.Eventually(t, wait, "counts", func() error {
		if st, err := status(c1, "c2"); err != nil || st.Invalid != 6 || st.Nodes != 1 {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
}

func TestConflictingClustersRefused(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	dupID := servertest.Start(t, "c3", 2, "10.3.0.0/16")
	overlap := servertest.Start(t, "c4", 4, "10.1.128.0/17")
	sameAsLocal := servertest.Start(t, "c5", 1, "10.5.0.0/16")
	for _, c := range []*servertest.Cluster{c2, dupID, overlap, sameAsLocal} {
		put(t, c.KV(), records.NodeKey(c.Name, "n1"), marshal(t, node(c, "n1", "192.168.0.1")))
	}
	servertest.Connect(t, c1, c2)
	servertest.Eventually(t, wait, "c2 mirrored", func() error { return mirrored(c1, c2, records.NodeKey("c2", "n1")) })
	servertest.Connect(t, c1, dupID)
	servertest.Connect(t, c1, overlap)
	servertest.Connect(t, c1, sameAsLocal)
	// A record whose ID is not the cluster's.

	liar := servertest.Start(t, "c6", 6, "10.6.0.0/16")
	b := liar.RemoteBundle(t, "c1")
	b.ClusterID = 7
	v, err := mirror.RemoteFromBundle(b).Marshal("c1")
	if err != nil {
		t.Fatal(err)
	}
	put(t, c1.KV(), etcdserver.RemoteKey("c6"), v)

	for name, want := range map[string]string{
		"c3": `conflicts with connected cluster "c2"`,
		"c4": "overlaps",
		"c5": "conflicts with this cluster",
		"c6": "ID 6",
	} {
		servertest.Eventually(t, wait, name+" refused", func() error {
			st, err := status(c1, name)
			if err != nil || st.State != mirror.StateRefused || st.Connected || !strings.Contains(st.LastError, want) {
				return fmt.Errorf("status %+v %v, want refused with %q", st, err, want)
			}
			return nil
		})
	}
	// Nothing of the refused clusters is mirrored; c2 is untouched.
	time.Sleep(300 * time.Millisecond)
	for _, name := range []string{"c3", "c4", "c5", "c6"} {
		for _, prefix := range []string{records.CachePrefix(records.KindNodes, name), records.SyncedPrefix + name + "/", records.ClusterConfigKey(name)} {
			if kvs, _, _ := c1.KV().GetPrefix(context.Background(), prefix); len(kvs) != 0 {
				t.Errorf("refused cluster %s: %d keys under %s", name, len(kvs), prefix)
			}
		}
	}
	if st, err := status(c1, "c2"); err != nil || st.State != mirror.StateConnected || !st.Ready {
		t.Errorf("c2 status %+v %v", st, err)
	}

	// Disconnecting c2 deletes all of it, and c3 (same ID as c2) is no
	// longer in conflict: it is accepted on its next retry.
	del(t, c1.KV(), etcdserver.RemoteKey("c2"))
	servertest.Eventually(t, wait, "c2 gone", func() error {
		for _, prefix := range []string{records.CachePrefix(records.KindNodes, "c2"), records.SyncedPrefix + "c2/",
			records.ClusterConfigKey("c2"), etcdserver.RemoteStatusKey("c2")} {
			if kvs, _, _ := c1.KV().GetPrefix(context.Background(), prefix); len(kvs) != 0 {
				return fmt.Errorf("%d keys under %s", len(kvs), prefix)
			}
		}
		return nil
	})
	servertest.Eventually(t, wait, "c3 accepted", func() error { return mirrored(c1, dupID, records.NodeKey("c3", "n1")) })
}

func TestRemoteRecordValidation(t *testing.T) {
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	good := mirror.RemoteFromBundle(c2.RemoteBundle(t, "c1"))
	v, err := good.Marshal("c1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mirror.DecodeRemote(etcdserver.RemoteKey("c2"), v, "c1"); err != nil {
		t.Fatalf("valid record: %v", err)
	}
	nodeBundle, err := c2.API().Server.ExportNodeBundle(context.Background(), "n1")
	if err != nil {
		t.Fatal(err)
	}
	forC3 := mirror.RemoteFromBundle(c2.RemoteBundle(t, "c3"))
	var obj map[string]any
	json.Unmarshal(v, &obj)
	obj["extra"] = 1
	extra, _ := json.Marshal(obj)
	for name, tt := range map[string]struct {
		key   string
		value []byte
		local string
		want  string
	}{
		"unknown field":     {etcdserver.RemoteKey("c2"), extra, "c1", "unknown field"},
		"trailing":          {etcdserver.RemoteKey("c2"), append(slices.Clone(v), []byte(" {}")...), "c1", "trailing"},
		"key names another": {etcdserver.RemoteKey("c9"), v, "c1", `names cluster "c2"`},
		"this cluster":      {etcdserver.RemoteKey("c2"), v, "c2", "is this cluster"},
		"node cert":         {etcdserver.RemoteKey("c2"), mustJSON(t, mirror.RemoteFromBundle(nodeBundle)), "c1", `etcd user "node-n1"`},
		"other user":        {etcdserver.RemoteKey("c2"), mustJSON(t, forC3), "c1", `"remote-c3", not "remote-c1"`},
		"http endpoint":     {etcdserver.RemoteKey("c2"), mustJSON(t, with(good, func(r *mirror.Remote) { r.Endpoints = []string{"http://127.0.0.1:2379"} })), "c1", "https://"},
		"no port":           {etcdserver.RemoteKey("c2"), mustJSON(t, with(good, func(r *mirror.Remote) { r.Endpoints = []string{"https://a"} })), "c1", "port"},
		"no CA":             {etcdserver.RemoteKey("c2"), mustJSON(t, with(good, func(r *mirror.Remote) { r.CACert = "" })), "c1", "no CA"},
		"version":           {etcdserver.RemoteKey("c2"), mustJSON(t, with(good, func(r *mirror.Remote) { r.Version = 2 })), "c1", "version 2"},
		"bad key":           {etcdserver.RemotesPrefix + "C_2", v, "c1", "cluster name"},
	} {
		if _, err := mirror.DecodeRemote(tt.key, tt.value, tt.local); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", name, err, tt.want)
		}
	}
}

func with(r mirror.Remote, f func(*mirror.Remote)) mirror.Remote {
	r.Endpoints = slices.Clone(r.Endpoints)
	f(&r)
	return r
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestMirrorRemoteEtcdReset: the remote's etcd is wiped and rebuilt (same
// cluster, same CA, a new keyspace whose revisions start over). Watches
// resumed at the old revisions would wait for revisions the new store has
// not reached; the mirror notices the reset and mirrors it afresh.
func TestMirrorRemoteEtcdReset(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	for i := range 30 {
		put(t, c2.KV(), records.NodeKey("c2", "old"), marshal(t, node(c2, "old", fmt.Sprintf("192.168.1.%d", i+1))))
	}
	servertest.Connect(t, c1, c2)
	servertest.Eventually(t, wait, "c1 mirrors c2", wantKeys(t, c1, records.KindNodes, "c2", "old"))

	c2.Stop()
	if err := os.RemoveAll(filepath.Join(c2.DataDir(), "etcd")); err != nil {
		t.Fatal(err)
	}
	c2.Start(t)
	c2.RemoteBundle(t, "c1") // the users were in the old store too
	put(t, c2.KV(), records.NodeKey("c2", "new"), marshal(t, node(c2, "new", "192.168.2.1")))
	servertest.Eventually(t, wait, "c1 mirrors the new keyspace", wantKeys(t, c1, records.KindNodes, "c2", "new"))
}
