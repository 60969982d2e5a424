package meshsync

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// BenchmarkTablesHeapPerEntry: the heap one remote ipcache entry costs in
// the agent's tables (the ownership Gate's decoded record, the index by
// prefix; no raw value), at 100,000 entries of one remote node. Each
// iteration builds the tables from scratch.
func BenchmarkTablesHeapPerEntry(b *testing.B) {
	for range b.N {
		b.ReportMetric(float64(tablesHeapPerEntry(b, 100_000)), "B/entry")
	}
}

func tablesHeapPerEntry(b *testing.B, N int) uint64 {
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	tables := tablesFill(N)
	runtime.GC()
	runtime.ReadMemStats(&m1)
	runtime.KeepAlive(tables)
	return (m1.HeapAlloc - m0.HeapAlloc) / uint64(N)
}

// tablesFill returns tables holding N ipcache entries of one remote node.
func tablesFill(N int) *Tables {
	tables := NewTables(Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)
	tables.SetMaxIPCachePerRemote(-1)
	cfg := must(records.ClusterConfig{Name: "c2", ID: 2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("fd00:2::/48")}}.Marshal())
	root := records.CacheRoot
	tables.Handle(records.ClusterConfigPrefix, kvstore.Event{Type: kvstore.EventUpsert, Key: records.ClusterConfigKey("c2"), Value: cfg})
	n := must(records.Node{Name: "n1", Cluster: "c2", ClusterID: 2, IPs: []netip.Addr{netip.MustParseAddr("198.51.100.1")}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("fd00:2:0:ff00::/64")}}.Marshal())
	nk, _ := records.CacheKey(records.NodeKey("c2", "n1"), "c2")
	tables.Handle(root, kvstore.Event{Type: kvstore.EventUpsert, Key: nk, Value: n})
	for i := range N {
		a := netip.AddrFrom16([16]byte{0xfd, 0, 0, 2, 0, 0, 0xff, 0, 0, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
		p := netip.PrefixFrom(a, 128)
		v := must(records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 5, HostIP: netip.MustParseAddr("198.51.100.1"), OwnerName: fmt.Sprintf("bench-%d", i), OwnerNamespace: "default", Cluster: "c2"}.Marshal())
		k, _ := records.CacheKey(records.IPCacheKey("c2", "n1", p), "c2")
		tables.Handle(root, kvstore.Event{Type: kvstore.EventUpsert, Key: k, Value: v})
	}
	return tables
}
