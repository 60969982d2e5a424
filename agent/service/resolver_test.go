package service

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// The Resolver gives what Resolve and Merge give from scratch, after any
// sequence of changes: services added, changed (selector, VIP, annotations,
// explicit backends), removed, two of them contending for a VIP; endpoints
// coming, relabelled, readdressed, going, given as a new list or as
// changes (ChangeEndpoints); remote records of global services changing.
func TestResolverMatchesResolve(t *testing.T) {
	for seed := range uint64(30) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { checkResolver(t, seed) })
	}
}

func checkResolver(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 2))
	vals := []string{"a", "b", "c"}
	labels := func() identity.Labels {
		l := identity.Labels{}
		for _, k := range []string{"app", "tier"} {
			if rng.IntN(3) > 0 {
				l[k] = vals[rng.IntN(3)]
			}
		}
		return l
	}
	newSvc := func(i int) objects.Service {
		sel := map[string]string{}
		for k, v := range labels() {
			sel[k] = v
		}
		// Few VIPs, so that services contend for them.
		vip := []string{fmt.Sprintf("10.96.0.%d", rng.IntN(8)+1)}
		if rng.IntN(2) == 0 {
			vip = append(vip, fmt.Sprintf("fd00:96::%d", rng.IntN(8)+1))
		}
		s := svc([]string{"default", "prod"}[rng.IntN(2)], fmt.Sprint("s", i), vip, []objects.ServicePort{{Name: "http", Port: 80, TargetPort: 8080}}, sel)
		if rng.IntN(3) == 0 {
			s.Metadata.Annotations = map[string]string{AnnotationGlobal: "true", AnnotationAffinity: []string{"local", "remote", "none"}[rng.IntN(3)]}
		}
		if rng.IntN(4) == 0 {
			s.Spec.Backends = append(s.Spec.Backends, objects.ExplicitBackend{IP: fmt.Sprintf("192.0.2.%d", rng.IntN(9)+1)})
		}
		return s
	}
	addr := func() netip.Addr {
		if rng.IntN(3) == 0 {
			return netip.AddrFrom16([16]byte{0xfd, 0, 15: byte(rng.IntN(50) + 1)})
		}
		return netip.AddrFrom4([4]byte{10, 0, 0, byte(rng.IntN(50) + 1)})
	}
	// Every change is a new object, as in the agent's immutable
	// snapshots; even seeds hand the objects to Update as sources; seeds
	// 7, 11, 19, 23 hand them as a snapshot with the keys changed per
	// generation (UpdateObjects), seeds 3, 15, 27 as a snapshot without.
	svcs := map[string]*objects.Service{}
	var svcGen uint64 = 1
	changes := map[uint64][]string{} // the keys changed to reach each svcGen
	changedSince := func(since uint64) ([]string, bool) {
		var keys []string
		for g := since + 1; g <= svcGen; g++ {
			keys = append(keys, changes[g]...)
		}
		return keys, true
	}
	eps := map[string]Endpoint{}
	var remote []records.ServiceRecord
	r := NewResolver()
	var epGen, remoteGen uint64 = 1, 1
	selected := 0
	for step := range 400 {
		switch rng.IntN(8) {
		case 0, 1:
			i := rng.IntN(12)
			svcGen++
			if old, ok := svcs[fmt.Sprint(i)]; ok {
				changes[svcGen] = append(changes[svcGen], objects.Key(old))
			}
			if _, ok := svcs[fmt.Sprint(i)]; ok && rng.IntN(3) == 0 {
				delete(svcs, fmt.Sprint(i))
			} else {
				s := newSvc(i)
				svcs[fmt.Sprint(i)] = &s
				changes[svcGen] = append(changes[svcGen], objects.Key(&s))
			}
		case 2, 3, 4:
			// Half of the changes go in as such (ChangeEndpoints, the
			// generation kept), a few at a time; the others as a new list.
			delta := rng.IntN(2) == 0
			changed := map[string]bool{}
			for range 1 + rng.IntN(3) {
				k := fmt.Sprint("ep", rng.IntN(40))
				changed[k] = true
				if _, ok := eps[k]; ok && rng.IntN(3) == 0 {
					delete(eps, k)
				} else {
					eps[k] = Endpoint{Key: k, Namespace: []string{"default", "prod"}[rng.IntN(2)], Labels: labels(), IPs: []netip.Addr{addr()}}
				}
			}
			if delta {
				var ups []Endpoint
				var gone []string
				for k := range changed {
					if ep, ok := eps[k]; ok {
						ups = append(ups, ep)
					} else {
						gone = append(gone, k)
					}
				}
				r.ChangeEndpoints(ups, gone)
			} else {
				epGen++
			}
		case 5:
			remote = nil
			for c := range uint32(rng.IntN(3)) {
				remote = append(remote, rec(fmt.Sprint("c", c+2), c+2, fmt.Sprint("s", rng.IntN(12)), true, rng.IntN(4) > 0,
					records.Backend{IP: netip.AddrFrom4([4]byte{10, byte(c + 2), 0, byte(rng.IntN(5) + 1)}), Port: 8080, PortName: "http"}))
			}
			remoteGen++
		default:
			// no change: the generations stay
		}
		var sl []objects.Service
		var src []*objects.Service
		for _, s := range svcs {
			sl, src = append(sl, *s), append(src, s)
		}
		if seed%2 == 1 {
			src = nil
		}
		el := slices.Collect(maps.Values(eps))
		var got map[bpf.Frontend][]bpf.Backend
		var touched []bpf.Frontend
		if seed%4 == 3 {
			objs := map[string]objects.Object{"NetworkPolicy/default/other": &objects.NetworkPolicy{}}
			for _, s := range svcs {
				objs[objects.Key(s)] = s
			}
			changed := changedSince
			if seed%3 == 0 {
				changed = nil
			}
			got, touched = r.UpdateObjects(objs, changed, svcGen, el, epGen, remote, remoteGen)
		} else {
			got, touched = r.Update(sl, src, svcGen, el, epGen, remote, remoteGen)
		}
		want := Merge(Resolve(sl, el), sl, remote)
		if !maps.EqualFunc(got, want, func(a, b []bpf.Backend) bool { return slices.Equal(a, b) }) {
			t.Fatalf("step %d: resolver\n %v\nfrom scratch\n %v", step, got, want)
		}
		for _, bs := range want {
			selected += len(bs)
		}
		_ = touched
	}
	if selected == 0 {
		t.Fatal("nothing was ever selected: the test checks nothing")
	}
}

// A changed endpoint touches only the services that select it.
func TestResolverTouchesOnlySelectors(t *testing.T) {
	var svcs []objects.Service
	var eps []Endpoint
	for i := range 100 {
		svcs = append(svcs, svc("default", fmt.Sprint("s", i), []string{fmt.Sprintf("10.96.0.%d", i+1)}, []objects.ServicePort{{Port: 80}}, map[string]string{"app": fmt.Sprint("g", i%10)}))
	}
	for i := range 50 {
		eps = append(eps, Endpoint{Key: fmt.Sprint("ep", i), Namespace: "default", Labels: identity.Labels{"app": fmt.Sprint("g", i%10)}, IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)})}})
	}
	r := NewResolver()
	if _, touched := r.Update(svcs, nil, 1, eps, 1, nil, 1); len(touched) != 100 {
		t.Fatalf("first update touched %d frontends, want 100", len(touched))
	}
	if _, touched := r.Update(svcs, nil, 1, eps, 1, nil, 1); len(touched) != 0 {
		t.Fatalf("unchanged inputs touched %d frontends", len(touched))
	}
	eps[3].IPs = []netip.Addr{netip.MustParseAddr("10.0.1.3")} // app=g3: 10 services
	out, touched := r.Update(svcs, nil, 1, eps, 2, nil, 1)
	if len(touched) != 10 {
		t.Fatalf("one endpoint touched %d frontends, want the 10 of g3's services", len(touched))
	}
	if bs := out[fe("10.96.0.4", 80, bpf.ProtoTCP)]; !slices.Contains(bs, bpf.Backend{Addr: netip.MustParseAddr("10.0.1.3"), Port: 80}) {
		t.Errorf("g3's service: %v", bs)
	}
}
