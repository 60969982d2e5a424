package encryption

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

const (
	keyA = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	keyB = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA="
	keyC = "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCA="
	keyS = "SSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSA="
)

func node(cluster, name, key string, ip string, cidr string) records.Node {
	return records.Node{Name: name, Cluster: cluster, IPs: []netip.Addr{netip.MustParseAddr(ip)},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr)}, WireGuardPublicKey: key}
}

func TestPlanEncryption(t *testing.T) {
	m := desired.Mesh{Ready: true, Cluster: "c1", Node: "n1", NodeIPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")},
		View: meshsync.View{Nodes: []records.Node{
			node("c1", "n1", keyS, "192.0.2.1", "10.1.1.0/24"), // this node
			node("c1", "n2", keyA, "192.0.2.2", "10.1.2.0/24"),
			node("c2", "n1", keyB, "198.51.100.1", "10.2.1.0/24"),
			node("c2", "n2", "", "198.51.100.2", "10.2.2.0/24"),     // no encryption
			node("c2", "n3", keyC, "198.51.100.3", "10.2.3.0/24"),   // copies c2/n4's key
			node("c2", "n4", keyC, "198.51.100.4", "10.2.4.0/24"),   // copies c2/n3's key
			node("c2", "n5", keyS, "198.51.100.5", "10.2.5.0/24"),   // copies this node's key
			node("c2", "n6", keyA+"", "2001:db8::6", "10.2.6.0/24"), // key of c1/n2 too
		}}}
	m.View.Nodes[2].WireGuardPort = 5000
	p := planEncryption(m, keyS, false)

	var got []string
	for _, pe := range p.peers {
		got = append(got, p.peerNodes[pe.PublicKey]+" "+pe.Endpoint.String())
	}
	want := []string{"c2/n1 198.51.100.1:5000"}
	if !slices.Equal(got, want) {
		t.Errorf("peers %v, want %v", got, want)
	}
	if !slices.Equal(p.unencrypted, []string{"c2/n2"}) {
		t.Errorf("unencrypted %v", p.unencrypted)
	}
	refused := strings.Join(p.refused, "\n")
	for _, n := range []string{"c1/n2", "c2/n3", "c2/n4", "c2/n5", "c2/n6"} {
		if !strings.Contains(refused, n+":") {
			t.Errorf("%s not refused: %s", n, refused)
		}
	}
	// Every other node's pod CIDR fails closed, peer or not.
	if len(p.unreachable) != 7 {
		t.Errorf("unreachable %v, want the 7 other nodes' pod CIDRs", p.unreachable)
	}
	// And every remote cluster's whole range: a node of it that is
	// refused, expired or not yet listed leaves no route of its own.
	m.View.RemotePodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("fd00:2::/48")}
	if p := planEncryption(m, keyS, false); len(p.unreachable) != 9 || !slices.Contains(p.unreachable, netip.MustParsePrefix("10.2.0.0/16")) {
		t.Errorf("unreachable %v, want the 7 nodes' and c2's 2 ranges", p.unreachable)
	}
	m.View.RemotePodCIDRs = nil
	if !slices.Equal(p.routes, []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24")}) {
		t.Errorf("routes %v", p.routes)
	}

	// Node encryption adds the node addresses to AllowedIPs and routes.
	p = planEncryption(m, keyS, true)
	if len(p.peers) != 1 || !slices.Contains(p.peers[0].AllowedIPs, netip.MustParsePrefix("198.51.100.1/32")) {
		t.Errorf("node encryption: peers %+v", p.peers)
	}
}

func TestEncryptionRoutingConverges(t *testing.T) {
	h, ip := agenttest.Netns(t)
	// A veth stands in for the WireGuard device: routes only need a link.
	ip("link", "add", "wgtest0", "type", "veth", "peer", "name", "wgtest1")
	ip("link", "set", "wgtest1", "up")
	ip("link", "set", "wgtest0", "up")
	link, err := h.LinkByName("wgtest0")
	if err != nil {
		t.Fatal(err)
	}
	e := &WireGuard{nl: h}
	plan := encryptionPlan{
		routes:      []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24"), netip.MustParsePrefix("fd00:2:0:1::/64")},
		unreachable: []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24"), netip.MustParsePrefix("fd00:2:0:1::/64"), netip.MustParsePrefix("10.2.2.0/24")},
	}
	local := []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24"), netip.MustParsePrefix("fd00:1:0:1::/64")}
	sync := func(nodeEnc bool) int {
		t.Helper()
		e.nodeEnc = nodeEnc
		n, err := syncTableAndRules(e, link, plan, local)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := sync(false); n != 7 {
		t.Errorf("first sync changed %d, want 5 routes and 2 rules", n)
	}
	if n := sync(false); n != 0 {
		t.Errorf("second sync changed %d, want 0 (routes flap?)\n%s", n, ip("route", "show", "table", "all"))
	}
	table := ip("route", "show", "table", "73")
	for _, want := range []string{"10.2.1.0/24 dev wgtest0", "unreachable 10.2.1.0/24", "unreachable 10.2.2.0/24"} {
		if !strings.Contains(table, want) {
			t.Errorf("table 73 lacks %q:\n%s", want, table)
		}
	}
	if rules := ip("rule"); !strings.Contains(rules, "from 10.1.1.0/24 lookup 73") {
		t.Errorf("rules:\n%s", rules)
	}
	// Switching to node encryption replaces the source rules by the mark rule.
	if n := sync(true); n != 4 {
		t.Errorf("switch to node encryption changed %d, want 2 rules out and 2 in", n)
	}
	if rules := ip("rule"); !strings.Contains(rules, "not from all fwmark 0x1e73 lookup 73") || strings.Contains(rules, "from 10.1.1.0/24") {
		t.Errorf("rules with node encryption:\n%s", rules)
	}
	// A node that left: its routes go.
	plan.routes, plan.unreachable = plan.routes[:1], plan.unreachable[:1]
	if n := sync(true); n != 3 {
		t.Errorf("removing a node changed %d, want 3", n)
	}
	// Encryption turned off: nothing stays.
	if _, err := syncTable(h, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := syncRules(h, nil); err != nil {
		t.Fatal(err)
	}
	if out := ip("route", "show", "table", "73"); strings.TrimSpace(out) != "" {
		t.Errorf("table 73 after cleanup:\n%s", out)
	}
	if rules := ip("rule"); strings.Contains(rules, "lookup 73") {
		t.Errorf("rules after cleanup:\n%s", rules)
	}
}

// Peers of an external workload get a persistent keepalive, on both ends:
// a node keeps it for the workload only, the workload for every peer.
func TestPlanKeepaliveWithExternalWorkloads(t *testing.T) {
	vm := node("c1", "vm-db", keyB, "203.0.113.9", "10.1.200.2/32")
	vm.Labels = map[string]string{records.LabelExternalWorkload: "true"}
	nodes := []records.Node{node("c1", "n1", keyS, "192.0.2.1", "10.1.1.0/24"), node("c1", "n2", keyA, "192.0.2.2", "10.1.2.0/24"), vm}
	keepalive := func(self, selfKey string) map[string]time.Duration {
		m := desired.Mesh{Ready: true, Cluster: "c1", Node: self, NodeIPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")},
			View: meshsync.View{Nodes: nodes}}
		out := map[string]time.Duration{}
		p := planEncryption(m, selfKey, false)
		for _, pe := range p.peers {
			out[p.peerNodes[pe.PublicKey]] = pe.PersistentKeepalive
		}
		return out
	}
	if got := keepalive("n1", keyS); got["c1/vm-db"] != WorkloadKeepalive || got["c1/n2"] != 0 {
		t.Errorf("a node's keepalives %v: want %s for the workload only", got, WorkloadKeepalive)
	}
	if got := keepalive("vm-db", keyB); got["c1/n1"] != WorkloadKeepalive || got["c1/n2"] != WorkloadKeepalive {
		t.Errorf("the workload's keepalives %v: want %s for every peer", got, WorkloadKeepalive)
	}
}

// An external workload routes the service addresses into its device
// (SetServiceRoutes), next to its peers' ranges; a service that goes takes
// its route with it.
func TestServiceRoutesIntoTheDevice(t *testing.T) {
	h, ip := agenttest.Netns(t)
	ip("link", "add", "wgtest0", "type", "veth", "peer", "name", "wgtest1")
	ip("link", "set", "wgtest1", "up")
	ip("link", "set", "wgtest0", "up")
	link, err := h.LinkByName("wgtest0")
	if err != nil {
		t.Fatal(err)
	}
	e := &WireGuard{nl: h, nodeEnc: true}
	e.SetServiceRoutes([]netip.Addr{netip.MustParseAddr("10.96.0.50"), netip.MustParseAddr("fd00:96::50"), netip.MustParseAddr("10.96.0.50")})
	plan := encryptionPlan{routes: []netip.Prefix{netip.MustParsePrefix("10.2.1.0/24")}, vips: e.vips}
	if _, err := syncTableAndRules(e, link, plan, nil); err != nil {
		t.Fatal(err)
	}
	table := ip("route", "show", "table", "73") + ip("-6", "route", "show", "table", "73")
	for _, want := range []string{"10.96.0.50 dev wgtest0", "fd00:96::50 dev wgtest0", "10.2.1.0/24 dev wgtest0"} {
		if !strings.Contains(table, want) {
			t.Errorf("table 73 lacks %q:\n%s", want, table)
		}
	}
	e.SetServiceRoutes([]netip.Addr{netip.MustParseAddr("fd00:96::50")})
	plan.vips = e.vips
	if _, err := syncTableAndRules(e, link, plan, nil); err != nil {
		t.Fatal(err)
	}
	if table := ip("route", "show", "table", "73"); strings.Contains(table, "10.96.0.50") {
		t.Errorf("the route of a gone service stayed:\n%s", table)
	}
}
