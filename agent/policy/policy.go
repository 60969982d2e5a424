package policy

import (
	"cmp"
	"maps"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Endpoint is a local endpoint as policy sees it. Labels include
// isthmus.io/namespace and isthmus.io/cluster.
type Endpoint struct {
	ID        uint32
	Namespace string
	Identity  uint32
	Labels    identity.Labels
}

// Result is the compiled policy of a node.
type Result struct {
	// Keys are the allow entries of the policy map.
	Keys []bpf.PolicyKey
	// Ingress and Egress hold, per endpoint ID, whether the direction is
	// enforced (default deny).
	Ingress map[uint32]bool
	Egress  map[uint32]bool
}

// portProto is one port/protocol pair of a policy key.
type portProto struct {
	port  uint16
	proto bpf.Proto
}

// Compile turns policies into policy map entries for the given endpoints;
// see the package documentation for the semantics.
func Compile(policies []objects.NetworkPolicy, endpoints []Endpoint, identities []identity.Identity, localCluster string) Result {
	res := Result{
		Ingress: make(map[uint32]bool, len(endpoints)),
		Egress:  make(map[uint32]bool, len(endpoints)),
	}
	for _, ep := range endpoints {
		res.Ingress[ep.ID] = false
		res.Egress[ep.ID] = false
	}
	keys := map[bpf.PolicyKey]bool{}
	idx := indexIdentities(identities)

	for _, pol := range policies {
		ns := namespaceOrDefault(pol.Metadata.Namespace)
		var selected []Endpoint
		for _, ep := range endpoints {
			if namespaceOrDefault(ep.Namespace) == ns && pol.Spec.EndpointSelector.Matches(ep.Labels) {
				selected = append(selected, ep)
			}
		}
		if len(selected) == 0 {
			continue
		}
		for _, r := range pol.Spec.Ingress {
			peers := rulePeers(r.FromEndpoints, r.FromEntities, ns, idx, localCluster)
			addKeys(keys, selected, bpf.Ingress, peers, rulePorts(r.ToPorts))
		}
		for _, r := range pol.Spec.Egress {
			peers := rulePeers(r.ToEndpoints, r.ToEntities, ns, idx, localCluster)
			addKeys(keys, selected, bpf.Egress, peers, rulePorts(r.ToPorts))
		}
		enforceIn, enforceOut := pol.Spec.Enforces(objects.PolicyTypeIngress), pol.Spec.Enforces(objects.PolicyTypeEgress)
		for _, ep := range selected {
			if enforceIn {
				res.Ingress[ep.ID] = true
			}
			if enforceOut {
				res.Egress[ep.ID] = true
			}
		}
	}

	res.Keys = make([]bpf.PolicyKey, 0, len(keys))
	for k := range keys {
		res.Keys = append(res.Keys, k)
	}
	slices.SortFunc(res.Keys, compareKeys)
	return res
}

// AllowHostIngress adds, for every endpoint whose ingress is enforced, an
// entry that admits the local host identity on every port and protocol
// (Kubernetes mode: kubelet probes), keeping the keys sorted.
func (r *Result) AllowHostIngress() {
	for id, enforced := range r.Ingress {
		if enforced {
			r.Keys = append(r.Keys, bpf.PolicyKey{EndpointID: id, PeerIdentity: bpf.IdentityHost, Port: 0, Proto: bpf.ProtoAny, Direction: bpf.Ingress})
		}
	}
	slices.SortFunc(r.Keys, compareKeys)
	r.Keys = slices.Compact(r.Keys)
}

func addKeys(keys map[bpf.PolicyKey]bool, eps []Endpoint, dir bpf.Direction, peers []uint32, ports []portProto) {
	for _, ep := range eps {
		for _, peer := range peers {
			for _, pp := range ports {
				keys[bpf.PolicyKey{EndpointID: ep.ID, PeerIdentity: peer, Port: pp.port, Proto: pp.proto, Direction: dir}] = true
			}
		}
	}
}

// identityIndex finds the identities a selector may match without a scan
// of them all: by label (key and value), the positions of the identities
// that carry it. A selector's candidates are the shortest list among its
// matchLabels pairs' (and, when it does not name a namespace, the policy's
// namespace's), so a rule costs about what it selects; matchExpressions
// are checked on the candidates. Only a selector without any pair to
// narrow by (one that names the namespace in an expression only) scans
// every identity.
type identityIndex struct {
	ids     []identity.Identity
	byLabel map[[2]string][]int
}

func indexIdentities(ids []identity.Identity) identityIndex {
	idx := identityIndex{ids: ids, byLabel: map[[2]string][]int{}}
	for i, id := range ids {
		for k, v := range id.Labels {
			idx.byLabel[[2]string{k, v}] = append(idx.byLabel[[2]string{k, v}], i)
		}
	}
	return idx
}

// candidates calls fn with the position of every identity that may carry
// every label of sel: those carrying its rarest label, or every identity
// when sel is empty.
func (idx identityIndex) candidates(sel map[string]string, fn func(i int)) {
	if len(sel) == 0 {
		for i := range idx.ids {
			fn(i)
		}
		return
	}
	var best []int
	first := true
	for k, v := range sel {
		if l := idx.byLabel[[2]string{k, v}]; first || len(l) < len(best) {
			best, first = l, false
		}
	}
	for _, i := range best {
		fn(i)
	}
}

// rulePeers returns the peer identities of one rule; duplicates are removed
// later with the keys.
func rulePeers(sels []objects.Selector, entities []string, ns string, idx identityIndex, localCluster string) []uint32 {
	if len(sels) == 0 && len(entities) == 0 {
		return []uint32{bpf.IdentityUnknown} // any peer
	}
	var peers []uint32
	for _, sel := range sels {
		// The namespace label narrows the candidates too: a selector
		// that does not name one matches only the policy's namespace.
		narrow := maps.Clone(sel.MatchLabels)
		if narrow == nil {
			narrow = map[string]string{}
		}
		if !sel.Names(identity.LabelNamespace) {
			narrow[identity.LabelNamespace] = ns
		}
		idx.candidates(narrow, func(i int) {
			if id := idx.ids[i]; selectorMatches(sel, id.Labels, ns) {
				peers = append(peers, id.ID)
			}
		})
	}
	for _, e := range entities {
		switch strings.ToLower(e) {
		case objects.EntityHost:
			peers = append(peers, bpf.IdentityHost)
		case objects.EntityRemoteNode:
			peers = append(peers, bpf.IdentityRemote)
		case objects.EntityWorld:
			peers = append(peers, bpf.IdentityWorld)
		case objects.EntityAll:
			peers = append(peers, bpf.IdentityUnknown)
		case objects.EntityCluster:
			peers = append(peers, bpf.IdentityHost, bpf.IdentityRemote)
			idx.candidates(map[string]string{identity.LabelCluster: localCluster}, func(i int) {
				peers = append(peers, idx.ids[i].ID)
			})
		}
	}
	return peers
}

// selectorMatches applies a peer selector: labels must satisfy it, and an
// identity from another namespace matches only when the selector names the
// namespace itself (in matchLabels or matchExpressions).
func selectorMatches(sel objects.Selector, l identity.Labels, policyNS string) bool {
	if !sel.Matches(l) {
		return false
	}
	if !sel.Names(identity.LabelNamespace) && l[identity.LabelNamespace] != policyNS {
		return false
	}
	return true
}

// rulePorts expands toPorts into port/protocol pairs.
func rulePorts(rules []objects.PortRule) []portProto {
	if len(rules) == 0 {
		return []portProto{{0, bpf.ProtoAny}}
	}
	var out []portProto
	for _, r := range rules {
		switch r.EffectiveProtocol() {
		case objects.ProtocolTCP:
			out = append(out, portProto{r.Port, bpf.ProtoTCP})
		case objects.ProtocolUDP:
			out = append(out, portProto{r.Port, bpf.ProtoUDP})
		case objects.ProtocolICMP:
			// ICMP has no ports; one rule covers both IP families.
			out = append(out, portProto{0, bpf.ProtoICMP}, portProto{0, bpf.ProtoICMPv6})
		case objects.ProtocolANY:
			if r.Port == 0 {
				out = append(out, portProto{0, bpf.ProtoAny})
			} else {
				// Only TCP and UDP have ports.
				out = append(out, portProto{r.Port, bpf.ProtoTCP}, portProto{r.Port, bpf.ProtoUDP})
			}
		}
	}
	return out
}

func compareKeys(a, b bpf.PolicyKey) int {
	return cmp.Or(
		cmp.Compare(a.EndpointID, b.EndpointID),
		cmp.Compare(a.Direction, b.Direction),
		cmp.Compare(a.PeerIdentity, b.PeerIdentity),
		cmp.Compare(a.Proto, b.Proto),
		cmp.Compare(a.Port, b.Port),
	)
}

func namespaceOrDefault(ns string) string {
	if ns == "" {
		return objects.DefaultNamespace
	}
	return ns
}
