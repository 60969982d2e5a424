package v1alpha1

import (
	"reflect"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

const manifest = `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: db
  namespace: shop
spec:
  policyTypes: [Ingress, Egress]
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: isthmus.io/namespace, operator: Exists}
      - {key: app, operator: In, values: [web]}
    fromEntities: [host]
    toPorts:
    - port: 5432
    - protocol: ICMP
  egress:
  - toEntities: [world]
    toPorts:
    - {port: 53, protocol: UDP}
status:
  observedGeneration: 3
  conditions:
  - {type: Ready, status: "True", reason: Applied, message: "", lastTransitionTime: "2026-01-02T03:04:05Z"}
`

// The path the agent takes: a dynamic client's unstructured object,
// converted through the scheme into the typed object, then ToObject.
func TestUnstructuredToObject(t *testing.T) {
	var m map[string]any
	if err := yaml.Unmarshal([]byte(manifest), &m); err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: m}
	s := runtime.NewScheme()
	if err := AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	obj, err := s.New(u.GroupVersionKind())
	if err != nil {
		t.Fatalf("scheme does not know %v: %v", u.GroupVersionKind(), err)
	}
	np := obj.(*NetworkPolicy)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, np, true); err != nil {
		t.Fatal(err)
	}
	if np.Status.ObservedGeneration != 3 || len(np.Status.Conditions) != 1 || np.Status.Conditions[0].Reason != ReasonApplied {
		t.Errorf("status: %+v", np.Status)
	}
	got, err := np.ToObject()
	if err != nil {
		t.Fatal(err)
	}
	want := objects.NetworkPolicy{
		APIVersion: objects.APIVersion, Kind: objects.KindNetworkPolicy,
		Metadata: objects.Meta{Name: "db", Namespace: "shop"},
		Spec: objects.PolicySpec{
			PolicyTypes:      []string{"Ingress", "Egress"},
			EndpointSelector: objects.Selector{MatchLabels: map[string]string{"app": "db"}},
			Ingress: []objects.IngressRule{{
				FromEndpoints: []objects.Selector{{MatchExpressions: []objects.LabelSelectorRequirement{
					{Key: "isthmus.io/namespace", Operator: "Exists"}, {Key: "app", Operator: "In", Values: []string{"web"}},
				}}},
				FromEntities: []string{"host"},
				ToPorts:      []objects.PortRule{{Port: 5432, Protocol: "TCP"}, {Protocol: "ICMP"}},
			}},
			Egress: []objects.EgressRule{{ToEntities: []string{"world"}, ToPorts: []objects.PortRule{{Port: 53, Protocol: "UDP"}}}},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ToObject:\n got %+v\nwant %+v", got, want)
	}

	// And back: typed to unstructured keeps the group/version/kind.
	back, err := runtime.DefaultUnstructuredConverter.ToUnstructured(np)
	if err != nil {
		t.Fatal(err)
	}
	if back["apiVersion"] != "isthmus.io/v1alpha1" || back["kind"] != "NetworkPolicy" {
		t.Errorf("round trip: %v %v", back["apiVersion"], back["kind"])
	}

	// DeepCopy is deep.
	cp := np.DeepCopy()
	cp.Spec.Ingress[0].FromEndpoints[0].MatchExpressions[0].Key = "changed"
	if np.Spec.Ingress[0].FromEndpoints[0].MatchExpressions[0].Key == "changed" {
		t.Error("DeepCopy shares memory")
	}
}

func TestToObjectErrors(t *testing.T) {
	base := func(f func(*NetworkPolicy)) *NetworkPolicy {
		p := &NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "shop"}, Spec: NetworkPolicySpec{PolicyTypes: []PolicyType{"Ingress"}}}
		f(p)
		return p
	}
	tests := []struct {
		name string
		p    *NetworkPolicy
		err  string
	}{
		{"nil", nil, "networkpolicy: nil"},
		{"no rules, no policyTypes", base(func(p *NetworkPolicy) { p.Spec.PolicyTypes = nil }), "spec: needs at least one ingress or egress rule, or policyTypes"},
		{"port out of range", base(func(p *NetworkPolicy) { p.Spec.Ingress = []IngressRule{{ToPorts: []PortRule{{Port: 70000}}}} }), "spec.ingress[0].toPorts[0].port: must be 0-65535, got 70000"},
		{"bad entity", base(func(p *NetworkPolicy) { p.Spec.Ingress = []IngressRule{{FromEntities: []Entity{"nodes"}}} }), `spec.ingress[0].fromEntities[0]: must be one of host, remote-node, world, all, cluster, got "nodes"`},
		{"bad operator", base(func(p *NetworkPolicy) {
			p.Spec.EndpointSelector.MatchExpressions = []LabelSelectorRequirement{{Key: "a", Operator: "Gt"}}
		}), `spec.endpointSelector.matchExpressions[0].operator`},
		{"egress rules not enforced", base(func(p *NetworkPolicy) { p.Spec.Egress = []EgressRule{{}} }), "spec.egress: has rules but spec.policyTypes does not list Egress"},
	}
	for _, tt := range tests {
		_, err := tt.p.ToObject()
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("%s: err = %v, want containing %q", tt.name, err, tt.err)
		}
	}
}
