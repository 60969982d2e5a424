package meshsync

import (
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// must returns an encoded record; the encoders only fail on invalid
// records, which is a bug in the test.
func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func put(t *testing.T, c *kvstore.Client, key string, value []byte) {
	t.Helper()
	if err := c.Put(testCtx(t), key, value); err != nil {
		t.Fatal(err)
	}
}

func del(t *testing.T, c *kvstore.Client, key string) {
	t.Helper()
	if err := c.Delete(testCtx(t), key); err != nil {
		t.Fatal(err)
	}
}

const (
	idWeb    = 1<<20 | 7
	idRemote = 2<<20 | 3
)

func clusterConfig(t *testing.T, name string, id uint32, cidr string) []byte {
	return must(records.ClusterConfig{Name: name, ID: id, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}}.Marshal())
}

func nodeRec(t *testing.T, cluster string, id uint32, name, ip, cidr string) []byte {
	return must(records.Node{Name: name, Cluster: cluster, ClusterID: id, IPs: []netip.Addr{netip.MustParseAddr(ip)},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}}.Marshal())
}

func ipRec(t *testing.T, cluster, ip string, identity uint32, host string) []byte {
	a := netip.MustParseAddr(ip)
	return must(records.IPCacheEntry{Prefix: netip.PrefixFrom(a, a.BitLen()), Identity: identity,
		HostIP: netip.MustParseAddr(host), OwnerName: "pod", OwnerNamespace: "default", Cluster: cluster}.Marshal())
}

func identityRec(t *testing.T, id uint32, cluster, app string) []byte {
	return must(records.IdentityRecord{ID: id, Labels: map[string]string{
		"app": app, "isthmus.io/cluster": cluster, "isthmus.io/namespace": "default"}}.Marshal())
}

func serviceRec(t *testing.T, cluster string, id uint32, backend string) []byte {
	return must(records.ServiceRecord{Name: "web", Namespace: "default", Cluster: cluster, ClusterID: id,
		Frontends: []records.Frontend{{IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: "TCP"}},
		Backends:  []records.Backend{{IP: netip.MustParseAddr(backend), Port: 8080, Protocol: "TCP", Cluster: cluster}},
		Global:    true, Shared: true}.Marshal())
}

func canary(t *testing.T, cluster string) []byte {
	return must(records.Stamp{Cluster: cluster, Time: time.Now().UTC()}.Marshal())
}

func cacheKey(t *testing.T, stateKey, cluster string) string {
	t.Helper()
	k, err := records.CacheKey(stateKey, cluster)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

const webService = `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default","annotations":{"isthmus.io/global":"true"}},"spec":{"vips":["10.96.0.10"],"ports":[{"port":80,"targetPort":8080}],"selector":{"app":"web"}}}`

// startWatch runs Watch into fresh tables for node1 of c1.
func startWatch(t *testing.T, c *kvstore.Client) (*Tables, *atomic.Int64) {
	var changes atomic.Int64
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, func() { changes.Add(1) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { Watch(ctx, c, tables); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return tables, &changes
}

func ipsOf(t *Tables) []string {
	var out []string
	for _, e := range t.IPCache() {
		out = append(out, e.Cluster+"/"+e.Prefix.String())
	}
	slices.Sort(out)
	return out
}

func nodesOf(v View) []string {
	var out []string
	for _, n := range v.Nodes {
		out = append(out, n.Cluster+"/"+n.Name)
	}
	slices.Sort(out)
	return out
}

func TestWatchTurnsRecordsIntoDesiredState(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)

	// The own cluster, as its server and its other node wrote it.
	put(t, c, records.ClusterConfigKey("c1"), clusterConfig(t, "c1", 1, "10.1.0.0/16"))
	put(t, c, records.NodeKey("c1", "node2"), nodeRec(t, "c1", 1, "node2", "192.0.2.12", "10.1.2.0/24"))
	put(t, c, records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.5/32")), ipRec(t, "c1", "10.1.2.5", idWeb, "192.0.2.12"))
	put(t, c, records.IdentityIDKey(idWeb), identityRec(t, idWeb, "c1", "web"))
	put(t, c, records.ServiceKey("c1", "default", "web"), serviceRec(t, "c1", 1, "10.1.2.5"))
	put(t, c, ConfigKey("Service/default/web"), []byte(webService))

	// A remote cluster mirrored by the server, with its canaries.
	put(t, c, records.ClusterConfigKey("c2"), clusterConfig(t, "c2", 2, "10.2.0.0/16"))
	put(t, c, cacheKey(t, records.NodeKey("c2", "n1"), "c2"), nodeRec(t, "c2", 2, "n1", "198.51.100.1", "10.2.1.0/24"))
	put(t, c, cacheKey(t, records.IPCacheKey("c2", "n1", netip.MustParsePrefix("10.2.1.5/32")), "c2"), ipRec(t, "c2", "10.2.1.5", idRemote, "198.51.100.1"))
	put(t, c, cacheKey(t, records.IdentityIDKey(idRemote), "c2"), identityRec(t, idRemote, "c2", "client"))
	put(t, c, cacheKey(t, records.ServiceKey("c2", "default", "web"), "c2"), serviceRec(t, "c2", 2, "10.2.1.5"))
	for _, k := range records.Kinds {
		put(t, c, records.SyncedKey("c2", k), canary(t, "c2"))
	}

	// Bad input, as someone with etcdctl might write it: each is skipped
	// and counted, and none stops the rest.
	bad := map[string][]byte{
		// malformed JSON
		records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.6/32")): []byte(`{"version":1,"prefix":`),
		// a record of another cluster under the own cluster's key
		records.NodeKey("c1", "node3"): nodeRec(t, "c9", 9, "node3", "192.0.2.13", "10.1.3.0/24"),
		// an identity of cluster 2 in the own cluster's ipcache
		records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.7/32")): ipRec(t, "c1", "10.1.2.7", idRemote, "192.0.2.12"),
		// a remote's mirror holding a record of a third cluster
		cacheKey(t, records.NodeKey("c2", "n2"), "c2"): nodeRec(t, "c3", 3, "n2", "198.51.100.2", "10.3.1.0/24"),
		// an applied object that is not one, and one stored under the wrong key
		ConfigKey("Service/default/broken"): []byte(`{"apiVersion": "isthmus.io/v1alpha1", "kind": "Service"`),
		ConfigKey("Service/default/other"):  []byte(webService),
		// the own cluster in the remote cache
		cacheKey(t, records.IdentityIDKey(1<<20|9), "c1"): identityRec(t, 1<<20|9, "c1", "x"),
	}
	for k, v := range bad {
		put(t, c, k, v)
	}

	tables, _ := startWatch(t, c)
	eventually(t, "tables ready", tables.Ready)
	v := tables.View()
	if got, want := nodesOf(v), []string{"c1/node2", "c2/n1"}; !slices.Equal(got, want) {
		t.Errorf("nodes %v, want %v", got, want)
	}
	if got, want := ipsOf(tables), []string{"c1/10.1.2.5/32", "c2/10.2.1.5/32"}; !slices.Equal(got, want) {
		t.Errorf("ipcache %v, want %v", got, want)
	}
	if len(v.Identities) != 2 || v.Identities[0].ID != idWeb || v.Identities[1].ID != idRemote || v.Identities[1].Labels["app"] != "client" {
		t.Errorf("identities %v", v.Identities)
	}
	if len(v.RemoteServices) != 1 || v.RemoteServices[0].Cluster != "c2" {
		t.Errorf("remote services %v", v.RemoteServices)
	}
	objs := tables.Objects()
	if len(objs) != 1 || objs["Service/default/web"] == nil {
		t.Errorf("objects %v", objs)
	}
	st := tables.Status()
	if st.InvalidRecords != uint64(len(bad)) {
		t.Errorf("invalid records counted %d, want %d (last: %s)", st.InvalidRecords, len(bad), st.LastInvalid)
	}
	if len(st.Clusters) != 2 || !st.Clusters[0].Local || st.Clusters[0].Name != "c1" || !st.Clusters[0].Synced ||
		st.Clusters[0].Nodes != 1 || st.Clusters[0].Endpoints != 1 || st.Clusters[0].Services != 1 || st.Clusters[0].Identities != 1 ||
		st.Clusters[1].Name != "c2" || !st.Clusters[1].Synced || st.Clusters[1].ID != 2 || st.Clusters[1].Invalid != 1 {
		t.Errorf("status %+v", st)
	}

	// Changes flow; a remote kind without its canary is not used.
	put(t, c, records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.8/32")), ipRec(t, "c1", "10.1.2.8", idWeb, "192.0.2.12"))
	del(t, c, records.SyncedKey("c2", records.KindIP))
	eventually(t, "new endpoint in, remote endpoints out", func() bool {
		return slices.Equal(ipsOf(tables), []string{"c1/10.1.2.5/32", "c1/10.1.2.8/32"})
	})
	if got := nodesOf(tables.View()); len(got) != 2 {
		t.Errorf("remote nodes went with the ipcache canary: %v", got)
	}
	put(t, c, records.SyncedKey("c2", records.KindIP), canary(t, "c2"))
	eventually(t, "remote endpoints back", func() bool { return len(tables.IPCache()) == 3 })

	// A bad value replacing a good one removes the old one too.
	put(t, c, records.NodeKey("c1", "node2"), []byte(`not json`))
	eventually(t, "node2 gone after its record went bad", func() bool { return len(tables.View().Nodes) == 1 })

	// A remote cluster whose ID clashes with the own cluster is refused.
	put(t, c, records.ClusterConfigKey("c2"), clusterConfig(t, "c2", 1, "10.2.0.0/16"))
	eventually(t, "c2 refused", func() bool {
		st := tables.Status()
		return len(st.Clusters) == 2 && st.Clusters[1].Error != "" && !st.Clusters[1].Synced
	})
	if v := tables.View(); len(v.RemoteServices) != 0 || len(v.Identities) != 1 {
		t.Errorf("refused cluster still used: %+v", v)
	}
}

func TestRemoteStateWaitsForClusterConfig(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	put(t, c, records.ClusterConfigKey("c1"), clusterConfig(t, "c1", 1, "10.1.0.0/16"))
	put(t, c, cacheKey(t, records.NodeKey("c2", "n1"), "c2"), nodeRec(t, "c2", 2, "n1", "198.51.100.1", "10.2.1.0/24"))
	put(t, c, records.SyncedKey("c2", records.KindNodes), canary(t, "c2"))

	tables, _ := startWatch(t, c)
	eventually(t, "ready", tables.Ready)
	if n := len(tables.View().Nodes); n != 0 {
		t.Fatalf("remote node used before its cluster's ID is known: %d", n)
	}
	put(t, c, records.ClusterConfigKey("c2"), clusterConfig(t, "c2", 2, "10.2.0.0/16"))
	eventually(t, "remote node after its cluster-config", func() bool { return len(tables.View().Nodes) == 1 })

	// With another ID, the mirrored records no longer match and are dropped.
	put(t, c, records.ClusterConfigKey("c2"), clusterConfig(t, "c2", 5, "10.2.0.0/16"))
	eventually(t, "records of the old ID dropped", func() bool { return len(tables.View().Nodes) == 0 })
	if st := tables.Status(); st.InvalidRecords == 0 {
		t.Error("mismatching records not counted")
	}
}

func TestTablesSurviveEtcdOutage(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	put(t, c, records.ClusterConfigKey("c1"), clusterConfig(t, "c1", 1, "10.1.0.0/16"))
	keep := records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.5/32"))
	gone := records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.6/32"))
	put(t, c, keep, ipRec(t, "c1", "10.1.2.5", idWeb, "192.0.2.12"))
	put(t, c, gone, ipRec(t, "c1", "10.1.2.6", idWeb, "192.0.2.12"))

	tables, _ := startWatch(t, c)
	eventually(t, "both endpoints", func() bool { return len(tables.IPCache()) == 2 })

	e.Stop()
	time.Sleep(500 * time.Millisecond)
	if n := len(tables.IPCache()); n != 2 {
		t.Fatalf("tables changed while etcd was away: %d entries", n)
	}
	e.Restart(t)
	del(t, c, gone)
	eventually(t, "the deletion after the outage", func() bool {
		v := tables.IPCache()
		return len(v) == 1 && v[0].Prefix.String() == "10.1.2.5/32"
	})
}

func TestDecodeObject(t *testing.T) {
	if _, err := DecodeObject(ConfigKey("Service/default/web"), []byte(webService)); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	_ = json.Unmarshal([]byte(webService), &m)
	m["spec"].(map[string]any)["vips"] = []string{"not-an-ip"}
	b, _ := json.Marshal(m)
	if _, err := DecodeObject(ConfigKey("Service/default/web"), b); err == nil {
		t.Error("invalid object accepted")
	}
}
