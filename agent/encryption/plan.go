package encryption

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/gateway/wireguard"
)

// WorkloadKeepalive is the persistent keepalive between an external
// workload and its peers.
const WorkloadKeepalive = 25 * time.Second

func isWorkload(n records.Node) bool { return n.Labels[records.LabelExternalWorkload] == "true" }

// encryptionPlan is what the device and the routing should hold.
type encryptionPlan struct {
	peers       []wireguard.Peer
	peerNodes   map[string]string
	routes      []netip.Prefix // into the device
	vips        []netip.Prefix // service addresses into the device (an external workload's)
	unreachable []netip.Prefix // fail-closed fallback
	unencrypted []string
	refused     []string
}

// planEncryption derives the peers from the mesh's node records. A key
// claimed by two nodes (or by another node and this one) is refused for all
// of them: WireGuard routes by key, so a copied key would let one node take
// the other's traffic.
func planEncryption(m desired.Mesh, selfKey string, nodeEnc bool) encryptionPlan {
	p := encryptionPlan{peerNodes: map[string]string{}}
	claims := map[string][]string{}
	var others []records.Node
	for _, n := range m.View.Nodes {
		if n.Cluster == m.Cluster && n.Name == m.Node {
			continue
		}
		others = append(others, n)
		if n.WireGuardPublicKey != "" {
			claims[n.WireGuardPublicKey] = append(claims[n.WireGuardPublicKey], n.Cluster+"/"+n.Name)
		}
	}
	// The view's order is not stable (map iteration): sort, so the same
	// records give the same plan (and the same saved file).
	slices.SortFunc(others, func(a, b records.Node) int {
		return cmp.Or(cmp.Compare(a.Cluster, b.Cluster), cmp.Compare(a.Name, b.Name))
	})
	// Fail closed for every remote cluster's whole pod range too, not only
	// for its nodes we know: a node that is refused, expired or not listed
	// yet leaves no route, and its pods' traffic would take the underlay
	// in the clear. (Remote ranges never overlap this cluster's: the mirror
	// refuses such a cluster, and a refused one is not in the view.)
	p.unreachable = append(p.unreachable, m.View.RemotePodCIDRs...)
	selfWorkload := false
	for _, n := range m.View.Nodes {
		if n.Cluster == m.Cluster && n.Name == m.Node {
			selfWorkload = isWorkload(n)
		}
	}
	for _, n := range others {
		name := n.Cluster + "/" + n.Name
		p.unreachable = append(p.unreachable, n.PodCIDRs...)
		key := n.WireGuardPublicKey
		switch {
		case key == "":
			p.unencrypted = append(p.unencrypted, name)
			continue
		case key == selfKey:
			p.refused = append(p.refused, name+": publishes this node's own WireGuard public key")
			continue
		case len(claims[key]) > 1:
			p.refused = append(p.refused, name+": WireGuard public key also claimed by "+strings.Join(slices.DeleteFunc(slices.Clone(claims[key]), func(s string) bool { return s == name }), ", "))
			continue
		}
		nodePort := cmp.Or(n.WireGuardPort, wireguard.DefaultListenPort)
		ep, ok := wireguard.EndpointFor(m.NodeIPs, n.IPs, nodePort)
		if !ok {
			p.refused = append(p.refused, name+": no underlay address of a family this node has")
			continue
		}
		allowed := slices.Clone(n.PodCIDRs)
		if nodeEnc {
			for _, ip := range n.IPs {
				allowed = append(allowed, netip.PrefixFrom(ip, ip.BitLen()))
			}
		}
		peer := wireguard.Peer{PublicKey: key, Endpoint: ep, AllowedIPs: allowed}
		if selfWorkload || isWorkload(n) {
			// Between an external workload and its peers: a host behind
			// NAT stays reachable, and each side starts a handshake as
			// soon as it adds the other (a keepalive turned on is sent at
			// once), so whichever side learns of the other last completes
			// it, instead of waiting out WireGuard's 5 s handshake retry.
			peer.PersistentKeepalive = WorkloadKeepalive
		}
		p.peers = append(p.peers, peer)
		p.peerNodes[key] = name
		p.routes = append(p.routes, allowed...)
	}
	// A node's range may equal its cluster's: one route each.
	slices.SortFunc(p.unreachable, netip.Prefix.Compare)
	p.unreachable = slices.Compact(p.unreachable)
	return p
}
