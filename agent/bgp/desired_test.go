package bgp

import (
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

func decode(t *testing.T, yaml string) desired.Objects {
	t.Helper()
	objs, err := objects.Decode([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	set := desired.Objects{}
	for _, o := range objs {
		set[objects.Key(o)] = o
	}
	return set
}

const policies = `apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata: {name: b-rack}
spec:
  nodeSelector: {matchLabels: {rack: r1}}
  localASN: 65010
  neighbors: [{address: 10.0.0.1, peerASN: 65000, passwordFile: PWFILE}]
  advertisements:
    - type: PodCIDR
    - {type: ExternalIP, selector: {matchLabels: {bgp: "on"}}, communities: ["1:1"], localPreference: 100}
    - {type: ExternalIP, communities: ["2:2", "1:1"], localPreference: 50}
    - {type: LoadBalancerIP, selector: {matchLabels: {bgp: "on"}}}
---
apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata: {name: c-other}
spec:
  localASN: 65099
  neighbors: [{address: 10.0.0.9, peerASN: 65000}]
---
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop, labels: {bgp: "on"}}
spec:
  vips: [10.96.0.1]
  ports: [{port: 80}]
  selector: {app: web}
  externalIPs: [192.0.2.1, "2001:db8::1"]
---
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: local, labels: {bgp: "on"}}
spec:
  vips: [10.96.0.2]
  ports: [{port: 80}]
  selector: {app: local}
  externalIPs: [192.0.2.2]
  externalTrafficPolicy: Local
---
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: explicit, labels: {bgp: "on"}}
spec:
  vips: [10.96.0.3]
  ports: [{port: 80}]
  backends: [{ip: 10.1.1.7}]
  externalIPs: [192.0.2.3]
  externalTrafficPolicy: Local
`

func TestDerive(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte(" s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	objs := decode(t, strings.Replace(policies, "PWFILE", pw, 1))
	// LB-IPAM's assignment reaches the service through its status.
	objs["Service/shop/web"].(*objects.Service).Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: "198.51.100.1"}}
	in := Input{Objects: objs, NodeLabels: map[string]string{"rack": "r1"},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24"), netip.MustParsePrefix("fd00:1:0:1::/64")},
		NodeIPs:  []netip.Addr{netip.MustParseAddr("fd10::b"), netip.MustParseAddr("10.101.0.11")}}

	plan := Derive(in)
	if plan.Policy != "b-rack" || !slices.Equal(plan.Ignored, []string{"c-other"}) {
		t.Fatalf("policy %q ignored %v", plan.Policy, plan.Ignored)
	}
	c := plan.Config
	if c.ASN != 65010 || c.RouterID != netip.MustParseAddr("10.101.0.11") || len(c.Peers) != 1 || c.Peers[0].Password != "s3cret" {
		t.Fatalf("config %+v", c)
	}
	var got []string
	for _, p := range c.Paths {
		got = append(got, p.Prefix.String())
	}
	// No Local service has a local backend; the LB address is announced
	// by the LoadBalancerIP advertisement only.
	want := []string{"10.1.1.0/24", "192.0.2.1/32", "198.51.100.1/32", "2001:db8::1/128", "fd00:1:0:1::/64"}
	if !slices.Equal(got, want) {
		t.Fatalf("paths %v, want %v", got, want)
	}
	web := c.Paths[1]
	if !slices.Equal(web.Communities, []uint32{1<<16 | 1, 2<<16 | 2}) || web.LocalPref != 100 {
		t.Errorf("merged attributes of 192.0.2.1: %+v", web)
	}
	if lb := c.Paths[2]; len(lb.Communities) != 0 || !slices.Equal(plan.Sources[lb.Prefix], []string{"LoadBalancerIP shop/web"}) {
		t.Errorf("LB path %+v sources %v", lb, plan.Sources[lb.Prefix])
	}

	// A local backend: a selected endpoint, then an explicit backend.
	in.Endpoints = []state.Endpoint{{Name: "l", Namespace: "default", Labels: map[string]string{"app": "local"}, IPs: []netip.Addr{netip.MustParseAddr("10.1.1.5")}}}
	if !hasPath(Derive(in), "192.0.2.2/32") || hasPath(Derive(in), "192.0.2.3/32") {
		t.Error("Local service with a selected local endpoint not announced (or the explicit one announced)")
	}
	in.Endpoints[0].Namespace = "shop" // same labels, other namespace: not selected
	if hasPath(Derive(in), "192.0.2.2/32") {
		t.Error("Local service announced for an endpoint of another namespace")
	}
	in.Endpoints[0].IPs = []netip.Addr{netip.MustParseAddr("10.1.1.7")}
	if !hasPath(Derive(in), "192.0.2.3/32") {
		t.Error("Local service whose explicit backend is a local endpoint not announced")
	}

	// Unselected node: no speaker. Missing password file: the reason.
	in.NodeLabels = map[string]string{"rack": "r2"}
	if p := Derive(in); p.Policy != "c-other" || len(p.Config.Paths) != 0 {
		t.Errorf("node r2: %+v", p)
	}
	os.Remove(pw)
	in.NodeLabels = map[string]string{"rack": "r1"}
	if p := Derive(in).Config.Peers[0]; p.Password != "" || !strings.Contains(p.PasswordError, "no such file") {
		t.Errorf("missing password file: %+v", p)
	}
	in.NodeIPs = []netip.Addr{netip.MustParseAddr("fd10::b")}
	if p := Derive(in); p.Err == "" || p.Config.Enabled() {
		t.Errorf("no IPv4 for the router ID: %+v", p)
	}
}

func hasPath(p Plan, s string) bool {
	for _, x := range p.Config.Paths {
		if x.Prefix.String() == s {
			return true
		}
	}
	return false
}

// The reconciler's memoized derive gives what Derive gives, run after
// run, as services come, change (new objects, as snapshots give them), go,
// as the endpoints behind a Local service come and go, and as the policy
// changes; an unchanged service is taken from the memo.
func TestDeriveMemoEqualsDerive(t *testing.T) {
	objs := decode(t, strings.Replace(policies, "passwordFile: PWFILE", "", 1))
	in := Input{Objects: objs, NodeLabels: map[string]string{"rack": "r1"},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}, NodeIPs: []netip.Addr{netip.MustParseAddr("10.101.0.11")}}
	var m memo
	check := func(step string) {
		t.Helper()
		got, want := derive(in, &m), Derive(in)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: memoized\n %+v\nDerive\n %+v", step, got, want)
		}
		if len(want.Config.Paths) == 0 {
			t.Fatalf("%s: no paths: the comparison checks nothing", step)
		}
	}
	with := func(key string, edit func(s *objects.Service)) {
		next := maps.Clone(in.Objects)
		c := *next[key].(*objects.Service)
		edit(&c)
		next[key] = &c
		in.Objects = next
	}
	check("first")
	check("nothing changed")
	web := m.svcs[in.Objects["Service/shop/web"].(*objects.Service)]
	if len(web) == 0 {
		t.Fatal("web's announcements are not in the memo")
	}
	with("Service/shop/web", func(s *objects.Service) {
		s.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: "198.51.100.1"}}
	})
	check("web got a load-balancer address")
	with("Service/shop/web", func(s *objects.Service) { s.Metadata.Labels = nil })
	check("web no longer selected by the labelled advertisements")
	in.Endpoints = []state.Endpoint{{Name: "l", Namespace: "default", Labels: map[string]string{"app": "local"}}}
	check("a local backend for the Local service")
	in.Endpoints = nil
	check("the local backend went")
	next := maps.Clone(in.Objects)
	delete(next, "Service/default/explicit")
	in.Objects = next
	check("a service deleted")
	pol := *in.Objects["BGPPeeringPolicy/default/b-rack"].(*objects.BGPPeeringPolicy)
	pol.Spec.Advertisements = slices.Clone(pol.Spec.Advertisements)
	pol.Spec.Advertisements[2].Communities = []string{"3:3"}
	next = maps.Clone(in.Objects)
	next["BGPPeeringPolicy/default/b-rack"] = &pol
	in.Objects = next
	check("the policy's communities changed")
}
