package meshsync

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// startCappedWatch is startWatch with a cap on each remote's ipcache.
func startCappedWatch(t *testing.T, c *kvstore.Client, maxIPCache int) *Tables {
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)
	tables.SetMaxIPCachePerRemote(maxIPCache)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { Watch(ctx, c, tables); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return tables
}

func ipPrefixRec(t *testing.T, cluster, prefix string, identity uint32, host string) []byte {
	return must(records.IPCacheEntry{Prefix: netip.MustParsePrefix(prefix), Identity: identity,
		HostIP: netip.MustParseAddr(host), Cluster: cluster}.Marshal())
}

func remoteIPKey(t *testing.T, cluster, prefix string) string {
	return cacheKey(t, records.IPCacheKey(cluster, "n1", netip.MustParsePrefix(prefix)), cluster)
}

func clusterStatus(tables *Tables, name string) ClusterStatus {
	for _, c := range tables.Status().Clusters {
		if c.Name == name {
			return c
		}
	}
	return ClusterStatus{}
}

func refusal(tables *Tables, cluster, reason string) Refusal {
	for _, r := range tables.Refusals() {
		if r.Cluster == cluster && r.Reason == reason {
			return r
		}
	}
	return Refusal{}
}

// TestForgedRemoteRecordsRefused plays the attacker of issue 10: with the
// credentials of one node of c2, records written into c2's etcd (and
// mirrored by a server that let them through) must not reach c1's desired
// state, while c2's valid records keep flowing.
func TestForgedRemoteRecordsRefused(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	put(t, c, records.ClusterConfigKey("c1"), clusterConfig(t, "c1", 1, "10.1.0.0/16"))
	put(t, c, records.ClusterConfigKey("c2"), must(records.ClusterConfig{Name: "c2", ID: 2,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("fd00:2::/48")}}.Marshal()))
	for _, k := range records.Kinds {
		put(t, c, records.SyncedKey("c2", k), canary(t, "c2"))
	}
	const host = "198.51.100.1"
	// Valid records of c2.
	put(t, c, cacheKey(t, records.NodeKey("c2", "n1"), "c2"), nodeRec(t, "c2", 2, "n1", host, "10.2.1.0/24"))
	put(t, c, remoteIPKey(t, "c2", "10.2.1.5/32"), ipRec(t, "c2", "10.2.1.5", idRemote, host))
	put(t, c, cacheKey(t, records.ServiceKey("c2", "default", "web"), "c2"), serviceRec(t, "c2", 2, "10.2.1.5"))
	// n4, whose pod CIDR n2 will claim: both are refused then, so that n2
	// cannot take n4's pods (and their traffic) by sorting or writing first.
	put(t, c, cacheKey(t, records.NodeKey("c2", "n4"), "c2"), nodeRec(t, "c2", 2, "n4", "198.51.100.4", "10.2.4.0/24"))

	forged := []struct{ what, key, reason string }{
		{"0.0.0.0/0 as the host", remoteIPKey(t, "c2", "0.0.0.0/0"), records.ReasonReservedIdentity},
		{"a c2 pod as remote-node", remoteIPKey(t, "c2", "10.2.1.6/32"), records.ReasonReservedIdentity},
		{"0.0.0.0/0 with a c2 identity", remoteIPKey(t, "c2", "0.0.0.0/0"), records.ReasonPrefixNotOwned},
		{"::/0 with a c2 identity", remoteIPKey(t, "c2", "::/0"), records.ReasonPrefixNotOwned},
		{"c1's pod CIDR", remoteIPKey(t, "c2", "10.1.1.0/24"), records.ReasonPrefixNotOwned},
		{"n4's pod CIDR claimed by n2", cacheKey(t, records.NodeKey("c2", "n2"), "c2"), records.ReasonNodeCIDROverlap},
		{"a node with c1's pod CIDR", cacheKey(t, records.NodeKey("c2", "n3"), "c2"), records.ReasonNodeCIDRNotOwned},
		{"a service backend in c1", cacheKey(t, records.ServiceKey("c2", "default", "evil"), "c2"), records.ReasonBackendNotOwned},
	}
	values := [][]byte{
		ipPrefixRec(t, "c2", "0.0.0.0/0", 1, host),
		ipRec(t, "c2", "10.2.1.6", 6, host),
		nil, // 0.0.0.0/0 again, below
		ipPrefixRec(t, "c2", "::/0", idRemote, host),
		ipPrefixRec(t, "c2", "10.1.1.0/24", idRemote, host),
		nodeRec(t, "c2", 2, "n2", "198.51.100.2", "10.2.4.0/24"),
		nodeRec(t, "c2", 2, "n3", "198.51.100.3", "10.1.1.0/24"),
		must(records.ServiceRecord{Name: "evil", Namespace: "default", Cluster: "c2", ClusterID: 2,
			Frontends: []records.Frontend{{IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: "TCP"}},
			Backends: []records.Backend{{IP: netip.MustParseAddr("10.2.1.5"), Port: 80, Protocol: "TCP", Cluster: "c2"},
				{IP: netip.MustParseAddr("10.1.1.5"), Port: 80, Protocol: "TCP", Cluster: "c2"}},
			Global: true, Shared: true}.Marshal()),
	}
	tables := startCappedWatch(t, c, 0)
	eventually(t, "ready", tables.Ready)
	want := map[string]uint64{}
	for i, f := range forged {
		if values[i] == nil {
			values[i] = ipPrefixRec(t, "c2", "0.0.0.0/0", idRemote, host)
		}
		put(t, c, f.key, values[i])
		want[f.reason]++
		if f.reason == records.ReasonNodeCIDROverlap {
			want[f.reason]++ // n4 too
		}
		eventually(t, f.what+" refused and counted", func() bool { return refusal(tables, "c2", f.reason).Total == want[f.reason] })
	}
	v := tables.View()
	if got, w := ipsOf(tables), []string{"c2/10.2.1.5/32"}; !slices.Equal(got, w) {
		t.Errorf("ipcache %v, want %v", got, w)
	}
	if got, w := nodesOf(v), []string{"c2/n1"}; !slices.Equal(got, w) {
		t.Errorf("nodes %v, want %v", got, w)
	}
	if len(v.RemoteServices) != 1 || v.RemoteServices[0].Name != "web" {
		t.Errorf("services %v", v.RemoteServices)
	}
	st := clusterStatus(tables, "c2")
	if st.Refused[records.ReasonPrefixNotOwned] != 3 || st.Refused[records.ReasonReservedIdentity] != 1 ||
		st.Refused[records.ReasonNodeCIDROverlap] != 2 || st.Refused[records.ReasonBackendNotOwned] != 1 {
		t.Errorf("refused now %v (total %v)", st.Refused, st.RefusedTotal)
	}
	// Written again (as a re-list delivers it): not counted again.
	put(t, c, forged[3].key, values[3])
	put(t, c, remoteIPKey(t, "c2", "10.2.1.7/32"), ipRec(t, "c2", "10.2.1.7", idRemote, host))
	eventually(t, "a later valid record", func() bool { return len(tables.IPCache()) == 2 })
	if got := refusal(tables, "c2", records.ReasonPrefixNotOwned).Total; got != want[records.ReasonPrefixNotOwned] {
		t.Errorf("the same refusal counted again: %d", got)
	}

	// The node that held the pod CIDR goes: n2 (refused for overlapping
	// it) comes in, its CIDR routed now.
	del(t, c, cacheKey(t, records.NodeKey("c2", "n4"), "c2"))
	eventually(t, "n2 accepted once n4 is gone", func() bool {
		return slices.Equal(nodesOf(tables.View()), []string{"c2/n1", "c2/n2"})
	})

	// The own cluster: a node holding c1's credentials is no better.
	put(t, c, records.IPCacheKey("c1", "n1", netip.MustParsePrefix("0.0.0.0/0")), ipPrefixRec(t, "c1", "0.0.0.0/0", 1, "192.0.2.12"))
	put(t, c, records.IPCacheKey("c1", "n1", netip.MustParsePrefix("10.1.2.5/32")), ipRec(t, "c1", "10.1.2.5", idWeb, "192.0.2.12"))
	eventually(t, "own forgery refused", func() bool { return refusal(tables, "c1", records.ReasonReservedIdentity).Total == 1 })
	eventually(t, "own endpoint", func() bool { return slices.Contains(ipsOf(tables), "c1/10.1.2.5/32") })
	if slices.Contains(ipsOf(tables), "c1/0.0.0.0/0") {
		t.Error("own cluster's 0.0.0.0/0 as host accepted")
	}
}

// TestRemoteFloodCapped: one cluster cannot fill the shared ipcache; the
// entries past the cap are refused (the last ones by key) and counted, and
// another cluster's entries keep flowing.
func TestRemoteFloodCapped(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	put(t, c, records.ClusterConfigKey("c1"), clusterConfig(t, "c1", 1, "10.1.0.0/16"))
	for _, r := range []struct {
		name string
		id   uint32
	}{{"c2", 2}, {"c3", 3}} {
		put(t, c, records.ClusterConfigKey(r.name), clusterConfig(t, r.name, r.id, fmt.Sprintf("10.%d.0.0/16", r.id)))
		for _, k := range records.Kinds {
			put(t, c, records.SyncedKey(r.name, k), canary(t, r.name))
		}
	}
	const limit = 10
	tables := startCappedWatch(t, c, limit)
	var ops []kvstore.Op
	for i := range 25 {
		ip := fmt.Sprintf("10.2.%d.%d", i/200, 1+i%200)
		ops = append(ops, kvstore.OpPut(remoteIPKey(t, "c2", ip+"/32"), ipRec(t, "c2", ip, idRemote, "198.51.100.1")))
	}
	if _, err := c.Txn(testCtx(t), nil, ops); err != nil {
		t.Fatal(err)
	}
	put(t, c, remoteIPKey(t, "c3", "10.3.0.1/32"), ipRec(t, "c3", "10.3.0.1", 3<<20|1, "198.51.100.9"))
	// In use too, not only counted: the canaries may be read after the
	// entries (each kind has its own watch).
	inUse := func(cluster string) int {
		n := 0
		for _, e := range tables.IPCache() {
			if e.Cluster == cluster {
				n++
			}
		}
		return n
	}
	eventually(t, "c2 capped, c3 flowing", func() bool {
		return clusterStatus(tables, "c2").Endpoints == limit && clusterStatus(tables, "c3").Endpoints == 1 &&
			inUse("c2") == limit && inUse("c3") == 1
	})
	if r := refusal(tables, "c2", records.ReasonOverCap); r.Now != 15 || r.Total != 15 {
		t.Errorf("over-cap %+v", r)
	}
	// The accepted ones are the first by key, whatever the arrival order.
	var keys []string
	for i := range 25 {
		keys = append(keys, records.IPCacheKey("c2", "n1", netip.MustParsePrefix(fmt.Sprintf("10.2.%d.%d/32", i/200, 1+i%200))))
	}
	slices.Sort(keys)
	var got []string
	for _, e := range tables.IPCache() {
		if e.Cluster == "c2" {
			got = append(got, records.IPCacheKey("c2", "n1", e.Prefix))
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, keys[:limit]) {
		t.Errorf("accepted %v, want %v", got, keys[:limit])
	}
	// One goes: the next one by key comes in.
	_, _, p, _ := records.ParseIPCacheKey(keys[0])
	del(t, c, remoteIPKey(t, "c2", p.String()))
	eventually(t, "the next entry in", func() bool {
		for _, e := range tables.IPCache() {
			if records.IPCacheKey("c2", "n1", e.Prefix) == keys[limit] {
				return true
			}
		}
		return false
	})
}

// TestOwnershipOrdering: records that arrive before what makes them valid
// (an endpoint on a node address before the node, endpoints in a range the
// cluster config announces only later) come in when it arrives, and go
// when it goes.
func TestOwnershipOrdering(t *testing.T) {
	e := etcdtest.Start(t)
	c := connect(t, e)
	put(t, c, records.ClusterConfigKey("c1"), clusterConfig(t, "c1", 1, "10.1.0.0/16"))
	put(t, c, records.ClusterConfigKey("c2"), clusterConfig(t, "c2", 2, "10.2.0.0/16"))
	for _, k := range records.Kinds {
		put(t, c, records.SyncedKey("c2", k), canary(t, "c2"))
	}
	tables := startCappedWatch(t, c, 0)
	eventually(t, "ready", tables.Ready)

	// An endpoint on the address of a node whose record is not there yet.
	const nodeIP = "198.51.100.7"
	put(t, c, remoteIPKey(t, "c2", nodeIP+"/32"), ipRec(t, "c2", nodeIP, idRemote, nodeIP))
	eventually(t, "refused before its node", func() bool { return refusal(tables, "c2", records.ReasonPrefixNotOwned).Now == 1 })
	nodeKey := cacheKey(t, records.NodeKey("c2", "n7"), "c2")
	put(t, c, nodeKey, nodeRec(t, "c2", 2, "n7", nodeIP, "10.2.7.0/24"))
	eventually(t, "accepted after its node", func() bool { return slices.Equal(ipsOf(tables), []string{"c2/" + nodeIP + "/32"}) })
	del(t, c, nodeKey)
	eventually(t, "refused again without its node", func() bool { return len(tables.IPCache()) == 0 })

	// A range the cluster config announces later.
	put(t, c, remoteIPKey(t, "c2", "10.20.0.5/32"), ipRec(t, "c2", "10.20.0.5", idRemote, nodeIP))
	eventually(t, "outside the pod CIDRs", func() bool { return refusal(tables, "c2", records.ReasonPrefixNotOwned).Now == 2 })
	put(t, c, records.ClusterConfigKey("c2"), must(records.ClusterConfig{Name: "c2", ID: 2,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("10.20.0.0/16")}}.Marshal()))
	eventually(t, "accepted once announced", func() bool { return slices.Equal(ipsOf(tables), []string{"c2/10.20.0.5/32"}) })
	if total := refusal(tables, "c2", records.ReasonPrefixNotOwned).Total; total != 3 {
		t.Errorf("refusals counted %d, want 3 (one per key and refusal)", total)
	}
}
