package translate

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

func k8sPolicy(spec networkingv1.NetworkPolicySpec) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "shop"}, Spec: spec}
}

func port(p int32) *intstr.IntOrString { v := intstr.FromInt32(p); return &v }

var (
	tcp  = ptr(corev1.ProtocolTCP)
	udp  = ptr(corev1.ProtocolUDP)
	sctp = ptr(corev1.ProtocolSCTP)
	app  = func(v string) *metav1.LabelSelector {
		return &metav1.LabelSelector{MatchLabels: map[string]string{"app": v}}
	}
	nsAny = objects.LabelSelectorRequirement{Key: identity.LabelNamespace, Operator: objects.OpExists}
)

func TestNetworkPolicy(t *testing.T) {
	isp := func(spec objects.PolicySpec) objects.NetworkPolicy {
		return objects.NetworkPolicy{APIVersion: objects.APIVersion, Kind: objects.KindNetworkPolicy, Metadata: objects.Meta{Name: "p", Namespace: "shop"}, Spec: spec}
	}
	ingressOnly := []string{"Ingress"}
	tests := []struct {
		name string
		in   networkingv1.NetworkPolicySpec
		want objects.PolicySpec
		err  string
	}{
		{
			name: "default deny ingress: no rules, policyTypes defaulted",
			in:   networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{}},
			want: objects.PolicySpec{PolicyTypes: ingressOnly},
		},
		{
			name: "egress rules add Egress to the default policyTypes",
			in:   networkingv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{{}}},
			want: objects.PolicySpec{PolicyTypes: []string{"Ingress", "Egress"}, Egress: []objects.EgressRule{{}}},
		},
		{
			name: "explicit policyTypes: rules of unlisted directions dropped",
			in: networkingv1.NetworkPolicySpec{
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{}},
			},
			want: objects.PolicySpec{PolicyTypes: []string{"Egress"}},
		},
		{
			name: "podSelector with expressions, empty from = any peer",
			in: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}, MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "tier", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"x"}}}},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: port(5432)}}}},
			},
			want: objects.PolicySpec{
				EndpointSelector: objects.Selector{MatchLabels: map[string]string{"app": "db"}, MatchExpressions: []objects.LabelSelectorRequirement{{Key: "tier", Operator: "NotIn", Values: []string{"x"}}}},
				PolicyTypes:      ingressOnly,
				Ingress:          []objects.IngressRule{{ToPorts: []objects.PortRule{{Port: 5432, Protocol: "TCP"}}}},
			},
		},
		{
			name: "peers: podSelector alone, namespaceSelector alone, both, namespaceSelector {}",
			in: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: app("web")},
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "ops"}}},
				{PodSelector: app("prom"), NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "team", Operator: metav1.LabelSelectorOpIn, Values: []string{"a", "b"}}}}},
				{NamespaceSelector: &metav1.LabelSelector{}},
				{PodSelector: &metav1.LabelSelector{}},
			}}}},
			want: objects.PolicySpec{PolicyTypes: ingressOnly, Ingress: []objects.IngressRule{{FromEndpoints: []objects.Selector{
				{MatchLabels: map[string]string{"app": "web"}},
				{MatchLabels: map[string]string{"kubernetes.io.ns.isthmus.io/metadata.name": "ops"}, MatchExpressions: []objects.LabelSelectorRequirement{nsAny}},
				{MatchLabels: map[string]string{"app": "prom"}, MatchExpressions: []objects.LabelSelectorRequirement{{Key: "ns.isthmus.io/team", Operator: "In", Values: []string{"a", "b"}}, nsAny}},
				{MatchExpressions: []objects.LabelSelectorRequirement{nsAny}},
				{},
			}}}},
		},
		{
			name: "ports: protocols, whole protocol, endPort expanded",
			in: networkingv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{PodSelector: app("dns")}},
				Ports: []networkingv1.NetworkPolicyPort{
					{Port: port(53), Protocol: udp},
					{Protocol: tcp},
					{Port: port(8000), EndPort: ptr(int32(8002))},
					{Port: port(9000), EndPort: ptr(int32(9000 + MaxPortRange - 1)), Protocol: udp},
				},
			}}},
			want: func() objects.PolicySpec {
				ps := []objects.PortRule{{Port: 53, Protocol: "UDP"}, {Protocol: "TCP"}, {Port: 8000, Protocol: "TCP"}, {Port: 8001, Protocol: "TCP"}, {Port: 8002, Protocol: "TCP"}}
				for p := 9000; p < 9000+MaxPortRange; p++ {
					ps = append(ps, objects.PortRule{Port: uint16(p), Protocol: "UDP"})
				}
				return objects.PolicySpec{PolicyTypes: []string{"Ingress", "Egress"}, Egress: []objects.EgressRule{{ToEndpoints: []objects.Selector{{MatchLabels: map[string]string{"app": "dns"}}}, ToPorts: ps}}}
			}(),
		},
		{
			name: "ipBlock: unsupported",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: app("a")}, {IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8"}}}}}},
			err:  "networkpolicy shop/p: spec.ingress[0].from[1].ipBlock: unsupported: ipBlock peers",
		},
		{
			name: "named port: unsupported",
			in:   networkingv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: port(80)}, {Port: ptr(intstr.FromString("http"))}}}}},
			err:  `networkpolicy shop/p: spec.egress[0].ports[1].port: unsupported: named port "http"`,
		},
		{
			name: "SCTP: unsupported",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{}, {Ports: []networkingv1.NetworkPolicyPort{{Port: port(3868), Protocol: sctp}}}}},
			err:  "networkpolicy shop/p: spec.ingress[1].ports[0].protocol: unsupported: SCTP",
		},
		{
			name: "endPort range too large",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: port(1000), EndPort: ptr(int32(1000 + MaxPortRange))}}}}},
			err:  "spec.ingress[0].ports[0].endPort: unsupported: a range of 257 ports (1000-1256); at most 256",
		},
		{
			name: "endPort below port",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: port(1000), EndPort: ptr(int32(999))}}}}},
			err:  "spec.ingress[0].ports[0].endPort: must be 1000-65535 (at least port), got 999",
		},
		{
			name: "endPort without port",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{EndPort: ptr(int32(999))}}}}},
			err:  "spec.ingress[0].ports[0].endPort: needs a port",
		},
		{
			name: "port out of range",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: port(0)}}}}},
			err:  "spec.ingress[0].ports[0].port: must be 1-65535, got 0",
		},
		{
			name: "reserved key in a peer podSelector",
			in: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{
				MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "isthmus.io/namespace", Operator: metav1.LabelSelectorOpExists}},
			}}}}}},
			err: `spec.ingress[0].from[0].podSelector.matchExpressions[0].key: unsupported: label key "isthmus.io/namespace": the isthmus.io prefix is reserved`,
		},
		{
			name: "reserved key in the podSelector",
			in:   networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"isthmus.io/cluster": "c1"}}},
			err:  `spec.podSelector.matchLabels: unsupported: label key "isthmus.io/cluster"`,
		},
		{
			name: "namespace label key too long",
			in: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{
				MatchLabels: map[string]string{strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 60) + "/k": "v"},
			}}}}}},
			err: "spec.ingress[0].from[0].namespaceSelector.matchLabels: unsupported: namespace label key",
		},
		{
			name: "bad operator",
			in: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{
				MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "a", Operator: "Gt", Values: []string{"1"}}},
			}},
			err: `spec.podSelector.matchExpressions[0].operator: unsupported: "Gt"`,
		},
		{
			name: "bad policy type",
			in:   networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{"Ingress", "Both"}},
			err:  `spec.policyTypes[1]: must be Ingress or Egress, got "Both"`,
		},
		{
			name: "empty peer",
			in:   networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{}}}}},
			err:  "spec.ingress[0].from[0]: must have a podSelector, a namespaceSelector or an ipBlock",
		},
		{
			name: "invalid label value surfaces the Isthmus field",
			in:   networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"a": "-"}}},
			err:  `translated policy is invalid: spec.endpointSelector.matchLabels["a"]`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := NetworkPolicy(k8sPolicy(tt.in), "")
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if want := isp(tt.want); !reflect.DeepEqual(got, want) {
				t.Errorf("policy:\n got %+v\nwant %+v", got, want)
			}
		})
	}
	if _, err := NetworkPolicy(nil, ""); err == nil {
		t.Error("nil: no error")
	}
}

// End to end through policy.Compile: the Kubernetes meaning holds on the
// Isthmus engine (namespace selection through the namespace labels in
// identities, default deny without rules).
func TestNetworkPolicyCompiles(t *testing.T) {
	ident := func(id uint32, cluster, ns string, pod, nsLabels map[string]string) identity.Identity {
		l, _ := PodLabels(pod, nsLabels)
		l[identity.LabelNamespace] = ns
		l[identity.LabelCluster] = cluster
		return identity.Identity{ID: id, Labels: l}
	}
	ids := []identity.Identity{
		ident(100, "c1", "shop", map[string]string{"app": "db"}, map[string]string{"kubernetes.io/metadata.name": "shop"}),
		ident(101, "c1", "shop", map[string]string{"app": "web"}, map[string]string{"kubernetes.io/metadata.name": "shop"}),
		ident(200, "c1", "ops", map[string]string{"app": "prom"}, map[string]string{"kubernetes.io/metadata.name": "ops", "team": "a"}),
		ident(201, "c1", "ops", map[string]string{"app": "web"}, map[string]string{"kubernetes.io/metadata.name": "ops", "team": "a"}),
		ident(300, "c1", "dev", map[string]string{"app": "prom"}, map[string]string{"kubernetes.io/metadata.name": "dev", "team": "b"}),
		// Another cluster's pods labelled as c1's admitted ones.
		ident(0x20065, "c2", "shop", map[string]string{"app": "web"}, map[string]string{"kubernetes.io/metadata.name": "shop"}),
		ident(0x200c8, "c2", "ops", map[string]string{"app": "prom"}, map[string]string{"kubernetes.io/metadata.name": "ops", "team": "a"}),
	}
	eps := []policy.Endpoint{{ID: 1, Namespace: "shop", Identity: 100, Labels: ids[0].Labels}, {ID: 2, Namespace: "shop", Identity: 101, Labels: ids[1].Labels}}
	spec := networkingv1.NetworkPolicySpec{
		PodSelector: *app("db"),
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
		Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
			{PodSelector: app("web")}, // shop's web only, not ops' web
			{PodSelector: app("prom"), NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "a"}}}, // ops' prom, not dev's
		}}},
	}
	for _, tt := range []struct {
		peersCluster string
		want         []bpf.PolicyKey
	}{
		{"c1", []bpf.PolicyKey{ // the agent's default: c1's pods only
			{EndpointID: 1, PeerIdentity: 101, Proto: bpf.ProtoAny, Direction: bpf.Ingress},
			{EndpointID: 1, PeerIdentity: 200, Proto: bpf.ProtoAny, Direction: bpf.Ingress},
		}},
		{"", []bpf.PolicyKey{ // mesh-wide: c2's alike-labelled pods too
			{EndpointID: 1, PeerIdentity: 101, Proto: bpf.ProtoAny, Direction: bpf.Ingress},
			{EndpointID: 1, PeerIdentity: 200, Proto: bpf.ProtoAny, Direction: bpf.Ingress},
			{EndpointID: 1, PeerIdentity: 0x20065, Proto: bpf.ProtoAny, Direction: bpf.Ingress},
			{EndpointID: 1, PeerIdentity: 0x200c8, Proto: bpf.ProtoAny, Direction: bpf.Ingress},
		}},
	} {
		np, err := NetworkPolicy(k8sPolicy(spec), tt.peersCluster)
		if err != nil {
			t.Fatal(err)
		}
		res := policy.Compile([]objects.NetworkPolicy{np}, eps, ids, "c1")
		if !reflect.DeepEqual(res.Keys, tt.want) {
			t.Errorf("peers of cluster %q: keys:\n got %v\nwant %v", tt.peersCluster, res.Keys, tt.want)
		}
		if !res.Ingress[1] || !res.Egress[1] || res.Ingress[2] || res.Egress[2] {
			t.Errorf("enforcement: ingress %v egress %v", res.Ingress, res.Egress)
		}
	}
}
