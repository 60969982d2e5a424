package bgp

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/state"
	speaker "github.com/isthmus-mesh/isthmus/bgp"
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

// The reconciler's incremental deriver, told what changed, hands the
// speaker what Derive computes from scratch, after every step of random
// sequences of services added, changed (new objects, as snapshots give
// them) and deleted, endpoints behind Local services coming and going,
// and policy edits; the paths it hands over as changes, applied to what
// it handed before, are Derive's paths, and so are its sources.
func TestDeriverMatchesDerive(t *testing.T) {
	objs := decode(t, strings.Replace(policies, "passwordFile: PWFILE", "", 1))
	in := Input{Objects: objs, NodeLabels: map[string]string{"rack": "r1"},
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}, NodeIPs: []netip.Addr{netip.MustParseAddr("10.101.0.11")}}
	for seed := range int64(20) {
		rng := rand.New(rand.NewPCG(uint64(seed), 1))
		in.Objects, in.Endpoints = objs, nil
		d := newDeriver()
		handed := map[netip.Prefix]speaker.Path{} // what the speaker was given
		check := func(step string, changed []string, known, endpoints bool) {
			t.Helper()
			d.update(in, changed, known, endpoints, false)
			set, del := d.take()
			for _, pfx := range del {
				delete(handed, pfx)
			}
			for _, p := range set {
				handed[p.Prefix] = p
			}
			want := Derive(in)
			got := slices.SortedFunc(maps.Values(handed), byPrefix)
			if !reflect.DeepEqual(got, want.Config.Paths) && (len(got) > 0 || len(want.Config.Paths) > 0) {
				t.Fatalf("seed %d, %s: handed to the speaker\n %+v\nDerive\n %+v", seed, step, got, want.Config.Paths)
			}
			plan := d.plan
			plan.Config.Paths, want.Config.Paths = nil, nil
			wantSrc := want.Sources
			plan.Sources, want.Sources = nil, nil
			if !reflect.DeepEqual(plan, want) {
				t.Fatalf("seed %d, %s: plan\n %+v\nDerive\n %+v", seed, step, plan, want)
			}
			for pfx, src := range wantSrc {
				if g := d.sources(pfx); !slices.Equal(slices.Sorted(slices.Values(g)), slices.Sorted(slices.Values(src))) {
					t.Fatalf("seed %d, %s: sources of %s: %v, Derive %v", seed, step, pfx, g, src)
				}
			}
			if len(d.paths) != len(got) {
				t.Fatalf("seed %d, %s: %d paths kept, %d handed", seed, step, len(d.paths), len(got))
			}
		}
		check("first", nil, false, true)
		for i := range 60 {
			next := maps.Clone(in.Objects)
			var changed []string
			endpoints := false
			switch op := rng.IntN(10); {
			case op < 6: // a service added or replaced
				k := fmt.Sprintf("svc%d", rng.IntN(8))
				s := &objects.Service{Metadata: objects.Meta{Name: k, Namespace: "default", Labels: map[string]string{}}}
				s.Kind, s.APIVersion = objects.KindService, "isthmus.io/v1alpha1"
				s.Spec.VIPs = []string{fmt.Sprintf("10.96.1.%d", rng.IntN(8))}
				s.Spec.Ports = []objects.ServicePort{{Port: 80}}
				s.Spec.Selector = map[string]string{"app": fmt.Sprintf("a%d", rng.IntN(3))}
				if rng.IntN(2) == 0 {
					s.Metadata.Labels["bgp"] = "on"
				}
				for range rng.IntN(3) {
					s.Spec.ExternalIPs = append(s.Spec.ExternalIPs, fmt.Sprintf("192.0.2.%d", rng.IntN(6)))
				}
				if rng.IntN(2) == 0 {
					s.Spec.Type = objects.ServiceTypeLoadBalancer
					s.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: fmt.Sprintf("198.51.100.%d", rng.IntN(6))}}
				}
				if rng.IntN(3) == 0 {
					s.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
				}
				next[objects.Key(s)] = s
				changed = append(changed, objects.Key(s))
			case op < 8: // a service deleted
				for k := range next {
					if strings.HasPrefix(k, "Service/") {
						delete(next, k)
						changed = append(changed, k)
						break
					}
				}
			case op < 9: // a local endpoint came or went
				if len(in.Endpoints) > 0 && rng.IntN(2) == 0 {
					in.Endpoints = in.Endpoints[1:]
				} else {
					in.Endpoints = append(slices.Clip(in.Endpoints), state.Endpoint{Name: fmt.Sprint(i), Namespace: "default",
						Labels: map[string]string{"app": fmt.Sprintf("a%d", rng.IntN(3))}, IPs: []netip.Addr{netip.MustParseAddr("10.1.1.5")}})
				}
				endpoints = true
			default: // the policy's communities and preference changed
				pol := *next["BGPPeeringPolicy/default/b-rack"].(*objects.BGPPeeringPolicy)
				pol.Spec.Advertisements = slices.Clone(pol.Spec.Advertisements)
				pol.Spec.Advertisements[2].Communities = []string{fmt.Sprintf("%d:3", rng.IntN(3))}
				lp := uint32(rng.IntN(200))
				pol.Spec.Advertisements[3].LocalPreference = &lp
				next["BGPPeeringPolicy/default/b-rack"] = &pol
				changed = append(changed, "BGPPeeringPolicy/default/b-rack")
			}
			in.Objects = next
			check(fmt.Sprintf("step %d", i), changed, true, endpoints)
		}
	}
}

// byPrefix is Derive's order of the paths.
func byPrefix(a, b speaker.Path) int {
	if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
		return c
	}
	return a.Prefix.Bits() - b.Prefix.Bits()
}
