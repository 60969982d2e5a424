package datapath

import (
	"net/netip"
	"runtime"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// sinkDatapath takes ipcache writes without keeping them, as the kernel
// keeps them outside the agent's heap.
type sinkDatapath struct{ *agenttest.FakeDatapath }

func (sinkDatapath) IPCacheUpsert(netip.Prefix, bpf.IPCacheEntry) error { return nil }
func (sinkDatapath) IPCacheUpsertBatch(ps []netip.Prefix, _ []bpf.IPCacheEntry) (int, error) {
	return len(ps), nil
}

// BenchmarkReconcilerHeapPerEntry: the heap one remote ipcache entry costs
// in the datapath reconciler (its shadow of the BPF ipcache), at 60,000
// entries, after a full pass and an incremental one.
func BenchmarkReconcilerHeapPerEntry(b *testing.B) {
	const n = 60_000 // c2 owns a /16
	for range b.N {
		m := newMeshModel(&testing.T{})
		for i := range n {
			m.ip("c2", "n1", remoteIP, netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), 2<<20|1)
		}
		// c2's node owns 10.2.1.0/24 only: give it the whole range.
		m.node("c2", "n1", remoteIP, "10.2.0.0/16")
		s := desired.State{Cluster: "c1", Identities: ids{}, HostAddrs: []netip.Addr{selfIP}, EndpointsGen: 1, ObjectsGen: 1,
			Mesh: desired.Mesh{Ready: true, Cluster: "c1", Node: "node1", NodeIPs: []netip.Addr{selfIP}, View: m.tables.View(), IPs: m.tables}}
		m.tables.TakeIPChanges() // the first pass is a full one anyway
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		r := NewReconciler(sinkDatapath{agenttest.NewFakeDatapath()})
		if _, err := r.Sync(s); err != nil {
			b.Fatal(err)
		}
		if _, err := r.Sync(s); err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&m1)
		if r.IPCacheEntries() < n {
			b.Fatalf("%d entries written, want %d", r.IPCacheEntries(), n)
		}
		runtime.KeepAlive(r)
		runtime.KeepAlive(m.tables) // the mesh's own heap is in both figures
		b.ReportMetric((float64(m1.HeapAlloc)-float64(m0.HeapAlloc))/n, "B/entry")
	}
}
