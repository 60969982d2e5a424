package policy

import (
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

const (
	webDefault uint32 = 1<<20 | 1
	webProd    uint32 = 1<<20 | 2
	dbDefault  uint32 = 1<<20 | 3
	webRemote  uint32 = 2<<20 | 1 // web in namespace default of cluster c2
	dbProd     uint32 = 1<<20 | 4
)

func lbl(app, ns, cluster string) identity.Labels {
	return identity.Labels{"app": app, identity.LabelNamespace: ns, identity.LabelCluster: cluster}
}

var testIdentities = []identity.Identity{
	{ID: webDefault, Labels: lbl("web", "default", "c1")},
	{ID: webProd, Labels: lbl("web", "prod", "c1")},
	{ID: dbDefault, Labels: lbl("db", "default", "c1")},
	{ID: webRemote, Labels: lbl("web", "default", "c2")},
	{ID: dbProd, Labels: lbl("db", "prod", "c1")},
}

var testEndpoints = []Endpoint{
	{ID: 10, Namespace: "default", Identity: dbDefault, Labels: lbl("db", "default", "c1")},
	{ID: 11, Namespace: "default", Identity: webDefault, Labels: lbl("web", "default", "c1")},
	{ID: 20, Namespace: "prod", Identity: dbProd, Labels: lbl("db", "prod", "c1")},
}

func pol(ns string, sel map[string]string, ingress []objects.IngressRule, egress []objects.EgressRule) objects.NetworkPolicy {
	return objects.NetworkPolicy{
		APIVersion: objects.APIVersion,
		Kind:       objects.KindNetworkPolicy,
		Metadata:   objects.Meta{Name: "p", Namespace: ns},
		Spec:       objects.PolicySpec{EndpointSelector: objects.Selector{MatchLabels: sel}, Ingress: ingress, Egress: egress},
	}
}

func withSpec(p objects.NetworkPolicy, f func(*objects.PolicySpec)) objects.NetworkPolicy {
	f(&p.Spec)
	return p
}

func in(ep, peer uint32, port uint16, proto bpf.Proto) bpf.PolicyKey {
	return bpf.PolicyKey{EndpointID: ep, PeerIdentity: peer, Port: port, Proto: proto, Direction: bpf.Ingress}
}

func out(ep, peer uint32, port uint16, proto bpf.Proto) bpf.PolicyKey {
	return bpf.PolicyKey{EndpointID: ep, PeerIdentity: peer, Port: port, Proto: proto, Direction: bpf.Egress}
}

var db = map[string]string{"app": "db"}

func from(sels ...map[string]string) []objects.Selector {
	var out []objects.Selector
	for _, s := range sels {
		out = append(out, objects.Selector{MatchLabels: s})
	}
	return out
}

func TestCompile(t *testing.T) {
	tests := []struct {
		name     string
		policies []objects.NetworkPolicy
		keys     []bpf.PolicyKey
		ingress  []uint32 // endpoints with ingress enforcement
		egress   []uint32
	}{
		{
			name: "no policies",
		},
		{
			name:     "allow web to db on 5432, same namespace only, any cluster",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{FromEndpoints: from(map[string]string{"app": "web"}), ToPorts: []objects.PortRule{{Port: 5432}}}}, nil)},
			keys:     []bpf.PolicyKey{in(10, webDefault, 5432, bpf.ProtoTCP), in(10, webRemote, 5432, bpf.ProtoTCP)},
			ingress:  []uint32{10},
		},
		{
			name: "selector naming cluster and another namespace",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{FromEndpoints: from(
				map[string]string{"app": "web", identity.LabelNamespace: "prod"},
				map[string]string{"app": "web", identity.LabelCluster: "c2"},
			)}}, nil)},
			keys:    []bpf.PolicyKey{in(10, webProd, 0, bpf.ProtoAny), in(10, webRemote, 0, bpf.ProtoAny)},
			ingress: []uint32{10},
		},
		{
			name:     "empty peer selector: whole namespace",
			policies: []objects.NetworkPolicy{pol("prod", nil, []objects.IngressRule{{FromEndpoints: from(nil)}}, nil)},
			keys:     []bpf.PolicyKey{in(20, webProd, 0, bpf.ProtoAny), in(20, dbProd, 0, bpf.ProtoAny)},
			ingress:  []uint32{20},
		},
		{
			name:     "selector matching nothing: enforcement without keys",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{FromEndpoints: from(map[string]string{"app": "none"})}}, nil)},
			ingress:  []uint32{10},
		},
		{
			name:     "empty endpoint selector selects the namespace only",
			policies: []objects.NetworkPolicy{pol("default", nil, nil, []objects.EgressRule{{ToEntities: []string{"world"}}})},
			keys:     []bpf.PolicyKey{out(10, bpf.IdentityWorld, 0, bpf.ProtoAny), out(11, bpf.IdentityWorld, 0, bpf.ProtoAny)},
			egress:   []uint32{10, 11},
		},
		{
			name:     "empty namespace means default",
			policies: []objects.NetworkPolicy{pol("", db, nil, []objects.EgressRule{{}})},
			keys:     []bpf.PolicyKey{out(10, 0, 0, bpf.ProtoAny)},
			egress:   []uint32{10},
		},
		{
			name:     "policy selecting no endpoint",
			policies: []objects.NetworkPolicy{pol("other", nil, []objects.IngressRule{{}}, nil)},
		},
		{
			name:     "rule without peers: any peer, ports kept",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{ToPorts: []objects.PortRule{{Port: 53, Protocol: "UDP"}}}}, nil)},
			keys:     []bpf.PolicyKey{in(10, 0, 53, bpf.ProtoUDP)},
			ingress:  []uint32{10},
		},
		{
			name: "entities",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{
				{FromEntities: []string{"host", "World"}},
				{FromEntities: []string{"all"}, ToPorts: []objects.PortRule{{Port: 80}}},
				{FromEntities: []string{"cluster"}, ToPorts: []objects.PortRule{{Port: 9090}}},
				{FromEntities: []string{"bogus"}}, // invalid: adds nothing
			}, nil)},
			keys: []bpf.PolicyKey{
				in(10, 0, 80, bpf.ProtoTCP),
				in(10, bpf.IdentityHost, 0, bpf.ProtoAny),
				in(10, bpf.IdentityHost, 9090, bpf.ProtoTCP),
				in(10, bpf.IdentityWorld, 0, bpf.ProtoAny),
				in(10, bpf.IdentityRemote, 9090, bpf.ProtoTCP),
				in(10, webDefault, 9090, bpf.ProtoTCP),
				in(10, webProd, 9090, bpf.ProtoTCP),
				in(10, dbDefault, 9090, bpf.ProtoTCP),
				in(10, dbProd, 9090, bpf.ProtoTCP),
			},
			ingress: []uint32{10},
		},
		{
			name: "port rules",
			policies: []objects.NetworkPolicy{pol("default", db, nil, []objects.EgressRule{{
				ToEntities: []string{"world"},
				ToPorts: []objects.PortRule{
					{Port: 443},                               // default TCP
					{Protocol: "TCP"},                         // every TCP port
					{Protocol: "icmp"},                        // both ICMP families
					{Port: 53, Protocol: "ANY"},               // TCP and UDP
					{Port: 0, Protocol: "ANY"},                // anything
					{Port: 7, Protocol: "SCTP"},               // invalid: adds nothing
					{Port: 443, Protocol: "tcp"},              // duplicate
					{Port: 8, Protocol: objects.ProtocolICMP}, // port ignored for ICMP
				},
			}})},
			keys: []bpf.PolicyKey{
				out(10, bpf.IdentityWorld, 0, bpf.ProtoAny),
				out(10, bpf.IdentityWorld, 0, bpf.ProtoICMP),
				out(10, bpf.IdentityWorld, 0, bpf.ProtoTCP),
				out(10, bpf.IdentityWorld, 53, bpf.ProtoTCP),
				out(10, bpf.IdentityWorld, 443, bpf.ProtoTCP),
				out(10, bpf.IdentityWorld, 53, bpf.ProtoUDP),
				out(10, bpf.IdentityWorld, 0, bpf.ProtoICMPv6),
			},
			egress: []uint32{10},
		},
		{
			name: "two policies merge, ingress and egress",
			policies: []objects.NetworkPolicy{
				pol("default", db, []objects.IngressRule{{FromEndpoints: from(map[string]string{"app": "web"}), ToPorts: []objects.PortRule{{Port: 5432}}}}, nil),
				pol("default", nil, []objects.IngressRule{{FromEntities: []string{"host"}}}, []objects.EgressRule{{ToEndpoints: from(db), ToPorts: []objects.PortRule{{Port: 5432}}}}),
			},
			keys: []bpf.PolicyKey{
				in(10, bpf.IdentityHost, 0, bpf.ProtoAny),
				in(10, webDefault, 5432, bpf.ProtoTCP),
				in(10, webRemote, 5432, bpf.ProtoTCP),
				out(10, dbDefault, 5432, bpf.ProtoTCP),
				in(11, bpf.IdentityHost, 0, bpf.ProtoAny),
				out(11, dbDefault, 5432, bpf.ProtoTCP),
			},
			ingress: []uint32{10, 11},
			egress:  []uint32{10, 11},
		},
		{
			name: "endpoint selector with matchExpressions",
			policies: []objects.NetworkPolicy{withSpec(pol("default", nil, []objects.IngressRule{{FromEntities: []string{"host"}}}, nil), func(s *objects.PolicySpec) {
				s.EndpointSelector.MatchExpressions = []objects.LabelSelectorRequirement{{Key: "app", Operator: objects.OpNotIn, Values: []string{"web"}}}
			})},
			keys:    []bpf.PolicyKey{in(10, bpf.IdentityHost, 0, bpf.ProtoAny)},
			ingress: []uint32{10}, // not 11 (app=web)
		},
		{
			name: "peer expression on the namespace: every namespace",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{FromEndpoints: []objects.Selector{{
				MatchLabels:      map[string]string{"app": "web"},
				MatchExpressions: []objects.LabelSelectorRequirement{{Key: identity.LabelNamespace, Operator: objects.OpExists}},
			}}}}, nil)},
			keys:    []bpf.PolicyKey{in(10, webDefault, 0, bpf.ProtoAny), in(10, webProd, 0, bpf.ProtoAny), in(10, webRemote, 0, bpf.ProtoAny)},
			ingress: []uint32{10},
		},
		{
			name: "peer expression only, no matchLabels: scans every identity",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{FromEndpoints: []objects.Selector{{
				MatchExpressions: []objects.LabelSelectorRequirement{{Key: identity.LabelNamespace, Operator: objects.OpNotIn, Values: []string{"default"}}},
			}}}}, nil)},
			keys:    []bpf.PolicyKey{in(10, webProd, 0, bpf.ProtoAny), in(10, dbProd, 0, bpf.ProtoAny)},
			ingress: []uint32{10},
		},
		{
			name: "peer expression on another key stays in the policy's namespace",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{FromEndpoints: []objects.Selector{{
				MatchExpressions: []objects.LabelSelectorRequirement{{Key: "app", Operator: objects.OpIn, Values: []string{"web"}}},
			}}}}, nil)},
			keys:    []bpf.PolicyKey{in(10, webDefault, 0, bpf.ProtoAny), in(10, webRemote, 0, bpf.ProtoAny)},
			ingress: []uint32{10},
		},
		{
			name: "policyTypes without rules: default deny both ways",
			policies: []objects.NetworkPolicy{withSpec(pol("default", db, nil, nil), func(s *objects.PolicySpec) {
				s.PolicyTypes = []string{objects.PolicyTypeIngress, objects.PolicyTypeEgress}
			})},
			ingress: []uint32{10},
			egress:  []uint32{10},
		},
		{
			name: "policyTypes Egress only: ingress not enforced",
			policies: []objects.NetworkPolicy{withSpec(pol("default", db, nil, []objects.EgressRule{{ToEntities: []string{"world"}}}), func(s *objects.PolicySpec) {
				s.PolicyTypes = []string{objects.PolicyTypeEgress}
			})},
			keys:   []bpf.PolicyKey{out(10, bpf.IdentityWorld, 0, bpf.ProtoAny)},
			egress: []uint32{10},
		},
		{
			name:     "same rule twice is deduplicated",
			policies: []objects.NetworkPolicy{pol("default", db, []objects.IngressRule{{}, {}}, nil), pol("default", db, []objects.IngressRule{{}}, nil)},
			keys:     []bpf.PolicyKey{in(10, 0, 0, bpf.ProtoAny)},
			ingress:  []uint32{10},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := Compile(tt.policies, testEndpoints, testIdentities, "c1")
			if !slices.Equal(res.Keys, tt.keys) && (len(res.Keys) != 0 || len(tt.keys) != 0) {
				t.Errorf("keys:\n got %v\nwant %v", res.Keys, tt.keys)
			}
			for _, ep := range testEndpoints {
				wantIn, wantOut := slices.Contains(tt.ingress, ep.ID), slices.Contains(tt.egress, ep.ID)
				gotIn, okIn := res.Ingress[ep.ID]
				gotOut, okOut := res.Egress[ep.ID]
				if !okIn || !okOut {
					t.Errorf("endpoint %d has no enforcement flags", ep.ID)
				}
				if gotIn != wantIn || gotOut != wantOut {
					t.Errorf("endpoint %d: ingress=%v egress=%v, want %v %v", ep.ID, gotIn, gotOut, wantIn, wantOut)
				}
			}
		})
	}
}

func TestCompileDeterministic(t *testing.T) {
	policies := []objects.NetworkPolicy{
		pol("default", nil, []objects.IngressRule{{FromEntities: []string{"cluster"}, ToPorts: []objects.PortRule{{Port: 1}, {Port: 2, Protocol: "ANY"}}}},
			[]objects.EgressRule{{ToEndpoints: from(nil, db)}}),
	}
	first := Compile(policies, testEndpoints, testIdentities, "c1")
	if !slices.IsSortedFunc(first.Keys, CompareKeys) {
		t.Fatal("keys are not sorted")
	}
	for range 20 {
		// Reordered input gives the same output.
		eps := slices.Clone(testEndpoints)
		ids := slices.Clone(testIdentities)
		slices.Reverse(eps)
		slices.Reverse(ids)
		again := Compile(policies, eps, ids, "c1")
		if !slices.Equal(first.Keys, again.Keys) || !maps.Equal(first.Ingress, again.Ingress) || !maps.Equal(first.Egress, again.Egress) {
			t.Fatal("output depends on input order")
		}
	}
}

func TestCompileEmptyInputs(t *testing.T) {
	res := Compile(nil, nil, nil, "")
	if len(res.Keys) != 0 || res.Ingress == nil || res.Egress == nil {
		t.Errorf("Compile(nil...) = %+v, want no keys and empty non-nil maps", res)
	}
}

// The identity index finds exactly the peers a scan of every identity
// finds, for random identities and selectors (with and without a
// namespace, empty, and the cluster entity).
func TestRulePeersIndexMatchesScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	vals := []string{"a", "b", "c"}
	for round := range 100 {
		var ids []identity.Identity
		for i := range 100 {
			l := identity.Labels{identity.LabelNamespace: []string{"default", "prod"}[rng.IntN(2)], identity.LabelCluster: []string{"c1", "c2"}[rng.IntN(2)]}
			for _, k := range []string{"app", "tier"} {
				if rng.IntN(3) > 0 {
					l[k] = vals[rng.IntN(3)]
				}
			}
			ids = append(ids, identity.Identity{ID: uint32(1000 + i), Labels: l})
		}
		sel := map[string]string{}
		for _, k := range []string{"app", "tier", identity.LabelNamespace} {
			if rng.IntN(3) == 0 {
				sel[k] = map[string]string{"app": vals[rng.IntN(3)], "tier": vals[rng.IntN(3)], identity.LabelNamespace: "prod"}[k]
			}
		}
		ns := []string{"default", "prod"}[rng.IntN(2)]
		entities := []string(nil)
		if rng.IntN(4) == 0 {
			entities = []string{objects.EntityCluster}
		}
		selector := objects.Selector{MatchLabels: sel}
		ops := []string{objects.OpIn, objects.OpNotIn, objects.OpExists, objects.OpDoesNotExist}
		for _, k := range []string{"app", "tier", identity.LabelNamespace} {
			if rng.IntN(4) == 0 {
				r := objects.LabelSelectorRequirement{Key: k, Operator: ops[rng.IntN(4)]}
				if r.Operator == objects.OpIn || r.Operator == objects.OpNotIn {
					r.Values = []string{vals[rng.IntN(3)], "prod"}
				}
				selector.MatchExpressions = append(selector.MatchExpressions, r)
			}
		}
		got := rulePeers([]objects.Selector{selector}, entities, ns, indexIdentities(ids), "c1")
		var want []uint32
		for _, id := range ids {
			if selectorMatches(selector, id.Labels, ns) {
				want = append(want, id.ID)
			}
		}
		if entities != nil {
			want = append(want, bpf.IdentityHost, bpf.IdentityRemote)
			for _, id := range ids {
				if id.Labels[identity.LabelCluster] == "c1" {
					want = append(want, id.ID)
				}
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("round %d: selector %+v in %s: index %v, scan %v", round, selector, ns, got, want)
		}
	}
}

// The node entities name exactly the node identities: host the local
// node, remote-node every other node (where traffic from outside that
// another node SNATed comes from), never a workload.
func TestNodeEntities(t *testing.T) {
	ids := []identity.Identity{{ID: 1000, Labels: identity.Labels{identity.LabelNamespace: "default", identity.LabelCluster: "c1", "app": "a"}}}
	for _, c := range []struct {
		entity string
		want   []uint32
	}{
		{objects.EntityHost, []uint32{bpf.IdentityHost}},
		{objects.EntityRemoteNode, []uint32{bpf.IdentityRemote}},
	} {
		got := rulePeers(nil, []string{c.entity}, "default", indexIdentities(ids), "c1")
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: peers %v, want %v", c.entity, got, c.want)
		}
	}
}

// With HostIngress, an endpoint whose ingress is enforced admits the host
// on every port, besides what its policies allow; one without enforced
// ingress gets no entry (everything is admitted already).
func TestCompilerHostIngress(t *testing.T) {
	p := pol("default", db, []objects.IngressRule{{FromEndpoints: from(map[string]string{"app": "web"}), ToPorts: []objects.PortRule{{Port: 5432}}}}, nil)
	c := NewCompiler([]objects.NetworkPolicy{p}, testIdentities, "c1")
	c.HostIngress = true
	keys, ingress, _ := c.Endpoint(testEndpoints[0]) // db in default
	want := []bpf.PolicyKey{
		in(10, bpf.IdentityHost, 0, bpf.ProtoAny),
		in(10, webDefault, 5432, bpf.ProtoTCP),
		in(10, webRemote, 5432, bpf.ProtoTCP), // every cluster's web in default
	}
	if !ingress || !slices.Equal(keys, want) {
		t.Errorf("db: keys %v (ingress enforced %v), want %v", keys, ingress, want)
	}
	if keys, ingress, _ := c.Endpoint(testEndpoints[1]); ingress || len(keys) != 0 { // web: not selected
		t.Errorf("web: keys %v (ingress enforced %v), want none", keys, ingress)
	}
}
