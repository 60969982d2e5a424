package records

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// gateCfg is cluster c2 (ID 2) with 10.2.0.0/16 and fd00:2::/48.
var gateCfg = ClusterConfig{Version: CurrentVersion, Name: "c2", ID: 2,
	PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("fd00:2::/48")}}

func gNode(name, ip string, cidrs ...string) Node {
	n := Node{Version: CurrentVersion, Name: name, Cluster: "c2", ClusterID: 2, IPs: []netip.Addr{netip.MustParseAddr(ip)}}
	for _, c := range cidrs {
		n.PodCIDRs = append(n.PodCIDRs, netip.MustParsePrefix(c))
	}
	return n
}

func gIP(prefix string, id uint32) IPCacheEntry {
	return IPCacheEntry{Version: CurrentVersion, Prefix: netip.MustParsePrefix(prefix), Identity: id, Cluster: "c2"}
}

func gSvc(name string, backends ...string) ServiceRecord {
	s := ServiceRecord{Version: CurrentVersion, Name: name, Namespace: "default", Cluster: "c2", ClusterID: 2,
		Frontends: []Frontend{{IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: ProtocolTCP}}}
	for _, b := range backends {
		s.Backends = append(s.Backends, Backend{IP: netip.MustParseAddr(b), Port: 80, Protocol: ProtocolTCP, Cluster: "c2"})
	}
	return s
}

func putNode(g *Gate, n Node) string {
	k := NodeKey(n.Cluster, n.Name)
	g.PutNode(k, n, nil)
	return k
}

// putIP puts e under node "any", which has no record: judged by the
// cluster's ranges alone (putIPOf puts it under a node's prefix).
func putIP(g *Gate, e IPCacheEntry) string { return putIPOf(g, "any", e) }

func putIPOf(g *Gate, node string, e IPCacheEntry) string {
	k := IPCacheKey(e.Cluster, node, e.Prefix)
	g.PutIP(k, e, nil)
	return k
}

func putSvc(g *Gate, s ServiceRecord) string {
	k := ServiceKey(s.Cluster, s.Namespace, s.Name)
	g.PutService(k, s, nil)
	return k
}

func reasonOf(t *testing.T, g *Gate, key string) string {
	t.Helper()
	v, ok := g.Get(key)
	if !ok {
		t.Fatalf("%s: not in the gate", key)
	}
	switch {
	case v.Err == nil:
		return "accepted"
	case errors.Is(v.Err, ErrPending):
		return "pending"
	}
	return RefusalReason(v.Err)
}

func TestGateForgeries(t *testing.T) {
	g := NewGate("c2", Limits{MaxIPCache: 100})
	const id = 2<<20 | 5
	cases := []struct {
		what, key, want string
	}{
		{"a pod of the cluster", putIP(g, gIP("10.2.1.5/32", id)), "accepted"},
		{"an IPv6 pod", putIP(g, gIP("fd00:2::5/128", id)), "accepted"},
		{"reserved identity host", putIP(g, gIP("10.2.1.6/32", 1)), ReasonReservedIdentity},
		{"reserved identity remote-node", putIP(g, gIP("10.2.1.7/32", 6)), ReasonReservedIdentity},
		{"identity of cluster 1", putIP(g, gIP("10.2.1.8/32", 1<<20|5)), ReasonIdentityNotOwned},
		{"0.0.0.0/0", putIP(g, gIP("0.0.0.0/0", id)), ReasonPrefixNotOwned},
		{"::/0", putIP(g, gIP("::/0", id)), ReasonPrefixNotOwned},
		{"shorter than the pod CIDR", putIP(g, gIP("10.2.0.0/15", id)), ReasonPrefixNotOwned},
		{"the pod CIDR itself", putIP(g, gIP("10.2.0.0/16", id)), "accepted"},
		{"another cluster's pod", putIP(g, gIP("10.1.1.0/24", id)), ReasonPrefixNotOwned},
		{"a node whose CIDR another node claims (both are out)", putNode(g, gNode("n1", "192.0.2.1", "10.2.1.0/24", "fd00:2:0:1::/64")), ReasonNodeCIDROverlap},
		{"a node outside the cluster", putNode(g, gNode("n2", "192.0.2.2", "10.1.1.0/24")), ReasonNodeCIDRNotOwned},
		{"a node claiming 0.0.0.0/0", putNode(g, gNode("n3", "192.0.2.3", "0.0.0.0/0")), ReasonNodeCIDRNotOwned},
		{"another node's CIDR", putNode(g, gNode("n4", "192.0.2.4", "10.2.1.128/25")), ReasonNodeCIDROverlap},
		{"a node without pod CIDRs", putNode(g, gNode("n5", "192.0.2.5")), "accepted"},
		{"a service of pods", putSvc(g, gSvc("web", "10.2.1.5", "fd00:2::5")), "accepted"},
		{"a service with a node backend", putSvc(g, gSvc("host", "192.0.2.5")), "accepted"},
		{"a service with a backend elsewhere", putSvc(g, gSvc("evil", "10.2.1.5", "10.1.1.5")), ReasonBackendNotOwned},
		{"a service with a refused node's address", putSvc(g, gSvc("evil2", "192.0.2.2")), ReasonBackendNotOwned},
	}
	for _, c := range cases {
		if got := reasonOf(t, g, c.key); got != "pending" {
			t.Errorf("%s: %s before the cluster config", c.what, got)
		}
	}
	g.SetConfig(&gateCfg)
	for _, c := range cases {
		if got := reasonOf(t, g, c.key); got != c.want {
			t.Errorf("%s (%s): %s, want %s", c.what, c.key, got, c.want)
		}
	}
	want := map[string]int{ReasonReservedIdentity: 2, ReasonIdentityNotOwned: 1, ReasonPrefixNotOwned: 4,
		ReasonNodeCIDRNotOwned: 2, ReasonNodeCIDROverlap: 2, ReasonBackendNotOwned: 2}
	if got := g.Refused(); !maps.Equal(got, want) {
		t.Errorf("refused %v, want %v", got, want)
	}
	// Drain reports each once.
	n := 0
	for _, k := range []Kind{KindNodes, KindIP, KindServices} {
		n += len(g.Drain(k))
	}
	if n != len(cases) {
		t.Errorf("drained %d verdicts, want %d", n, len(cases))
	}
	putIP(g, gIP("0.0.0.0/0", id)) // a re-list
	if d := g.Drain(KindIP); len(d) != 0 {
		t.Errorf("unchanged refusal reported again: %v", d)
	}
}

func TestGateOrdering(t *testing.T) {
	g := NewGate("c2", Limits{})
	g.SetConfig(&gateCfg)
	const id = 2<<20 | 5
	// A node address announced as an endpoint before its node record.
	ipKey := putIP(g, gIP("192.0.2.9/32", id))
	svcKey := putSvc(g, gSvc("host", "192.0.2.9"))
	if reasonOf(t, g, ipKey) != ReasonPrefixNotOwned || reasonOf(t, g, svcKey) != ReasonBackendNotOwned {
		t.Fatal("node address accepted before its node")
	}
	g.Drain(KindIP)
	g.Drain(KindServices)
	nk := putNode(g, gNode("n9", "192.0.2.9", "10.2.9.0/24"))
	if reasonOf(t, g, ipKey) != "accepted" || reasonOf(t, g, svcKey) != "accepted" {
		t.Fatal("node address not accepted after its node")
	}
	if d := g.Drain(KindIP); len(d) != 1 || !d[0].Accepted() {
		t.Errorf("drain %v", d)
	}
	// Another node claims part of its CIDR: both are out, and what depended on it goes.
	putNode(g, gNode("n0", "192.0.2.10", "10.2.9.0/25"))
	if reasonOf(t, g, nk) != ReasonNodeCIDROverlap || reasonOf(t, g, ipKey) != ReasonPrefixNotOwned || reasonOf(t, g, svcKey) != ReasonBackendNotOwned {
		t.Fatal("refused node still owns its address")
	}
	g.Delete(NodeKey("c2", "n0"))
	if reasonOf(t, g, nk) != "accepted" || reasonOf(t, g, ipKey) != "accepted" {
		t.Fatal("node not accepted again after the conflicting node went")
	}
	// A config change re-decides everything.
	other := gateCfg
	other.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.3.0.0/16")}
	g.SetConfig(&other)
	if reasonOf(t, g, nk) != ReasonNodeCIDRNotOwned || reasonOf(t, g, ipKey) != ReasonPrefixNotOwned {
		t.Fatal("config change not applied")
	}
	g.SetConfig(nil)
	if reasonOf(t, g, nk) != "pending" || len(g.Refused()) != 0 {
		t.Fatalf("without config: %s, refused %v", reasonOf(t, g, nk), g.Refused())
	}
}

func TestGateCap(t *testing.T) {
	g := NewGate("c2", Limits{MaxIPCache: 3})
	g.SetConfig(&gateCfg)
	const id = 2<<20 | 5
	var keys []string
	for _, i := range []int{5, 1, 4, 2, 3} { // arrival order does not matter
		keys = append(keys, putIP(g, gIP(fmt.Sprintf("10.2.0.%d/32", i), id)))
	}
	slices.Sort(keys)
	for i, k := range keys {
		want := "accepted"
		if i >= 3 {
			want = ReasonOverCap
		}
		if got := reasonOf(t, g, k); got != want {
			t.Errorf("%s: %s, want %s", k, got, want)
		}
	}
	if g.Refused()[ReasonOverCap] != 2 {
		t.Errorf("refused %v", g.Refused())
	}
	g.Delete(keys[0])
	if reasonOf(t, g, keys[3]) != "accepted" || reasonOf(t, g, keys[4]) != ReasonOverCap {
		t.Error("the next entry did not come in when one went")
	}
	// An entry refused for another reason does not count.
	putIP(g, gIP("10.2.0.0/31", 1))
	if reasonOf(t, g, IPCacheKey("c2", "any", netip.MustParsePrefix("10.2.0.0/31"))) != ReasonReservedIdentity || reasonOf(t, g, keys[3]) != "accepted" {
		t.Error("a refused entry took a place under the cap")
	}
}

// consumer keeps what a caller of the Gate keeps: the accepted records,
// from the verdict of the key it put and from Drain.
type consumer map[string]bool

func (c consumer) sync(g *Gate, key string) {
	if v, ok := g.Get(key); ok && v.Accepted() {
		c[key] = true
	} else {
		delete(c, key)
	}
	for _, k := range []Kind{KindNodes, KindIP, KindServices} {
		for _, v := range g.Drain(k) {
			if v.Accepted() {
				c[v.Key] = true
			} else {
				delete(c, v.Key)
			}
		}
	}
}

// checkGate compares g with a Gate built from scratch from the same
// records, and c with g's accepted records.
func checkGate(t *testing.T, g *Gate, c consumer, limits Limits) {
	t.Helper()
	// The per-node lists of ipcache entries: each entry knows its slot,
	// and is the entry at its key.
	n := 0
	for node, l := range g.ipByNode {
		for i, e := range l.es {
			if int(e.slot) != i || e.gone || g.entries[e.key] != e || e.ipNode() != node {
				t.Fatalf("ipByNode[%s][%d] = %s (slot %d, gone %v): out of place", node, i, e.key, e.slot, e.gone)
			}
		}
		n += len(l.es)
	}
	if n != g.ipCount {
		t.Fatalf("ipByNode holds %d entries, ipCount %d", n, g.ipCount)
	}
	fresh := NewGate(g.cluster, limits)
	if o, ok := g.Owner(); ok {
		cfg := ClusterConfig{Name: o.Cluster, ID: o.ID, PodCIDRs: o.PodCIDRs}
		fresh.SetConfig(&cfg)
	}
	for _, k := range []Kind{KindNodes, KindIP, KindServices} {
		for _, key := range g.Keys(k) {
			v, _ := g.Get(key)
			switch k {
			case KindNodes:
				fresh.PutNode(key, *v.Node, nil)
			case KindIP:
				fresh.PutIP(key, *v.IP, nil)
			default:
				fresh.PutService(key, *v.Service, nil)
			}
		}
	}
	accepted := map[string]bool{}
	for _, k := range []Kind{KindNodes, KindIP, KindServices} {
		for _, key := range g.Keys(k) {
			if got, want := reasonOf(t, g, key), reasonOf(t, fresh, key); got != want {
				t.Fatalf("%s: incremental %s, from scratch %s", key, got, want)
			}
			if v, _ := g.Get(key); v.Accepted() {
				accepted[key] = true
			}
		}
	}
	if !maps.Equal(g.Refused(), fresh.Refused()) {
		t.Fatalf("refused %v, from scratch %v", g.Refused(), fresh.Refused())
	}
	if !maps.Equal(map[string]bool(c), accepted) {
		t.Fatalf("consumer has %v, accepted %v", slices.Sorted(maps.Keys(c)), slices.Sorted(maps.Keys(accepted)))
	}
}

// gateOps applies random operations from a small universe, so that
// overlaps, node addresses, reserved identities and the cap all occur.
func gateOps(t *testing.T, seed uint64, n int) {
	r := rand.New(rand.NewPCG(seed, seed>>32))
	limits := Limits{MaxIPCache: 1 + r.IntN(6)}
	g := NewGate("c2", limits)
	c := consumer{}
	cidrs := []string{"10.2.0.0/16", "10.2.1.0/24", "10.2.1.0/25", "10.2.1.128/25", "10.2.2.0/24", "10.1.0.0/24", "0.0.0.0/0", "fd00:2::/64"}
	addrs := []string{"192.0.2.1", "192.0.2.2", "10.2.1.1", "10.1.0.1"}
	cfgs := []*ClusterConfig{nil, &gateCfg, {Version: 1, Name: "c2", ID: 2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24")}}}
	for range n {
		var key string
		switch op := r.IntN(10); {
		case op == 0:
			g.SetConfig(cfgs[r.IntN(len(cfgs))])
		case op <= 3:
			nd := gNode(fmt.Sprintf("n%d", r.IntN(5)), addrs[r.IntN(len(addrs))])
			for range r.IntN(3) {
				p := netip.MustParsePrefix(cidrs[r.IntN(len(cidrs))])
				if !slices.ContainsFunc(nd.PodCIDRs, p.Overlaps) {
					nd.PodCIDRs = append(nd.PodCIDRs, p)
				}
			}
			key = putNode(g, nd)
		case op <= 6:
			var p string
			if r.IntN(2) == 0 {
				p = addrs[r.IntN(len(addrs))] + "/32"
			} else {
				p = fmt.Sprintf("10.2.%d.%d/32", r.IntN(3), r.IntN(4))
			}
			ids := []uint32{2<<20 | 1, 1, 1<<20 | 1}
			e := gIP(p, ids[r.IntN(len(ids))])
			if r.IntN(2) == 0 {
				e.HostIP = netip.MustParseAddr(addrs[r.IntN(len(addrs))])
			}
			// Under a node that may have a record (n0..n4) or never has.
			key = putIPOf(g, fmt.Sprintf("n%d", r.IntN(6)), e)
		case op == 7:
			key = putSvc(g, gSvc(fmt.Sprintf("s%d", r.IntN(3)), addrs[r.IntN(len(addrs))]))
		default:
			var all []string
			for _, k := range []Kind{KindNodes, KindIP, KindServices} {
				all = append(all, g.Keys(k)...)
			}
			if len(all) > 0 {
				key = all[r.IntN(len(all))]
				g.Delete(key)
			}
		}
		c.sync(g, key)
		checkGate(t, g, c, limits)
	}
}

// TestGateDrainAfterReplace: a record replaced before its change was
// drained still reports that change (once).
func TestGateDrainAfterReplace(t *testing.T) {
	g := NewGate("c2", Limits{})
	g.SetConfig(&gateCfg)
	g.Drain(KindIP)
	key := putIP(g, gIP("10.2.1.1/32", 2<<20|1)) // pending -> accepted, not drained
	putIP(g, gIP("10.2.1.1/32", 2<<20|2))        // replaced, still accepted
	vs := g.Drain(KindIP)
	if len(vs) != 1 || vs[0].Key != key || !vs[0].Accepted() || vs[0].IP.Identity != 2<<20|2 {
		t.Fatalf("drained %+v, want the accepted replacement once", vs)
	}
	if vs := g.Drain(KindIP); len(vs) != 0 {
		t.Fatalf("drained again: %+v", vs)
	}
}

func TestGateIncrementalMatchesFromScratch(t *testing.T) {
	for seed := range uint64(200) {
		gateOps(t, seed, 60)
	}
}

// FuzzGate: whatever the order of operations, the incremental verdicts
// equal the ones computed from scratch, and a caller following Get and
// Drain holds exactly the accepted records.
func FuzzGate(f *testing.F) {
	f.Add(uint64(1), uint8(50))
	f.Fuzz(func(t *testing.T, seed uint64, n uint8) { gateOps(t, seed, int(n)) })
}

// FuzzOwnsPrefix: an owned prefix lies inside a pod CIDR, never shorter.
func FuzzOwnsPrefix(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0}, uint8(0))
	f.Add([]byte{10, 2, 1, 0}, uint8(24))
	o := NewOwner(gateCfg)
	f.Fuzz(func(t *testing.T, b []byte, bits uint8) {
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			return
		}
		p, err := a.Prefix(int(bits))
		if err != nil {
			return
		}
		if o.OwnsPrefix(p) && !slices.ContainsFunc(gateCfg.PodCIDRs, func(q netip.Prefix) bool {
			return q.Bits() <= p.Bits() && q.Contains(p.Addr()) && q.Contains(netip.PrefixFrom(p.Addr(), p.Bits()).Masked().Addr())
		}) {
			t.Fatalf("%s owned", p)
		}
	})
}

// An ipcache entry sits under the prefix of the node that published it:
// once that node's record is accepted, the entry must be inside that
// node's pod CIDRs (or be one of its addresses) and name one of its
// addresses as host; while the record is refused, the entry waits.
func TestGateEntriesBelongToTheirNode(t *testing.T) {
	g := NewGate("c2", Limits{})
	g.SetConfig(&gateCfg)
	const id = 2<<20 | 5
	host := func(e IPCacheEntry, h string) IPCacheEntry { e.HostIP = netip.MustParseAddr(h); return e }
	putNode(g, gNode("n1", "192.0.2.1", "10.2.1.0/24"))
	putNode(g, gNode("n2", "192.0.2.2", "10.2.2.0/24"))
	own := putIPOf(g, "n1", host(gIP("10.2.1.5/32", id), "192.0.2.1"))
	other := putIPOf(g, "n1", host(gIP("10.2.2.5/32", id), "192.0.2.1"))
	wrongHost := putIPOf(g, "n1", host(gIP("10.2.1.6/32", id), "192.0.2.2"))
	addr := putIPOf(g, "n1", gIP("192.0.2.1/32", id))
	for key, want := range map[string]string{own: "accepted", other: ReasonPrefixNotOwned, wrongHost: ReasonPrefixNotOwned, addr: "accepted"} {
		if got := reasonOf(t, g, key); got != want {
			t.Errorf("%s: %s, want %s", key, got, want)
		}
	}
	// n1's record is refused (its CIDR moves outside the cluster): its
	// entries wait; it comes back: they are decided again.
	putNode(g, gNode("n1", "192.0.2.1", "10.9.0.0/24"))
	if got := reasonOf(t, g, own); got != "pending" {
		t.Errorf("entry of a refused node: %s, want pending", got)
	}
	putNode(g, gNode("n1", "192.0.2.1", "10.2.1.0/24"))
	if got := reasonOf(t, g, own); got != "accepted" {
		t.Errorf("entry after its node came back: %s, want accepted", got)
	}
	// n2 takes over 10.2.1.5 by publishing it under its own prefix: refused.
	if got := reasonOf(t, g, putIPOf(g, "n2", host(gIP("10.2.1.5/32", id), "192.0.2.2"))); got != ReasonPrefixNotOwned {
		t.Errorf("n2 publishing n1's pod: %s, want %s", got, ReasonPrefixNotOwned)
	}
}
