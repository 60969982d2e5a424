package meshsync

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// deltaTables returns tables of node1 of c1, with c2's config known.
func deltaTables(t *testing.T) (*Tables, func(prefix, key string, v []byte)) {
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)
	handle := func(prefix, key string, v []byte) {
		ev := kvstore.Event{Type: kvstore.EventUpsert, Key: key, Value: v}
		if v == nil {
			ev.Type = kvstore.EventDelete
		}
		tables.Handle(prefix, ev)
	}
	handle(records.ClusterConfigPrefix, records.ClusterConfigKey("c1"), must(records.ClusterConfig{Name: "c1", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}}.Marshal()))
	handle(records.ClusterConfigPrefix, records.ClusterConfigKey("c2"), must(records.ClusterConfig{Name: "c2", ID: 2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}}.Marshal()))
	handle(records.StateClusterPrefix(records.KindNodes, "c1"), records.NodeKey("c1", "node2"),
		must(records.Node{Name: "node2", Cluster: "c1", ClusterID: 1, IPs: []netip.Addr{netip.MustParseAddr("192.0.2.2")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24")}}.Marshal()))
	nk, _ := records.CacheKey(records.NodeKey("c2", "n1"), "c2")
	handle(records.CacheRoot, nk, must(records.Node{Name: "n1", Cluster: "c2", ClusterID: 2, IPs: []netip.Addr{netip.MustParseAddr("198.51.100.1")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24")}}.Marshal()))
	return tables, handle
}

func ipRecord(cluster string, id uint32, host, addr string) (string, []byte) {
	p := netip.MustParsePrefix(addr + "/32")
	node := map[string]string{"c1": "node2", "c2": "n1"}[cluster]
	return records.IPCacheKey(cluster, node, p), must(records.IPCacheEntry{Prefix: p, Identity: id, HostIP: netip.MustParseAddr(host), Cluster: cluster}.Marshal())
}

// The tables hand out what changed: the prefixes of entries that came,
// changed or went in a cluster in use; nothing for a remote cluster
// before its canary; all of its prefixes (and only its) when its entries
// come into use or go out of it.
func TestTakeIPChanges(t *testing.T) {
	tables, handle := deltaTables(t)
	tables.TakeIPChanges()
	ownPrefix := records.StateClusterPrefix(records.KindIP, "c1")
	k, v := ipRecord("c1", 1<<20|1, "192.0.2.2", "10.1.2.5")
	handle(ownPrefix, k, v)
	changed, full := tables.TakeIPChanges()
	if full || !slices.Equal(changed, []netip.Prefix{netip.MustParsePrefix("10.1.2.5/32")}) {
		t.Fatalf("own entry: changed %v full %v", changed, full)
	}
	if e, ok := tables.LookupIP(netip.MustParsePrefix("10.1.2.5/32")); !ok || e.Identity != 1<<20|1 || e.Cluster != "c1" {
		t.Fatalf("LookupIP = %+v %v", e, ok)
	}
	if changed, full := tables.TakeIPChanges(); full || len(changed) != 0 {
		t.Fatalf("taken twice: %v %v", changed, full)
	}
	// A remote entry before the canary: not in use, no change.
	rk, rv := ipRecord("c2", 2<<20|1, "198.51.100.1", "10.2.1.5")
	ck, _ := records.CacheKey(rk, "c2")
	handle(records.CacheRoot, ck, rv)
	if changed, full := tables.TakeIPChanges(); full || len(changed) != 0 {
		t.Fatalf("remote before its canary: %v %v", changed, full)
	}
	if _, ok := tables.LookupIP(netip.MustParsePrefix("10.2.1.5/32")); ok {
		t.Fatal("a remote entry in use before its canary")
	}
	canary := func(on bool) {
		var v []byte
		if on {
			v = must(records.Stamp{Cluster: "c2", Time: time.Now()}.Marshal())
		}
		handle(records.SyncedPrefix, records.SyncedKey("c2", records.KindIP), v)
	}
	canary(true)
	if changed, full := tables.TakeIPChanges(); full || !slices.Equal(changed, []netip.Prefix{netip.MustParsePrefix("10.2.1.5/32")}) {
		t.Fatalf("a remote cluster's entries came into use: changed %v full %v, want its every prefix", changed, full)
	}
	if _, ok := tables.LookupIP(netip.MustParsePrefix("10.2.1.5/32")); !ok {
		t.Fatal("the remote entry not in use after its canary")
	}
	// In use: its changes are per prefix.
	rk, rv = ipRecord("c2", 2<<20|2, "198.51.100.1", "10.2.1.5")
	ck, _ = records.CacheKey(rk, "c2")
	handle(records.CacheRoot, ck, rv)
	if changed, full := tables.TakeIPChanges(); full || len(changed) != 1 {
		t.Fatalf("remote update: %v %v", changed, full)
	}
	handle(records.CacheRoot, ck, nil)
	if changed, _ := tables.TakeIPChanges(); len(changed) != 1 {
		t.Fatalf("remote delete: %v", changed)
	}
	rk, rv = ipRecord("c2", 2<<20|2, "198.51.100.1", "10.2.1.6")
	ck, _ = records.CacheKey(rk, "c2")
	handle(records.CacheRoot, ck, rv)
	tables.TakeIPChanges()
	canary(false)
	if changed, _ := tables.TakeIPChanges(); !slices.Equal(changed, []netip.Prefix{netip.MustParsePrefix("10.2.1.6/32")}) {
		t.Fatalf("a remote cluster's entries went out of use: changed %v, want its every prefix", changed)
	}
	if _, ok := tables.LookupIP(netip.MustParsePrefix("10.2.1.6/32")); ok {
		t.Fatal("an entry of a cluster out of use is still looked up")
	}
}

// View is built again only when something in it changed.
func TestViewCachedByVersions(t *testing.T) {
	tables, handle := deltaTables(t)
	v1 := tables.View()
	if v2 := tables.View(); v1.Versions != v2.Versions || len(v2.Nodes) == 0 || &v1.Nodes[0] != &v2.Nodes[0] {
		t.Fatal("View built again with nothing changed")
	}
	// An ipcache change is not in the View.
	k, v := ipRecord("c1", 1<<20|1, "192.0.2.2", "10.1.2.5")
	handle(records.StateClusterPrefix(records.KindIP, "c1"), k, v)
	if v3 := tables.View(); v3.Versions.Nodes != v1.Versions.Nodes || v3.Versions.OwnIPs == v1.Versions.OwnIPs {
		t.Fatalf("versions after an own ipcache change: %+v -> %+v", v1.Versions, v3.Versions)
	}
	handle(records.StateClusterPrefix(records.KindNodes, "c1"), records.NodeKey("c1", "node3"),
		must(records.Node{Name: "node3", Cluster: "c1", ClusterID: 1, IPs: []netip.Addr{netip.MustParseAddr("192.0.2.3")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.3.0/24")}}.Marshal()))
	if v4 := tables.View(); v4.Versions.Nodes == v1.Versions.Nodes || len(v4.Nodes) != len(v1.Nodes)+1 {
		t.Fatalf("a new node: %d nodes, versions %+v", len(v4.Nodes), v4.Versions)
	}
}

// A remote cluster's entries survive changes of its ID without their raw
// values being kept: before the ID is known they wait raw; once accepted
// only the decoded entry is kept, and a change of ID validates them again
// from it (refused under the new ID, accepted again under the old one).
func TestRebuildWithoutRawValues(t *testing.T) {
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)
	handle := func(prefix, key string, v []byte) {
		tables.Handle(prefix, kvstore.Event{Type: kvstore.EventUpsert, Key: key, Value: v})
	}
	for _, k := range records.Kinds {
		handle(records.SyncedPrefix, records.SyncedKey("c2", k), must(records.Stamp{Cluster: "c2", Time: time.Now()}.Marshal()))
	}
	nk, _ := records.CacheKey(records.NodeKey("c2", "n1"), "c2")
	handle(records.CacheRoot, nk, must(records.Node{Name: "n1", Cluster: "c2", ClusterID: 2, IPs: []netip.Addr{netip.MustParseAddr("198.51.100.1")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24")}}.Marshal()))
	for i := range 3 {
		k, v := ipRecord("c2", 2<<20|1, "198.51.100.1", netip.AddrFrom4([4]byte{10, 2, 1, byte(i + 1)}).String())
		ck, _ := records.CacheKey(k, "c2")
		handle(records.CacheRoot, ck, v)
	}
	config := func(id uint32) {
		handle(records.ClusterConfigPrefix, records.ClusterConfigKey("c2"), must(records.ClusterConfig{Name: "c2", ID: id, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}}.Marshal()))
	}
	rawIPs := func() int {
		tables.mu.RLock()
		defer tables.mu.RUnlock()
		n := 0
		for k := range tables.clusters["c2"].raw {
			if isIPKey(k) {
				n++
			}
		}
		return n
	}
	if n := len(tables.IPCache()); n != 0 || rawIPs() != 3 {
		t.Fatalf("before the config: %d entries in use, %d raw", n, rawIPs())
	}
	config(2)
	if n := len(tables.IPCache()); n != 3 || rawIPs() != 0 {
		t.Fatalf("ID 2: %d entries in use, %d raw values kept; want 3, 0", n, rawIPs())
	}
	// One more once the ID is known: not kept raw either.
	k, v := ipRecord("c2", 2<<20|1, "198.51.100.1", "10.2.1.9")
	ck, _ := records.CacheKey(k, "c2")
	handle(records.CacheRoot, ck, v)
	if n := len(tables.IPCache()); n != 4 || rawIPs() != 0 {
		t.Fatalf("a fourth entry: %d entries in use, %d raw values kept; want 4, 0", n, rawIPs())
	}
	config(3) // the identities carry ID 2: refused now, kept raw to be judged again
	if n := len(tables.IPCache()); n != 0 || rawIPs() != 4 {
		t.Fatalf("ID 3: %d entries in use, %d raw", n, rawIPs())
	}
	config(2)
	if n := len(tables.IPCache()); n != 4 || rawIPs() != 0 {
		t.Fatalf("ID 2 again: %d entries in use, %d raw", n, rawIPs())
	}
}
