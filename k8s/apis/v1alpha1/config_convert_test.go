package v1alpha1

import (
	"reflect"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// decodeCR turns a custom resource manifest into its typed object, the
// way the clustermesh server does (unstructured, then the scheme).
func decodeCR(t *testing.T, manifest string) runtime.Object {
	t.Helper()
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
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(u.Object, obj, true); err != nil {
		t.Fatal(err)
	}
	return obj
}

// Each custom resource converts to exactly what `isthmus apply` stores
// for the same YAML (objects.Decode: defaults filled in, validated), so
// the server's etcd keys are the same whichever way an object came.
func TestConfigKindsMatchApply(t *testing.T) {
	tests := []struct {
		name, cr string
		apply    string // the standalone YAML of the same object
	}{
		{"pool", `apiVersion: isthmus.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: public, labels: {tier: edge}}
spec:
  blocks: [{cidr: 198.51.100.0/28}, {start: "2001:db8::10", stop: "2001:db8::1f"}]
  serviceSelector: {matchLabels: {expose: "yes"}}
  disabled: true
status: {conditions: [{type: Ready, status: "True", reason: Applied, message: "", lastTransitionTime: "2026-01-02T03:04:05Z"}]}
`, `apiVersion: isthmus.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: public, labels: {tier: edge}}
spec:
  blocks: [{cidr: 198.51.100.0/28}, {start: "2001:db8::10", stop: "2001:db8::1f"}]
  serviceSelector: {matchLabels: {expose: "yes"}}
  disabled: true
`},
		{"bgp", `apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata: {name: tor}
spec:
  nodeSelector: {matchExpressions: [{key: rack, operator: In, values: [r1]}]}
  localASN: 4200000000
  routerID: 192.0.2.1
  neighbors:
  - {address: "2001:db8::0001", peerASN: 65001, timers: {holdTimeSeconds: 9}, gracefulRestart: {enabled: true}}
  - {address: 192.0.2.254, peerASN: 65002, port: 1179, ebgpMultihopTTL: 3, passwordFile: /etc/bgp/pw}
  advertisements:
  - {type: PodCIDR}
  - {type: LoadBalancerIP, selector: {matchLabels: {a: b}}, communities: [No-Export, "65000:1:2"], localPreference: 200}
`, `apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata: {name: tor}
spec:
  nodeSelector: {matchExpressions: [{key: rack, operator: In, values: [r1]}]}
  localASN: 4200000000
  routerID: 192.0.2.1
  neighbors:
  - {address: "2001:db8::0001", peerASN: 65001, timers: {holdTimeSeconds: 9}, gracefulRestart: {enabled: true}}
  - {address: 192.0.2.254, peerASN: 65002, port: 1179, ebgpMultihopTTL: 3, passwordFile: /etc/bgp/pw}
  advertisements:
  - {type: PodCIDR}
  - {type: LoadBalancerIP, selector: {matchLabels: {a: b}}, communities: [No-Export, "65000:1:2"], localPreference: 200}
`},
		{"l2", `apiVersion: isthmus.io/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: lan}
spec:
  interfaceRegex: "eth[0-9]+"
  externalIPs: false
  serviceSelector: {matchLabels: {isthmus.io/namespace: shop}}
`, `apiVersion: isthmus.io/v1alpha1
kind: L2AnnouncementPolicy
metadata: {name: lan}
spec:
  interfaceRegex: "eth[0-9]+"
  externalIPs: false
  serviceSelector: {matchLabels: {isthmus.io/namespace: shop}}
`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, err := objects.Decode([]byte(tt.apply))
			if err != nil || len(want) != 1 {
				t.Fatalf("objects.Decode: %v %v", want, err)
			}
			var got objects.Object
			switch o := decodeCR(t, tt.cr).(type) {
			case *LoadBalancerIPPool:
				v, err := o.ToObject()
				if err != nil {
					t.Fatal(err)
				}
				got = &v
			case *BGPPeeringPolicy:
				v, err := o.ToObject()
				if err != nil {
					t.Fatal(err)
				}
				got = &v
			case *L2AnnouncementPolicy:
				v, err := o.ToObject()
				if err != nil {
					t.Fatal(err)
				}
				got = &v
			default:
				t.Fatalf("decoded into %T", o)
			}
			if !reflect.DeepEqual(got, want[0]) {
				t.Errorf("ToObject:\n got %+v\nwant %+v (objects.Decode of the same YAML)", got, want[0])
			}
		})
	}

	// ExternalWorkload has its own decoder (isthmus vm apply).
	w := decodeCR(t, `apiVersion: isthmus.io/v1alpha1
kind: ExternalWorkload
metadata: {name: db1, namespace: shop, labels: {app: db}}
spec: {ipv4: 10.200.0.7}
`).(*ExternalWorkload)
	got, err := w.ToObject()
	if err != nil {
		t.Fatal(err)
	}
	want, err := objects.DecodeExternalWorkload([]byte("apiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\nmetadata: {name: db1, namespace: shop, labels: {app: db}}\nspec: {ipv4: 10.200.0.7}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ExternalWorkload:\n got %+v\nwant %+v", got, want)
	}

	// DeepCopy is deep.
	b := decodeCR(t, tests[1].cr).(*BGPPeeringPolicy)
	cp := b.DeepCopy()
	*cp.Spec.Neighbors[0].Timers.HoldTimeSeconds = 30
	cp.Spec.Advertisements[1].Communities[0] = "changed"
	if *b.Spec.Neighbors[0].Timers.HoldTimeSeconds != 9 || b.Spec.Advertisements[1].Communities[0] != "No-Export" {
		t.Error("DeepCopy shares memory")
	}
}

// What the schema cannot say is refused by ToObject with the field named,
// as `isthmus apply` names it; what it can say is checked again (objects
// that did not come through an API server).
func TestConfigKindsToObjectErrors(t *testing.T) {
	i32 := func(v int32) *int32 { return &v }
	f := false
	pool := func(blocks ...PoolBlock) error {
		p := &LoadBalancerIPPool{Spec: LoadBalancerIPPoolSpec{Blocks: blocks}}
		p.Name = "p"
		_, err := p.ToObject()
		return err
	}
	pool1 := &LoadBalancerIPPool{Spec: LoadBalancerIPPoolSpec{Blocks: []PoolBlock{{CIDR: "10.0.0.0/24"}}}}
	pool1.Name = "p"
	_, poolNoName := (&LoadBalancerIPPool{Spec: pool1.Spec}).ToObject()
	bgp := func(f func(*BGPPeeringPolicySpec)) error {
		p := &BGPPeeringPolicy{Spec: BGPPeeringPolicySpec{LocalASN: 65000, Neighbors: []BGPNeighbor{{Address: "192.0.2.1", PeerASN: 65001}}}}
		p.Name = "b"
		f(&p.Spec)
		_, err := p.ToObject()
		return err
	}
	l2 := func(s L2AnnouncementPolicySpec) error {
		p := &L2AnnouncementPolicy{Spec: s}
		p.Name = "l"
		_, err := p.ToObject()
		return err
	}
	ew := func(name string, s ExternalWorkloadSpec) error {
		w := &ExternalWorkload{Spec: s}
		w.Name, w.Namespace = name, "shop"
		_, err := w.ToObject()
		return err
	}
	var nilPool *LoadBalancerIPPool
	_, nilErr := nilPool.ToObject()
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"nil", nilErr, "loadbalancerippool: nil"},
		{"pool without a name", poolNoName, "metadata.name"},
		{"overlapping blocks", func() error {
			p := pool1.DeepCopy()
			p.Spec.Blocks = append(p.Spec.Blocks, PoolBlock{Start: "10.0.0.200", Stop: "10.0.1.3"})
			_, err := p.ToObject()
			return err
		}(), "spec.blocks[1]: 10.0.0.200-10.0.1.3 overlaps spec.blocks[0] (10.0.0.0-10.0.0.255)"},
		{"host bits", pool(PoolBlock{CIDR: "10.0.0.1/24"}), "has host bits set"},
		{"AS_TRANS", bgp(func(s *BGPPeeringPolicySpec) { s.LocalASN = 23456 }), "spec.localASN: 23456 is AS_TRANS"},
		{"ASN out of range", bgp(func(s *BGPPeeringPolicySpec) { s.LocalASN = 1 << 33 }), "spec.localASN: must be 0-4294967295, got 8589934592"},
		{"duplicate neighbour", bgp(func(s *BGPPeeringPolicySpec) {
			s.Neighbors = append(s.Neighbors, BGPNeighbor{Address: "192.0.2.1", PeerASN: 65003})
		}), "spec.neighbors[1].address: 192.0.2.1 is already listed as spec.neighbors[0]"},
		{"keepalive above hold", bgp(func(s *BGPPeeringPolicySpec) {
			s.Neighbors[0].Timers = BGPTimers{HoldTimeSeconds: i32(9), KeepaliveTimeSeconds: i32(9)}
		}), "spec.neighbors[0].timers.keepaliveTimeSeconds: must be 1 to less than the hold time (9), got 9"},
		{"timer out of range", bgp(func(s *BGPPeeringPolicySpec) { s.Neighbors[0].Timers.HoldTimeSeconds = i32(70000) }), "spec.neighbors[0].timers.holdTimeSeconds: must be 0-65535"},
		{"bad community", bgp(func(s *BGPPeeringPolicySpec) {
			s.Advertisements = []BGPAdvertisement{{Type: "PodCIDR", Communities: []string{"70000:1"}}}
		}), "spec.advertisements[0].communities[0]"},
		{"bad regex", l2(L2AnnouncementPolicySpec{InterfaceRegex: "eth("}), "spec.interfaceRegex: not a valid regular expression"},
		{"both interface fields", l2(L2AnnouncementPolicySpec{InterfaceRegex: "eth0", Interfaces: []string{"eth0"}}), "give interfaces or interfaceRegex, not both"},
		{"announces nothing", l2(L2AnnouncementPolicySpec{Interfaces: []string{"eth0"}, LoadBalancerIPs: &f, ExternalIPs: &f}), "would announce nothing"},
		{"workload name too long", ew(strings.Repeat("a", 61), ExternalWorkloadSpec{}), "metadata.name: must be at most 60 characters"},
		{"workload ipv4 of the wrong family", ew("db1", ExternalWorkloadSpec{IPv4: "2001:db8::1"}), "spec.ipv4: 2001:db8::1 is not an IPv4 address"},
	}
	for _, tt := range tests {
		if tt.err == nil || !strings.Contains(tt.err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want containing %q", tt.name, tt.err, tt.want)
		}
	}
}
