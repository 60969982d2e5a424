package lbipam

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// takenBy is the Taken index of svcs and prev, built from scratch as a
// caller could keep it.
func takenBy(svcs []objects.Service, prev Result) func(netip.Addr) bool {
	t := NewTaken()
	for i := range svcs {
		t.Reserve(&svcs[i], true)
	}
	t.HoldOnly(prev.Assignments)
	return t.Has
}

// Extend gives what Allocate gives, over random pools (small, selecting,
// disabled, both families, overlapping) and services (VIPs and external
// IPs inside the pools, labels) added in random batches; where it
// declines, Allocate runs, as lbipamsync does. The pools are small so that
// they run out and services are refused (then Extend must decline).
func TestExtendEqualsAllocate(t *testing.T) {
	declined, extended := 0, 0
	for seed := range uint64(300) {
		r := rand.New(rand.NewPCG(seed, 7))
		pools := []objects.LoadBalancerIPPool{mkPool("a", "192.0.2.0/29"), mkPool("b", "192.0.2.4-192.0.2.11", "2001:db8::/126")}
		if r.IntN(2) == 0 {
			pools[0] = selecting(pools[0], map[string]string{"tier": "web"})
		}
		if r.IntN(4) == 0 {
			pools[1] = disabled(pools[1])
		}
		if r.IntN(3) == 0 {
			pools = append(pools, mkPool("c", "198.51.100.0/28"))
		}
		var svcs []objects.Service
		prev := Allocate(pools, svcs, nil)
		n := 0
		for range 6 {
			var added []objects.Service
			for range 1 + r.IntN(5) {
				n++
				vips := [][]string{v4, v6, dual}[r.IntN(3)]
				// Some VIPs and external IPs fall inside the pools: those
				// addresses are never handed out.
				if r.IntN(4) == 0 {
					vips = []string{fmt.Sprintf("192.0.2.%d", r.IntN(16))}
				}
				s := mkSvc(fmt.Sprintf("s%03d", r.IntN(1000)), vips)
				if r.IntN(3) == 0 {
					s = labelled(s, map[string]string{"tier": "web"})
				}
				if r.IntN(5) == 0 {
					s.Spec.ExternalIPs = []string{fmt.Sprintf("192.0.2.%d", r.IntN(16))}
				}
				if r.IntN(6) == 0 {
					s.Spec.Type = "" // not a LoadBalancer: reserves its VIPs only
				}
				if r.IntN(10) == 0 {
					s.Spec.LoadBalancerIPs = []string{"192.0.2.3"}
				}
				if slices.ContainsFunc(svcs, func(o objects.Service) bool { return o.Metadata.Name == s.Metadata.Name }) ||
					slices.ContainsFunc(added, func(o objects.Service) bool { return o.Metadata.Name == s.Metadata.Name }) {
					continue
				}
				added = append(added, s)
			}
			svcs = append(svcs, added...)
			want := Allocate(pools, svcs, prev.Assignments)
			got, ok := Extend(pools, takenBy(svcs, prev), prev, added)
			if !ok {
				declined++
				prev = want
				continue
			}
			extended++
			if !reflect.DeepEqual(got.Assignments, want.Assignments) {
				t.Fatalf("seed %d: Extend's assignments differ from Allocate's:\n got %v\nwant %v", seed, got.Assignments, want.Assignments)
			}
			if !poolsEqual(got.Pools, want.Pools) {
				t.Fatalf("seed %d: Extend's pool usage differs from Allocate's:\n got %v\nwant %v", seed, got.Pools, want.Pools)
			}
			prev = got
		}
	}
	// Both paths ran: the comparison above was not vacuous.
	if declined == 0 || extended < 100 {
		t.Fatalf("Extend declined %d times and extended %d times: the inputs do not exercise both", declined, extended)
	}
}

func poolsEqual(a, b map[string]PoolUsage) bool {
	return maps.EqualFunc(a, b, func(x, y PoolUsage) bool {
		return x.Total.Cmp(y.Total) == 0 && x.Used == y.Used && slices.Equal(x.Kept, y.Kept)
	})
}

// Extend declines what it cannot do alone: a refused service in prev (an
// added service could take the address it waits for) and a request.
func TestExtendDeclines(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{mkPool("a", "192.0.2.0/31")}
	svcs := []objects.Service{mkSvc("a", v4), mkSvc("b", v4), mkSvc("c", v4)}
	prev := Allocate(pools, svcs, nil)
	if prev.Refused() != 1 {
		t.Fatalf("want one refused service, have %v", prev.Assignments)
	}
	more := []objects.Service{mkSvc("d", v4)}
	if _, ok := Extend(pools, takenBy(append(svcs, more...), prev), prev, more); ok {
		t.Error("Extend ran with a refused service in prev")
	}
	svcs = svcs[:1]
	prev = Allocate(pools, svcs, nil)
	more = []objects.Service{mkSvc("b", v4, "192.0.2.1")}
	if _, ok := Extend(pools, takenBy(append(svcs, more...), prev), prev, more); ok {
		t.Error("Extend ran for a service that requests an address")
	}
}

// A StatusCache gives what ApplyStatus gives, call after call, as
// objects and assignments change; an unchanged service keeps the copy of
// the last call (what makes a rebuild cheap), a changed one gets a new one.
func TestStatusCacheEqualsApplyStatus(t *testing.T) {
	pool := mkPool("a", "192.0.2.0/29")
	web, api, dns := mkSvc("web", v4), mkSvc("api", dual), mkSvc("dns", v4)
	objs := map[string]objects.Object{objects.Key(&web): &web, objects.Key(&api): &api, objects.Key(&dns): &dns, objects.Key(&pool): &pool}
	asg := Allocate([]objects.LoadBalancerIPPool{pool}, []objects.Service{web, api, dns}, nil).Assignments
	asg["default/gone"] = Assignment{Addrs: []Addr{{IP: netip.MustParseAddr("192.0.2.7"), Pool: "a"}}}
	var c StatusCache
	check := func(step string) map[string]objects.Object {
		t.Helper()
		got, gotProblems := c.ApplyStatus(objs, asg)
		want, wantProblems := ApplyStatus(objs, asg)
		if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(gotProblems, wantProblems) {
			t.Fatalf("%s: cached %v %q, ApplyStatus %v %q", step, got, gotProblems, want, wantProblems)
		}
		return got
	}
	first := check("first")
	second := check("nothing changed")
	if first["Service/default/web"] != second["Service/default/web"] {
		t.Error("web did not change but was copied again")
	}
	// web's assignment changes; api is applied again (a new object).
	asg["default/web"] = Assignment{Addrs: []Addr{{IP: netip.MustParseAddr("192.0.2.6"), Pool: "a"}}}
	api2 := mkSvc("api", v4)
	objs[objects.Key(&api2)] = &api2
	third := check("web reassigned, api edited")
	if third["Service/default/dns"] != first["Service/default/dns"] {
		t.Error("dns did not change but was copied again")
	}
	// dns goes (its assignment stays: a problem, every time).
	delete(objs, objects.Key(&dns))
	check("dns deleted")
	check("dns deleted, again")
}

// Taken, kept as services come and go, counts an address two services
// name: it stays reserved until the last of them goes. Held addresses are
// those of the last result only.
func TestTakenKeptIncrementally(t *testing.T) {
	tk := NewTaken()
	a, b := mkSvc("a", []string{"192.0.2.1"}), mkSvc("b", []string{"192.0.2.1"})
	b.Spec.ExternalIPs = []string{"192.0.2.2"}
	tk.Reserve(&a, true)
	tk.Reserve(&b, true)
	tk.Reserve(&a, false)
	if !tk.Has(netip.MustParseAddr("192.0.2.1")) || !tk.Has(netip.MustParseAddr("192.0.2.2")) {
		t.Fatal("b's VIP and external IP are no longer taken after a, which shared the VIP, went")
	}
	tk.Reserve(&b, false)
	if tk.Has(netip.MustParseAddr("192.0.2.1")) || tk.Has(netip.MustParseAddr("192.0.2.2")) {
		t.Fatal("addresses still taken after every service naming them went")
	}
	tk.Hold(Assignment{Addrs: []Addr{{IP: netip.MustParseAddr("198.51.100.1")}}})
	tk.HoldOnly(map[string]Assignment{"default/c": {Addrs: []Addr{{IP: netip.MustParseAddr("198.51.100.2")}}}})
	if tk.Has(netip.MustParseAddr("198.51.100.1")) || !tk.Has(netip.MustParseAddr("198.51.100.2")) {
		t.Fatal("HoldOnly did not replace the held addresses")
	}
}

// Patch, told what changed, gives what ApplyStatus gives, over random
// changes of services (LoadBalancer or not, VIP families), pools (edited,
// deleted) and assignments (moved, of gone services, of a family the
// service lacks, kept outside a pool).
func TestPatchEqualsApplyStatus(t *testing.T) {
	for seed := range uint64(50) {
		r := rand.New(rand.NewPCG(seed, 11))
		objs := map[string]objects.Object{}
		asg := map[string]Assignment{}
		var c StatusCache
		addr := func() Addr {
			ips := []string{"192.0.2.1", "192.0.2.2", "192.0.2.9", "198.51.100.1", "2001:db8::1"}
			return Addr{IP: netip.MustParseAddr(ips[r.IntN(len(ips))]), Pool: []string{"a", "b"}[r.IntN(2)]}
		}
		for step := range 60 {
			var objKeys, asgKeys []string
			for range 1 + r.IntN(3) {
				switch r.IntN(4) {
				case 0, 1:
					s := mkSvc(fmt.Sprint("s", r.IntN(6)), [][]string{v4, v6, dual}[r.IntN(3)])
					if r.IntN(5) == 0 {
						s.Spec.Type = ""
					}
					if r.IntN(6) == 0 {
						s.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: "203.0.113.1"}} // stale
					}
					k := objects.Key(&s)
					if r.IntN(4) == 0 {
						delete(objs, k)
					} else {
						objs[k] = &s
					}
					objKeys = append(objKeys, k)
				case 2:
					p := mkPool([]string{"a", "b"}[r.IntN(2)], []string{"192.0.2.0/30", "192.0.2.0/29", "198.51.100.0/31"}[r.IntN(3)])
					k := objects.Key(&p)
					if r.IntN(4) == 0 {
						delete(objs, k)
					} else {
						objs[k] = &p
					}
					objKeys = append(objKeys, k)
				default:
					k := fmt.Sprint("default/s", r.IntN(7))
					if r.IntN(4) == 0 {
						delete(asg, k)
					} else {
						a := Assignment{Addrs: []Addr{addr()}}
						if r.IntN(3) == 0 {
							a.Addrs = append(a.Addrs, addr())
						}
						asg[k] = a
					}
					asgKeys = append(asgKeys, k)
				}
			}
			got, gotProblems := c.Patch(objs, asg, objKeys, asgKeys)
			want, wantProblems := ApplyStatus(objs, asg)
			if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(gotProblems, wantProblems) {
				t.Fatalf("seed %d step %d: Patch\n %v %q\nApplyStatus\n %v %q", seed, step, got, gotProblems, want, wantProblems)
			}
		}
	}
}
