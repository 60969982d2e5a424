package datapath

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// fullSource reads the mesh like a reconciler that just started: every
// run is a full pass, the changes are left to the incremental one.
type fullSource struct{ *meshsync.Tables }

func (fullSource) TakeIPChanges() ([]netip.Prefix, bool) { return nil, true }

// meshModel feeds a node's mesh tables with the events etcd would deliver:
// node1 of cluster c1 (this node), its neighbour node2, and node n1 of the
// remote cluster c2.
type meshModel struct {
	t      *testing.T
	tables *meshsync.Tables
}

var (
	selfIP   = netip.MustParseAddr("192.0.2.1")
	node2IP  = netip.MustParseAddr("192.0.2.2")
	remoteIP = netip.MustParseAddr("198.51.100.1")
)

func newMeshModel(t *testing.T) *meshModel {
	m := &meshModel{t: t, tables: meshsync.NewTables(meshsync.Local{Cluster: "c1", ClusterID: 1, Node: "node1"}, nil, nil)}
	m.tables.SetMaxIPCachePerRemote(-1)
	m.put(records.ClusterConfigPrefix, records.ClusterConfigKey("c1"), records.ClusterConfig{Name: "c1", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}})
	m.put(records.ClusterConfigPrefix, records.ClusterConfigKey("c2"), records.ClusterConfig{Name: "c2", ID: 2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16")}})
	m.node("c1", "node1", selfIP, "10.1.1.0/24")
	m.node("c1", "node2", node2IP, "10.1.2.0/24")
	m.node("c2", "n1", remoteIP, "10.2.1.0/24")
	for _, k := range records.Kinds {
		m.canary(k, true)
	}
	for _, p := range meshsync.WatchedPrefixes("c1") {
		m.tables.Handle(p, kvstore.Event{Type: kvstore.EventListDone})
	}
	return m
}

type marshaler interface{ Marshal() ([]byte, error) }

func (m *meshModel) put(prefix, key string, r marshaler) {
	m.t.Helper()
	v, err := r.Marshal()
	if err != nil {
		m.t.Fatal(err)
	}
	m.tables.Handle(prefix, kvstore.Event{Type: kvstore.EventUpsert, Key: key, Value: v})
}

// stateKey returns the prefix and key a cluster's state key is read at.
func (m *meshModel) stateKey(cluster, key string) (string, string) {
	if cluster == "c1" {
		return records.StateClusterPrefix(records.KindIP, "c1"), key
	}
	ck, err := records.CacheKey(key, cluster)
	if err != nil {
		m.t.Fatal(err)
	}
	return records.CacheRoot, ck
}

func (m *meshModel) node(cluster, name string, ip netip.Addr, cidr string) {
	id := uint32(1)
	if cluster == "c2" {
		id = 2
	}
	prefix, key := m.stateKey(cluster, records.NodeKey(cluster, name))
	if cluster == "c1" {
		prefix = records.StateClusterPrefix(records.KindNodes, "c1")
	}
	m.put(prefix, key, records.Node{Name: name, Cluster: cluster, ClusterID: id, IPs: []netip.Addr{ip}, PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}})
}

func (m *meshModel) canary(k records.Kind, on bool) {
	key := records.SyncedKey("c2", k)
	if !on {
		m.tables.Handle(records.SyncedPrefix, kvstore.Event{Type: kvstore.EventDelete, Key: key})
		return
	}
	m.put(records.SyncedPrefix, key, records.Stamp{Cluster: "c2", Time: time.Now()})
}

// ip puts (id > 0) or deletes the entry of addr published by node.
func (m *meshModel) ip(cluster, node string, host netip.Addr, addr netip.Addr, id uint32) {
	p := netip.PrefixFrom(addr, 32)
	prefix, key := m.stateKey(cluster, records.IPCacheKey(cluster, node, p))
	if id == 0 {
		m.tables.Handle(prefix, kvstore.Event{Type: kvstore.EventDelete, Key: key})
		return
	}
	m.put(prefix, key, records.IPCacheEntry{Prefix: p, Identity: id, HostIP: host, Cluster: cluster, OwnerName: "pod", OwnerNamespace: "default"})
}

// The incremental ipcache equals a full rebuild after any sequence of
// changes: mesh entries of this node, of its neighbour and of a remote
// cluster coming, changing and going, the remote cluster's entries going
// out of use and back (its canary), local endpoints on addresses the mesh
// also has, and the node's own addresses changing.
func TestIncrementalIPCacheMatchesRebuild(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { checkIncremental(t, seed, 300) })
	}
}

func checkIncremental(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 1))
	m := newMeshModel(t)
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	var eps []state.Endpoint
	host := []netip.Addr{selfIP}
	addr := func(third byte) netip.Addr {
		return netip.AddrFrom4([4]byte{10, third, byte(rng.IntN(3) + 1), byte(rng.IntN(8) + 1)})
	}
	for step := range steps {
		switch rng.IntN(10) {
		case 0, 1, 2:
			m.ip("c2", "n1", remoteIP, addr(2), uint32(rng.IntN(3))*(2<<20|uint32(rng.IntN(3)+1)))
		case 3, 4:
			m.ip("c1", "node2", node2IP, netip.AddrFrom4([4]byte{10, 1, 2, byte(rng.IntN(8) + 1)}), uint32(rng.IntN(3))*(1<<20|uint32(rng.IntN(3)+1)))
		case 5:
			// This node's own records: the local store decides those.
			m.ip("c1", "node1", selfIP, netip.AddrFrom4([4]byte{10, 1, 1, byte(rng.IntN(8) + 1)}), uint32(rng.IntN(2))*(1<<20|7))
		case 6:
			m.canary(records.KindIP, rng.IntN(2) == 0)
		case 7:
			a := netip.AddrFrom4([4]byte{10, 1, 1, byte(rng.IntN(8) + 1)})
			if len(eps) > 0 && rng.IntN(2) == 0 {
				i := rng.IntN(len(eps))
				eps = append(eps[:i], eps[i+1:]...)
			} else {
				eps = append(eps, state.Endpoint{Name: fmt.Sprint("ep", step), Namespace: "default", ID: uint32(step + 1),
					Identity: 1<<20 | uint32(rng.IntN(3)+1), IPs: []netip.Addr{a}, HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01"})
			}
		case 8:
			host = []netip.Addr{selfIP}
			if rng.IntN(2) == 0 {
				host = append(host, netip.AddrFrom4([4]byte{10, 2, 1, byte(rng.IntN(8) + 1)}))
			}
		case 9:
			continue // several changes in one run
		}
		s := desired.State{Cluster: "c1", Endpoints: eps, Identities: ids{}, HostAddrs: host,
			EndpointsGen: uint64(step + 1), ObjectsGen: 1,
			Mesh: desired.Mesh{Ready: m.tables.Ready(), Cluster: "c1", Node: "node1", NodeIPs: []netip.Addr{selfIP},
				PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}, View: m.tables.View(), IPs: m.tables}}
		if res, err := r.Sync(s); err != nil || len(res.Errs) > 0 {
			t.Fatalf("step %d: %v %v", step, err, res.Errs)
		}
		ref := agenttest.NewFakeDatapath()
		full := s
		full.Mesh.IPs = fullSource{m.tables}
		if _, err := NewReconciler(ref).Sync(full); err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(dp.IPCache, ref.IPCache) {
			t.Fatalf("step %d: incremental ipcache differs from a rebuild:\n got %v\nwant %v", step, dp.IPCache, ref.IPCache)
		}
		if r.IPCacheEntries() != len(ref.IPCache) {
			t.Fatalf("step %d: %d entries counted, %d in the map", step, r.IPCacheEntries(), len(ref.IPCache))
		}
	}
	// Sanity: the sequence reached the interesting cases.
	if len(dp.IPCache) < 5 {
		t.Errorf("only %d entries at the end", len(dp.IPCache))
	}
}

// Unchanged inputs cost no map access at all: a second run with nothing
// changed neither lists nor writes.
func TestIncrementalRunTouchesNothing(t *testing.T) {
	m := newMeshModel(t)
	m.ip("c2", "n1", remoteIP, netip.MustParseAddr("10.2.1.5"), 2<<20|1)
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	s := desired.State{Cluster: "c1", Identities: ids{{ID: 2<<20 | 1, Labels: identity.Labels{"app": "x"}}}, HostAddrs: []netip.Addr{selfIP},
		EndpointsGen: 1, ObjectsGen: 1,
		Mesh: desired.Mesh{Ready: true, Cluster: "c1", Node: "node1", NodeIPs: []netip.Addr{selfIP}, View: m.tables.View(), IPs: m.tables}}
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	dp.TakeWrites()
	lists := dp.Lists()
	s.Mesh.View = m.tables.View()
	if res, err := r.Sync(s); err != nil || res.Changes() != 0 {
		t.Fatalf("second run: %+v %v", res, err)
	}
	if w := dp.TakeWrites(); len(w) != 0 || dp.Lists() != lists {
		t.Errorf("second run wrote %v, listed %d maps", w, dp.Lists()-lists)
	}
	// One change: one write.
	m.ip("c2", "n1", remoteIP, netip.MustParseAddr("10.2.1.6"), 2<<20|1)
	s.Mesh.View = m.tables.View()
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if w := dp.TakeWrites(); len(w) != 1 || w[0] != "ipcache+ 10.2.1.6/32" || dp.Lists() != lists {
		t.Errorf("one change wrote %v, listed %d maps", w, dp.Lists()-lists)
	}
	if e := dp.IPCache[netip.MustParsePrefix("10.2.1.6/32")]; e.Identity != 2<<20|1 || e.HostIP != remoteIP {
		t.Errorf("entry %+v", e)
	}
	_ = bpf.IdentityWorld
}

// A full ipcache leaves out mesh entries, never the node's own: the mesh
// may fill the map only up to its capacity less the reserve, the count of
// what is left out is reported, and they come in at the next full pass
// once there is room.
func TestIPCacheOverflowKeepsLocalEntries(t *testing.T) {
	m := newMeshModel(t)
	for i := range 20 {
		m.ip("c2", "n1", remoteIP, netip.AddrFrom4([4]byte{10, 2, 1, byte(i + 1)}), 2<<20|1)
	}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	r.ipcMeshLimit = 12
	ep := func(i int) state.Endpoint {
		return state.Endpoint{Name: fmt.Sprint("ep", i), Namespace: "default", ID: uint32(i + 1), Identity: 1<<20 | 1,
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, 1, byte(i + 1)})}, HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01"}
	}
	s := desired.State{Cluster: "c1", Identities: ids{}, HostAddrs: []netip.Addr{selfIP}, EndpointsGen: 1, ObjectsGen: 1,
		Endpoints: []state.Endpoint{ep(0), ep(1)},
		Mesh:      desired.Mesh{Ready: true, Cluster: "c1", Node: "node1", NodeIPs: []netip.Addr{selfIP}, View: m.tables.View(), IPs: m.tables}}
	sync := func() Result {
		t.Helper()
		s.Mesh.View = m.tables.View()
		res, err := r.Sync(s)
		if err != nil || len(res.Errs) > 0 {
			t.Fatal(err, res.Errs)
		}
		return res
	}
	local := func() int {
		n := 0
		for p := range dp.IPCache {
			if !netip.MustParsePrefix("10.2.0.0/16").Contains(p.Addr()) {
				n++
			}
		}
		return n
	}
	res := sync()
	// world x2, node2 (remote-node), host, 2 pods: 6 of the node's own.
	if local() != 6 || len(dp.IPCache) != 12 || r.IPCacheOverflow() != 14 || res.Overflow != 14 {
		t.Fatalf("%d entries (%d own), overflow %d (reported %d): want 12 (6), 14", len(dp.IPCache), local(), r.IPCacheOverflow(), res.Overflow)
	}
	// A new pod still fits: the node's own entries are not capped.
	s.Endpoints, s.EndpointsGen = append(s.Endpoints, ep(2)), 2
	sync()
	if _, ok := dp.IPCache[netip.MustParsePrefix("10.1.1.3/32")]; !ok || local() != 7 {
		t.Fatalf("a new pod left out of a full map (%d own entries)", local())
	}
	// Room again: at the next full pass, the left-out entries come in.
	for i := range 15 {
		m.ip("c2", "n1", remoteIP, netip.AddrFrom4([4]byte{10, 2, 1, byte(i + 1)}), 0)
	}
	sync()
	r.listedAt = time.Time{} // the resync is due
	sync()
	if len(dp.IPCache) != 7+5 || r.IPCacheOverflow() != 0 {
		t.Errorf("after the resync: %d entries, overflow %d; want 12, 0", len(dp.IPCache), r.IPCacheOverflow())
	}
}

// The compact shadow keeps every prefix and entry as it was given: IPv4
// and IPv6 (and an IPv4-mapped IPv6 prefix apart from its IPv4 twin),
// with and without a host.
func TestShadowRoundTrip(t *testing.T) {
	s := ipShadow{}
	cases := map[netip.Prefix]bpf.IPCacheEntry{
		netip.MustParsePrefix("0.0.0.0/0"):           {Identity: bpf.IdentityWorld},
		netip.MustParsePrefix("::/0"):                {Identity: bpf.IdentityWorld},
		netip.MustParsePrefix("10.1.2.3/32"):         {Identity: 1<<20 | 1, HostIP: netip.MustParseAddr("192.0.2.1")},
		netip.MustParsePrefix("::ffff:10.1.2.3/128"): {Identity: 1<<20 | 2, HostIP: netip.MustParseAddr("fd00::1")},
		netip.MustParsePrefix("fd00:1::/64"):         {Identity: 7},
	}
	for p, e := range cases {
		s[keyOf(p)] = valOf(e)
	}
	if len(s) != len(cases) {
		t.Fatalf("%d keys for %d prefixes", len(s), len(cases))
	}
	for k, v := range s {
		if want, ok := cases[k.prefix()]; !ok || v.entry() != want {
			t.Errorf("%s: %+v, want %+v (%v)", k.prefix(), v.entry(), want, ok)
		}
	}
}

// The drift check lists the BPF ipcache in the background and, in the
// next run, writes again what differs from what the reconciler wrote: an
// entry removed by hand, one changed, one added.
func TestIPCacheDriftRepaired(t *testing.T) {
	m := newMeshModel(t)
	for i := range 5 {
		m.ip("c2", "n1", remoteIP, netip.AddrFrom4([4]byte{10, 2, 1, byte(i + 1)}), 2<<20|1)
	}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	listed := make(chan struct{}, 1)
	r.OnBackgroundWork(func() { listed <- struct{}{} })
	s := desired.State{Cluster: "c1", Identities: ids{}, HostAddrs: []netip.Addr{selfIP}, EndpointsGen: 1, ObjectsGen: 1,
		Mesh: desired.Mesh{Ready: true, Cluster: "c1", Node: "node1", NodeIPs: []netip.Addr{selfIP}, View: m.tables.View(), IPs: m.tables}}
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	want := maps.Clone(dp.IPCache)
	gone, changed, extra := netip.MustParsePrefix("10.2.1.1/32"), netip.MustParsePrefix("10.2.1.2/32"), netip.MustParsePrefix("10.9.9.9/32")
	delete(dp.IPCache, gone)
	dp.IPCache[changed] = bpf.IPCacheEntry{Identity: bpf.IdentityWorld}
	dp.IPCache[extra] = bpf.IPCacheEntry{Identity: 1<<20 | 9}
	r.listedAt = time.Time{} // the resync is due
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	select {
	case <-listed:
	case <-time.After(10 * time.Second):
		t.Fatal("no background listing")
	}
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(dp.IPCache, want) || r.IPCacheDrift() != 3 {
		t.Errorf("after the drift check: %v (drift %d), want %v (3)", dp.IPCache, r.IPCacheDrift(), want)
	}
}

// Entries written while the drift check's listing runs are not in the
// listing: they are not drift, and not written again (a full sync during
// a listing would write every entry twice).
func TestIPCacheDriftSkipsWritesDuringListing(t *testing.T) {
	m := newMeshModel(t)
	for i := range 5 {
		m.ip("c2", "n1", remoteIP, netip.AddrFrom4([4]byte{10, 2, 1, byte(i + 1)}), 2<<20|1)
	}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	listed := make(chan struct{}, 1)
	r.OnBackgroundWork(func() { listed <- struct{}{} })
	s := desired.State{Cluster: "c1", Identities: ids{}, HostAddrs: []netip.Addr{selfIP}, EndpointsGen: 1, ObjectsGen: 1,
		Mesh: desired.Mesh{Ready: true, Cluster: "c1", Node: "node1", NodeIPs: []netip.Addr{selfIP}, View: m.tables.View(), IPs: m.tables}}
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	// The next run starts a listing, which takes its copy and then holds.
	copied, release := make(chan struct{}), make(chan struct{})
	dp.AfterIPCacheList = func() { close(copied); <-release }
	r.listedAt = time.Time{}
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	<-copied
	dp.TakeWrites()
	// Meanwhile 100 entries come and are written.
	for i := range 100 {
		m.ip("c2", "n1", remoteIP, netip.AddrFrom4([4]byte{10, 2, 1, byte(i + 10)}), 2<<20|2)
	}
	s.Mesh.View = m.tables.View()
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	want := maps.Clone(dp.IPCache)
	if w := dp.TakeWrites(); len(w) != 100 {
		t.Fatalf("%d writes during the listing, want the 100 new entries", len(w))
	}
	close(release)
	select {
	case <-listed:
	case <-time.After(10 * time.Second):
		t.Fatal("no background listing")
	}
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if w := dp.TakeWrites(); len(w) != 0 || r.IPCacheDrift() != 0 {
		t.Errorf("the drift check wrote %d entries (drift %d), want none", len(w), r.IPCacheDrift())
	}
	if !maps.Equal(dp.IPCache, want) {
		t.Errorf("ipcache changed by the drift check: %v, want %v", dp.IPCache, want)
	}
}
