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
// see the package documentation for the semantics. It is a Compiler's
// work over every endpoint.
func Compile(policies []objects.NetworkPolicy, endpoints []Endpoint, identities []identity.Identity, localCluster string) Result {
	res := Result{
		Ingress: make(map[uint32]bool, len(endpoints)),
		Egress:  make(map[uint32]bool, len(endpoints)),
	}
	c := NewCompiler(policies, identities, localCluster)
	for _, ep := range endpoints {
		var keys []bpf.PolicyKey
		keys, res.Ingress[ep.ID], res.Egress[ep.ID] = c.Endpoint(ep)
		res.Keys = append(res.Keys, keys...)
	}
	slices.SortFunc(res.Keys, CompareKeys)
	res.Keys = slices.Compact(res.Keys) // two endpoints given the same ID
	if res.Keys == nil {
		res.Keys = []bpf.PolicyKey{}
	}
	return res
}

// Compiler compiles policies for one endpoint at a time, each rule's
// peers and ports resolved once, when an endpoint it applies to first
// needs them: compiling an endpoint that changed costs the policies that
// select it, not every endpoint of the node. A Compiler is for one set of
// policies and identities; it is not safe for concurrent use.
type Compiler struct {
	// HostIngress admits the local host identity into every endpoint
	// whose ingress is enforced, on every port and protocol (Kubernetes
	// mode: kubelet probes).
	HostIngress bool
	cluster     string
	idx         identityIndex
	pols        []compiledPolicy
}

// compiledPolicy is one policy as a Compiler applies it.
type compiledPolicy struct {
	pol                   *objects.NetworkPolicy
	ns                    string
	enforceIn, enforceOut bool
	rules                 []compiledRule // ingress then egress; nil until needed
}

// compiledRule is one rule's peers and ports.
type compiledRule struct {
	dir   bpf.Direction
	peers []uint32
	ports []portProto
}

// NewCompiler prepares policies for Endpoint against identities.
func NewCompiler(policies []objects.NetworkPolicy, identities []identity.Identity, localCluster string) *Compiler {
	c := &Compiler{cluster: localCluster, idx: indexIdentities(identities), pols: make([]compiledPolicy, len(policies))}
	for i := range policies {
		pol := &policies[i]
		c.pols[i] = compiledPolicy{pol: pol, ns: namespaceOrDefault(pol.Metadata.Namespace),
			enforceIn: pol.Spec.Enforces(objects.PolicyTypeIngress), enforceOut: pol.Spec.Enforces(objects.PolicyTypeEgress)}
	}
	return c
}

// Endpoint returns the allow entries of ep, sorted and without repeats,
// and whether its ingress and its egress are enforced.
func (c *Compiler) Endpoint(ep Endpoint) (keys []bpf.PolicyKey, ingress, egress bool) {
	for i := range c.pols {
		p := &c.pols[i]
		if namespaceOrDefault(ep.Namespace) != p.ns || !p.pol.Spec.EndpointSelector.Matches(ep.Labels) {
			continue
		}
		for _, r := range c.rulesOf(p) {
			for _, peer := range r.peers {
				for _, pp := range r.ports {
					keys = append(keys, bpf.PolicyKey{EndpointID: ep.ID, PeerIdentity: peer, Port: pp.port, Proto: pp.proto, Direction: r.dir})
				}
			}
		}
		ingress, egress = ingress || p.enforceIn, egress || p.enforceOut
	}
	if c.HostIngress && ingress {
		keys = append(keys, hostIngressKey(ep.ID))
	}
	slices.SortFunc(keys, CompareKeys)
	return slices.Compact(keys), ingress, egress
}

// rulesOf resolves a policy's rules the first time an endpoint needs them.
func (c *Compiler) rulesOf(p *compiledPolicy) []compiledRule {
	if p.rules != nil {
		return p.rules
	}
	p.rules = make([]compiledRule, 0, len(p.pol.Spec.Ingress)+len(p.pol.Spec.Egress))
	for _, r := range p.pol.Spec.Ingress {
		p.rules = append(p.rules, compiledRule{bpf.Ingress, rulePeers(r.FromEndpoints, r.FromEntities, p.ns, c.idx, c.cluster), rulePorts(r.ToPorts)})
	}
	for _, r := range p.pol.Spec.Egress {
		p.rules = append(p.rules, compiledRule{bpf.Egress, rulePeers(r.ToEndpoints, r.ToEntities, p.ns, c.idx, c.cluster), rulePorts(r.ToPorts)})
	}
	return p.rules
}

// hostIngressKey admits the local host identity into endpoint id on every
// port and protocol.
func hostIngressKey(id uint32) bpf.PolicyKey {
	return bpf.PolicyKey{EndpointID: id, PeerIdentity: bpf.IdentityHost, Port: 0, Proto: bpf.ProtoAny, Direction: bpf.Ingress}
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

// CompareKeys orders policy keys as Compile and Compiler.Endpoint sort
// them.
func CompareKeys(a, b bpf.PolicyKey) int {
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
