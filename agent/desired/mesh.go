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
	// View is the mesh's small tables (nodes, identities, services), a
	// snapshot; IPs its ipcache entries, read per prefix (nil in
	// standalone mode): at hundreds of thousands of entries, a copy per
	// run would cost more than the change it applies.
	View meshsync.View
	IPs  IPSource
}

// IPSource is the mesh's ipcache entries (meshsync.Tables).
type IPSource interface {
	// TakeIPChanges returns the prefixes changed since the last call, or
	// full: any may have changed.
	TakeIPChanges() (changed []netip.Prefix, full bool)
	LookupIP(p netip.Prefix) (meshsync.IPEntry, bool)
	RangeIP(f func(meshsync.IPEntry))
	RangeOwnIP(f func(meshsync.IPEntry))
}

// Local reports whether addr is one of this node's pod addresses.
func (m Mesh) Local(addr netip.Addr) bool {
	return slices.ContainsFunc(m.PodCIDRs, func(p netip.Prefix) bool { return p.Contains(addr) })
}

// MayRemove reports whether an ipcache entry that is not desired may go.
func (m Mesh) MayRemove(p netip.Prefix) bool {
	return m.Ready || (p.IsSingleIP() && m.Local(p.Addr()))
}

// ownNode reports whether a mesh entry is one this node published: its
// endpoints come from the local store.
func (m Mesh) ownNode(e meshsync.IPEntry) bool {
	return e.Cluster == m.Cluster && slices.Contains(m.NodeIPs, e.HostIP)
}

// TakeIPChanges returns the mesh's ipcache changes since the last call
// (see IPSource); nothing in standalone mode.
func (m Mesh) TakeIPChanges() (changed []netip.Prefix, full bool) {
	if m.IPs == nil {
		return nil, false
	}
	return m.IPs.TakeIPChanges()
}

// LookupIP returns the mesh's ipcache entry for p: an endpoint of any
// cluster, with the node that hosts it, but not this node's own.
func (m Mesh) LookupIP(p netip.Prefix) (bpf.IPCacheEntry, bool) {
	if m.IPs == nil {
		return bpf.IPCacheEntry{}, false
	}
	e, ok := m.IPs.LookupIP(p)
	if !ok || m.ownNode(e) {
		return bpf.IPCacheEntry{}, false
	}
	return bpf.IPCacheEntry{Identity: e.Identity, HostIP: e.HostIP}, true
}

// AddIPCache adds every entry LookupIP has to want.
func (m Mesh) AddIPCache(want map[netip.Prefix]bpf.IPCacheEntry) {
	if m.IPs == nil {
		return
	}
	var twice []netip.Prefix
	m.IPs.RangeIP(func(e meshsync.IPEntry) {
		if m.ownNode(e) {
			return
		}
		if _, dup := want[e.Prefix]; dup {
			twice = append(twice, e.Prefix)
		}
		want[e.Prefix] = bpf.IPCacheEntry{Identity: e.Identity, HostIP: e.HostIP}
	})
	for _, p := range twice { // two clusters claim it: LookupIP decides
		if e, ok := m.LookupIP(p); ok {
			want[p] = e
		} else {
			delete(want, p)
		}
	}
}

// NodeIPCache returns the own cluster's other nodes' addresses
// (remote-node). Other clusters' nodes stay "world": reserved identities
// mean the local cluster's.
func (m Mesh) NodeIPCache() map[netip.Prefix]bpf.IPCacheEntry {
	out := map[netip.Prefix]bpf.IPCacheEntry{}
	for _, n := range m.View.Nodes {
		if n.Cluster != m.Cluster || n.Name == m.Node {
			continue
		}
		for _, ip := range n.IPs {
			out[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: bpf.IdentityRemote}
		}
	}
	return out
}

// ClusterEndpoints returns the endpoints of the own cluster's other nodes
// as services select them: by the labels of their identity.
func (m Mesh) ClusterEndpoints(ids Identities) []service.Endpoint {
	if m.IPs == nil {
		return nil
	}
	var own []meshsync.IPEntry
	m.IPs.RangeOwnIP(func(e meshsync.IPEntry) {
		if e.Prefix.IsSingleIP() && !m.ownNode(e) {
			own = append(own, e)
		}
	})
	labels := map[uint32]identity.Labels{}
	var out []service.Endpoint
	for _, e := range own {
		l, ok := labels[e.Identity]
		if !ok {
			l, _ = ids.Get(e.Identity)
			labels[e.Identity] = l
		}
		ns := l[identity.LabelNamespace]
		if ns == "" || l[identity.LabelCluster] != m.Cluster {
			continue // unknown identity (yet): selectable by nothing
		}
		out = append(out, service.Endpoint{Key: "mesh/" + e.Prefix.String(), Namespace: ns, Labels: l, IPs: []netip.Addr{e.Prefix.Addr()}})
	}
	return out
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
