package desired

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// Mesh is the mesh's part of one reconcile run's desired state. In
// standalone mode it is empty and ready.
type Mesh struct {
	// Ready: every watched prefix was listed, so what the mesh lacks may
	// be removed from the datapath. Until then the reconciler removes only
	// what the node itself is the complete source of: its pods' addresses.
	Ready    bool
	Cluster  string
	Node     string
	NodeIPs  []netip.Addr
	PodCIDRs []netip.Prefix
	View     meshsync.View
}

// Local reports whether addr is one of this node's pod addresses.
func (m Mesh) Local(addr netip.Addr) bool {
	return slices.ContainsFunc(m.PodCIDRs, func(p netip.Prefix) bool { return p.Contains(addr) })
}

// MayRemove reports whether an ipcache entry that is not desired may go.
func (m Mesh) MayRemove(p netip.Prefix) bool {
	return m.Ready || (p.IsSingleIP() && m.Local(p.Addr()))
}

// KeepUnknown returns the backends to write for a frontend that has have
// and should have want. Until the mesh is listed, backends that did not
// come from this node (other nodes', other clusters') stay: etcd may just
// not have told us about them yet.
func (m Mesh) KeepUnknown(have, want []bpf.Backend) []bpf.Backend {
	if m.Ready {
		return want
	}
	out := slices.Clone(want)
	for _, b := range have {
		if !m.Local(b.Addr) && !slices.Contains(out, b) {
			out = append(out, b)
		}
	}
	if len(out) == len(want) {
		return want
	}
	slices.SortFunc(out, func(a, b bpf.Backend) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.ClusterID, b.ClusterID))
	})
	return out
}

// AddIPCache adds every endpoint of the mesh (with the node that hosts it)
// and the own cluster's other nodes (remote-node). Other clusters' nodes
// stay "world": reserved identities mean the local cluster's. This node's
// own records are left out: its endpoints come from the local store.
func (m Mesh) AddIPCache(want map[netip.Prefix]bpf.IPCacheEntry) {
	for _, e := range m.View.IPCache {
		if e.Cluster == m.Cluster && slices.Contains(m.NodeIPs, e.HostIP) {
			continue
		}
		want[e.Prefix] = bpf.IPCacheEntry{Identity: e.Identity, HostIP: e.HostIP}
	}
	for _, n := range m.View.Nodes {
		if n.Cluster != m.Cluster || n.Name == m.Node {
			continue
		}
		for _, ip := range n.IPs {
			want[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: bpf.IdentityRemote}
		}
	}
}

// ClusterEndpoints returns the endpoints of the own cluster's other nodes
// as services select them: by the labels of their identity.
func (m Mesh) ClusterEndpoints(ids Identities) []service.Endpoint {
	labels := map[uint32]identity.Labels{}
	var out []service.Endpoint
	for _, e := range m.View.IPCache {
		if e.Cluster != m.Cluster || slices.Contains(m.NodeIPs, e.HostIP) || !e.Prefix.IsSingleIP() {
			continue
		}
		l, ok := labels[e.Identity]
		if !ok {
			l, _ = ids.Get(e.Identity)
			labels[e.Identity] = l
		}
		ns := l[identity.LabelNamespace]
		if ns == "" || l[identity.LabelCluster] != m.Cluster {
			continue // unknown identity (yet): selectable by nothing
		}
		out = append(out, service.Endpoint{Namespace: ns, Labels: l, IPs: []netip.Addr{e.Prefix.Addr()}})
	}
	return out
}

// PodRoute sends a node's pod CIDR to that node's underlay address.
type PodRoute struct {
	Dst netip.Prefix
	Via netip.Addr
}

// PodRoutes routes every other node's pod CIDRs to its address of the
// same family.
func (m Mesh) PodRoutes() []PodRoute {
	var out []PodRoute
	for _, n := range m.View.Nodes {
		if n.Cluster == m.Cluster && n.Name == m.Node {
			continue
		}
		for _, p := range n.PodCIDRs {
			for _, ip := range n.IPs {
				if ip.Is4() == p.Addr().Is4() {
					out = append(out, PodRoute{Dst: p, Via: ip})
					break
				}
			}
		}
	}
	sortRoutes(out)
	return out
}

// sortRoutes orders routes so that the same input always gives the same
// winner for a contested destination.
func sortRoutes(rs []PodRoute) {
	slices.SortFunc(rs, func(a, b PodRoute) int {
		return cmp.Or(a.Dst.Addr().Compare(b.Dst.Addr()), cmp.Compare(a.Dst.Bits(), b.Dst.Bits()), a.Via.Compare(b.Via))
	})
}
