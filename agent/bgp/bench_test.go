package bgp

import (
	"fmt"
	"maps"
	"net/netip"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// One reconcile run with 10,000 LoadBalancer services of which one
// changed: the deriver (what a run does now) against Derive from scratch
// (what a run did). go test -run '^$' -bench Derive ./agent/bgp/
func BenchmarkDeriveOneChangeOf10000(b *testing.B) {
	objs := desired.Objects{}
	pol := &objects.BGPPeeringPolicy{Kind: objects.KindBGPPeeringPolicy, Metadata: objects.Meta{Name: "tor", Namespace: "default"}}
	pol.Spec.LocalASN, pol.Spec.RouterID = 65010, "10.0.0.1"
	pol.Spec.Advertisements = []objects.BGPAdvertisement{{Type: objects.AdvertisePodCIDR}, {Type: objects.AdvertiseLoadBalancerIP}}
	objs[objects.Key(pol)] = pol
	svc := func(i, ip int) *objects.Service {
		s := &objects.Service{Kind: objects.KindService, Metadata: objects.Meta{Name: fmt.Sprintf("vip-%05d", i), Namespace: "default"}}
		s.Spec.Type, s.Spec.VIPs, s.Spec.Ports = objects.ServiceTypeLoadBalancer, []string{"10.98.0.1"}, []objects.ServicePort{{Port: 80}}
		s.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: netip.AddrFrom4([4]byte{100, 64, byte(ip >> 8), byte(ip)}).String()}}
		return s
	}
	for i := range 10000 {
		objs[objects.Key(svc(i, i))] = svc(i, i)
	}
	in := Input{Objects: objs, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}}
	// The snapshots are built by the tables either way: made before the
	// clock starts.
	snaps := func(n int) ([]desired.Objects, []string) {
		var out []desired.Objects
		var keys []string
		for i := range n {
			next := maps.Clone(in.Objects)
			s := svc(i%10000, 20000+i%2)
			next[objects.Key(s)] = s
			out, keys = append(out, next), append(keys, objects.Key(s))
		}
		return out, keys
	}
	b.Run("deriver", func(b *testing.B) {
		d := newDeriver()
		d.update(in, nil, false, true, false)
		d.take()
		next, keys := snaps(b.N)
		b.ResetTimer()
		for i := range b.N {
			d.update(Input{Objects: next[i], PodCIDRs: in.PodCIDRs}, keys[i:i+1], true, false, false)
			d.take()
		}
	})
	b.Run("from-scratch", func(b *testing.B) {
		next, _ := snaps(b.N)
		b.ResetTimer()
		for i := range b.N {
			Derive(Input{Objects: next[i], PodCIDRs: in.PodCIDRs})
		}
	})
}
