package lbipam

import (
	"math/rand/v2"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

func mkPool(name string, blocks ...string) objects.LoadBalancerIPPool {
	p := objects.LoadBalancerIPPool{APIVersion: objects.APIVersion, Kind: objects.KindLoadBalancerIPPool,
		Metadata: objects.Meta{Name: name, Namespace: objects.DefaultNamespace}}
	for _, b := range blocks {
		if from, to, ok := strings.Cut(b, "-"); ok {
			p.Spec.Blocks = append(p.Spec.Blocks, objects.PoolBlock{Start: from, Stop: to})
		} else {
			p.Spec.Blocks = append(p.Spec.Blocks, objects.PoolBlock{CIDR: b})
		}
	}
	if err := p.Validate(); err != nil {
		panic(err)
	}
	return p
}

func selecting(p objects.LoadBalancerIPPool, labels map[string]string) objects.LoadBalancerIPPool {
	p.Spec.ServiceSelector.MatchLabels = labels
	return p
}

func disabled(p objects.LoadBalancerIPPool) objects.LoadBalancerIPPool {
	p.Spec.Disabled = true
	return p
}

// mkSvc returns a LoadBalancer service with the given VIPs (one per
// family) and requested addresses.
func mkSvc(name string, vips []string, request ...string) objects.Service {
	return objects.Service{APIVersion: objects.APIVersion, Kind: objects.KindService,
		Metadata: objects.Meta{Name: name, Namespace: "default"},
		Spec: objects.ServiceSpec{VIPs: vips, Ports: []objects.ServicePort{{Port: 80}},
			Type: objects.ServiceTypeLoadBalancer, LoadBalancerIPs: request}}
}

var (
	v4   = []string{"10.96.0.1"}
	v6   = []string{"fd00::1"}
	dual = []string{"10.96.0.1", "fd00::1"}
)

func labelled(s objects.Service, l map[string]string) objects.Service {
	s.Metadata.Labels = l
	return s
}

// ips renders an assignment's addresses as "ip@pool" (with "!" when kept).
func ips(a Assignment) string {
	var out []string
	for _, ad := range a.Addrs {
		s := ad.IP.String() + "@" + ad.Pool
		if ad.Kept != "" {
			s += "!"
		}
		out = append(out, s)
	}
	return strings.Join(out, ",")
}

func expect(t *testing.T, r Result, key, want, refused string) {
	t.Helper()
	a, ok := r.Assignments[key]
	if !ok {
		t.Fatalf("%s has no assignment; have %v", key, r.Assignments)
	}
	if got := ips(a); got != want {
		t.Errorf("%s: addresses %q, want %q (refused %q)", key, got, want, a.Refused)
	}
	if refused == "" && a.Refused != "" {
		t.Errorf("%s: refused %q, want no refusal", key, a.Refused)
	}
	if refused != "" && !strings.Contains(a.Refused, refused) {
		t.Errorf("%s: refused %q, want it to contain %q", key, a.Refused, refused)
	}
}

func TestLowestFreePoolsInNameOrderBothFamilies(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{
		mkPool("b", "192.0.2.0/30"),
		mkPool("a", "198.51.100.8-198.51.100.9", "2001:db8::/126"),
	}
	svcs := []objects.Service{mkSvc("s1", dual), mkSvc("s2", v4), mkSvc("s3", v4), mkSvc("s4", v6)}
	r := Allocate(pools, svcs, nil)
	expect(t, r, "default/s1", "198.51.100.8@a,2001:db8::@a", "")
	expect(t, r, "default/s2", "198.51.100.9@a", "")
	expect(t, r, "default/s3", "192.0.2.0@b", "") // a is full: next pool by name
	expect(t, r, "default/s4", "2001:db8::1@a", "")
	if u := r.Pools["a"]; u.Used != 4 || u.Total.String() != "6" {
		t.Errorf("pool a usage %d/%s, want 4/6", u.Used, u.Total)
	}
	if u := r.Pools["b"]; u.Used != 1 || u.Total.String() != "4" {
		t.Errorf("pool b usage %d/%s, want 1/4", u.Used, u.Total)
	}
	// ClusterIP services get nothing.
	c := mkSvc("plain", v4)
	c.Spec.Type = ""
	if _, ok := Allocate(pools, []objects.Service{c}, nil).Assignments["default/plain"]; ok {
		t.Error("a ClusterIP service got an assignment")
	}
}

func TestDeterministic(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{mkPool("a", "192.0.2.0/29"), mkPool("b", "192.0.2.8/29"), mkPool("c", "2001:db8::/125")}
	var svcs []objects.Service
	for _, n := range []string{"a1", "b2", "c3", "d4", "e5", "f6", "g7", "h8", "i9", "j10"} {
		svcs = append(svcs, mkSvc(n, dual))
	}
	want := Allocate(pools, svcs, nil)
	for range 20 {
		rand.Shuffle(len(pools), func(i, j int) { pools[i], pools[j] = pools[j], pools[i] })
		rand.Shuffle(len(svcs), func(i, j int) { svcs[i], svcs[j] = svcs[j], svcs[i] })
		if got := Allocate(pools, svcs, nil); !reflect.DeepEqual(got.Assignments, want.Assignments) {
			t.Fatalf("input order changed the result:\n%v\n%v", got.Assignments, want.Assignments)
		}
	}
	expect(t, want, "default/a1", "192.0.2.0@a,2001:db8::@c", "")
	expect(t, want, "default/i9", "192.0.2.8@b", "no free IPv6 address in the LoadBalancerIPPools that select the service (c)")
}

// An address in use stays with its service across re-runs, lower free
// addresses, pool edits (even out of the pool), disabling and deleting
// its pool, and an overlapping pool that sorts first.
func TestStickiness(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{mkPool("b", "192.0.2.0/28")}
	r1 := Allocate(pools, []objects.Service{mkSvc("x", v4), mkSvc("y", v4)}, nil)
	expect(t, r1, "default/y", "192.0.2.1@b", "")

	// x goes away: y keeps .1 although .0 is lower and free.
	r2 := Allocate(pools, []objects.Service{mkSvc("y", v4)}, r1.Assignments)
	expect(t, r2, "default/y", "192.0.2.1@b", "")

	// A restart is a run with the stored assignments and nothing else
	// changed: the same result.
	if r3 := Allocate(pools, []objects.Service{mkSvc("y", v4)}, r2.Assignments); !reflect.DeepEqual(r3, r2) {
		t.Errorf("re-run changed the result: %v -> %v", r2.Assignments, r3.Assignments)
	}

	// The pool is edited so it no longer covers .1: y keeps it, marked.
	edited := []objects.LoadBalancerIPPool{mkPool("b", "192.0.2.64/28")}
	r4 := Allocate(edited, []objects.Service{mkSvc("y", v4), mkSvc("z", v4)}, r2.Assignments)
	expect(t, r4, "default/y", "192.0.2.1@b!", "")
	expect(t, r4, "default/z", "192.0.2.64@b", "")
	if k := r4.Assignments["default/y"].Addrs[0].Kept; !strings.Contains(k, "pool b no longer covers it") {
		t.Errorf("kept note %q", k)
	}
	if u := r4.Pools["b"]; u.Used != 2 || len(u.Kept) != 1 || u.Kept[0] != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("pool b usage %+v, want 2 used, 192.0.2.1 kept", u)
	}

	// Disabled: the address stays (no note), new services get nothing.
	r5 := Allocate([]objects.LoadBalancerIPPool{disabled(pools[0])}, []objects.Service{mkSvc("y", v4), mkSvc("n", v4)}, r2.Assignments)
	expect(t, r5, "default/y", "192.0.2.1@b", "")
	expect(t, r5, "default/n", "", "no enabled LoadBalancerIPPool with IPv4 addresses selects the service")

	// Deleted: kept, marked.
	r6 := Allocate(nil, []objects.Service{mkSvc("y", v4)}, r2.Assignments)
	expect(t, r6, "default/y", "192.0.2.1@b!", "")
	if k := r6.Assignments["default/y"].Addrs[0].Kept; !strings.Contains(k, "pool b was deleted") {
		t.Errorf("kept note %q", k)
	}

	// An overlapping pool "a" (sorts first) covering the address: y stays
	// on its address and its pool.
	overlap := append([]objects.LoadBalancerIPPool{mkPool("a", "192.0.2.0/24")}, pools...)
	r7 := Allocate(overlap, []objects.Service{mkSvc("y", v4)}, r2.Assignments)
	expect(t, r7, "default/y", "192.0.2.1@b", "")

	// The pool stops selecting the service: kept, marked.
	sel := []objects.LoadBalancerIPPool{selecting(pools[0], map[string]string{"tier": "web"})}
	r8 := Allocate(sel, []objects.Service{mkSvc("y", v4)}, r2.Assignments)
	expect(t, r8, "default/y", "192.0.2.1@b!", "")
}

func TestRequestedAddresses(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{
		mkPool("a", "192.0.2.0/28", "2001:db8::/120"),
		disabled(mkPool("off", "198.51.100.0/28")),
		selecting(mkPool("web", "203.0.113.0/28"), map[string]string{"tier": "web"}),
	}
	svcs := []objects.Service{
		mkSvc("a-first", v4), // takes .0
		mkSvc("honoured", dual, "192.0.2.9", "2001:db8::9"), // both honoured
		mkSvc("taken", v4, "192.0.2.9"),                     // same as honoured
		mkSvc("outside", v4, "192.0.2.200"),                 // in no pool
		mkSvc("in-disabled", v4, "198.51.100.1"),            // only in a disabled pool
		mkSvc("not-selected", v4, "203.0.113.2"),            // pool web does not select it
		labelled(mkSvc("selected", v4, "203.0.113.1"), map[string]string{"tier": "web"}),
		mkSvc("vip-clash", v4, "192.0.2.5"), // a VIP of another service
	}
	clash := mkSvc("owner", []string{"192.0.2.5"})
	clash.Spec.Type = ""
	svcs = append(svcs, clash)
	r := Allocate(pools, svcs, nil)
	expect(t, r, "default/a-first", "192.0.2.0@a", "")
	expect(t, r, "default/honoured", "192.0.2.9@a,2001:db8::9@a", "")
	expect(t, r, "default/taken", "", "loadBalancerIP 192.0.2.9 is in use by service default/honoured")
	expect(t, r, "default/outside", "", "loadBalancerIP 192.0.2.200 is not in any enabled LoadBalancerIPPool that selects the service")
	expect(t, r, "default/in-disabled", "", "loadBalancerIP 198.51.100.1 is not in any enabled LoadBalancerIPPool")
	expect(t, r, "default/not-selected", "", "loadBalancerIP 203.0.113.2 is not in any enabled LoadBalancerIPPool that selects the service")
	expect(t, r, "default/selected", "203.0.113.1@web", "")
	expect(t, r, "default/vip-clash", "", "loadBalancerIP 192.0.2.5 is a VIP of service default/owner")
	// A refused request never falls back to a dynamic address.
	if len(r.Assignments["default/taken"].Addrs) != 0 {
		t.Error("a refused request got another address")
	}
	// Dynamic allocation skips VIPs too.
	r2 := Allocate(pools, []objects.Service{clash, mkSvc("d1", v4, "192.0.2.0"), mkSvc("d2", v4), mkSvc("d3", v4), mkSvc("d4", v4), mkSvc("d5", v4), mkSvc("d6", v4)}, nil)
	expect(t, r2, "default/d6", "192.0.2.6@a", "")
	if r.Refused() != 5 {
		t.Errorf("refused %d, want 5", r.Refused())
	}
}

// A request that changes moves the service to the new address when it can
// be honoured, and keeps the old one (with the reason) when it cannot.
// An address released by one request serves another in the same run.
func TestRequestChanges(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{mkPool("a", "192.0.2.0/28")}
	r1 := Allocate(pools, []objects.Service{mkSvc("p", v4, "192.0.2.3"), mkSvc("q", v4, "192.0.2.4")}, nil)
	expect(t, r1, "default/p", "192.0.2.3@a", "")

	// q moves off .4, and p (sorting first) asks for .4 in the same run.
	r2 := Allocate(pools, []objects.Service{mkSvc("p", v4, "192.0.2.4"), mkSvc("q", v4, "192.0.2.5")}, r1.Assignments)
	expect(t, r2, "default/p", "192.0.2.4@a", "")
	expect(t, r2, "default/q", "192.0.2.5@a", "")

	// p asks for q's address: p keeps its own and says why.
	r3 := Allocate(pools, []objects.Service{mkSvc("p", v4, "192.0.2.5"), mkSvc("q", v4, "192.0.2.5")}, r2.Assignments)
	expect(t, r3, "default/p", "192.0.2.4@a", "loadBalancerIP 192.0.2.5 is in use by service default/q")
	expect(t, r3, "default/q", "192.0.2.5@a", "")

	// Dropping the request keeps the address (it is in use).
	r4 := Allocate(pools, []objects.Service{mkSvc("p", v4)}, r3.Assignments)
	expect(t, r4, "default/p", "192.0.2.4@a", "")
}

func TestNoRoomAndFreeing(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{mkPool("tiny", "192.0.2.7/32")}
	r1 := Allocate(pools, []objects.Service{mkSvc("one", v4), mkSvc("two", v4)}, nil)
	expect(t, r1, "default/one", "192.0.2.7@tiny", "")
	expect(t, r1, "default/two", "", "no free IPv4 address in the LoadBalancerIPPools that select the service (tiny)")
	// No pool selects a family: said so.
	expect(t, Allocate(pools, []objects.Service{mkSvc("six", v6)}, nil), "default/six", "",
		"no enabled LoadBalancerIPPool with IPv6 addresses selects the service")

	// Deleting "one" frees the address for "two".
	r2 := Allocate(pools, []objects.Service{mkSvc("two", v4)}, r1.Assignments)
	expect(t, r2, "default/two", "192.0.2.7@tiny", "")
	if _, ok := r2.Assignments["default/one"]; ok {
		t.Error("a deleted service kept its assignment")
	}

	// "two" stops being LoadBalancer: the address is free again.
	plain := mkSvc("two", v4)
	plain.Spec.Type = objects.ServiceTypeClusterIP
	r3 := Allocate(pools, []objects.Service{plain, mkSvc("three", v4)}, r2.Assignments)
	expect(t, r3, "default/three", "192.0.2.7@tiny", "")

	// A service that loses its IPv6 VIP loses its IPv6 address.
	dualPool := []objects.LoadBalancerIPPool{mkPool("d", "192.0.2.0/30", "2001:db8::/126")}
	r4 := Allocate(dualPool, []objects.Service{mkSvc("s", dual)}, nil)
	r5 := Allocate(dualPool, []objects.Service{mkSvc("s", v4), mkSvc("t", v6)}, r4.Assignments)
	expect(t, r5, "default/s", "192.0.2.0@d", "")
	expect(t, r5, "default/t", "2001:db8::@d", "")
}

// Two previous assignments claiming one address (a corrupt store) leave it
// to the first service by key; the other gets a new one.
func TestDuplicateClaims(t *testing.T) {
	pools := []objects.LoadBalancerIPPool{mkPool("a", "192.0.2.0/29")}
	ip := netip.MustParseAddr("192.0.2.5")
	prev := map[string]Assignment{
		"default/m": {Addrs: []Addr{{IP: ip, Pool: "a"}}},
		"default/n": {Addrs: []Addr{{IP: ip, Pool: "a"}}},
	}
	r := Allocate(pools, []objects.Service{mkSvc("n", v4), mkSvc("m", v4)}, prev)
	expect(t, r, "default/m", "192.0.2.5@a", "")
	expect(t, r, "default/n", "192.0.2.0@a", "")
}

func TestApplyStatus(t *testing.T) {
	pool := mkPool("a", "192.0.2.0/29")
	web := mkSvc("web", v4)
	plain := mkSvc("plain", v4)
	plain.Spec.Type = ""
	objs := map[string]objects.Object{
		objects.Key(&web): &web, objects.Key(&plain): &plain, objects.Key(&pool): &pool,
	}
	asg := map[string]Assignment{
		"default/web":   {Addrs: []Addr{{IP: netip.MustParseAddr("192.0.2.1"), Pool: "a"}, {IP: netip.MustParseAddr("2001:db8::1"), Pool: "a"}}},
		"default/plain": {Addrs: []Addr{{IP: netip.MustParseAddr("192.0.2.2"), Pool: "a"}}},
		"default/gone":  {Addrs: []Addr{{IP: netip.MustParseAddr("192.0.2.3"), Pool: "a"}}},
	}
	out, problems := ApplyStatus(objs, asg)
	got := out[objects.Key(&web)].(*objects.Service).Status.LoadBalancer
	if len(got.Ingress) != 1 || got.Ingress[0].IP != "192.0.2.1" || got.Ingress[0].Pool != "a" {
		t.Errorf("web status %+v, want only 192.0.2.1 from a", got)
	}
	if len(web.Status.LoadBalancer.Ingress) != 0 {
		t.Error("ApplyStatus modified its input")
	}
	if st := out[objects.Key(&plain)].(*objects.Service).Status; len(st.LoadBalancer.Ingress) != 0 {
		t.Errorf("a ClusterIP service got status %+v", st)
	}
	if ps := out[objects.Key(&pool)].(*objects.LoadBalancerIPPool).Status; ps.Used != 1 || ps.Total != "8" {
		t.Errorf("pool status %+v, want 1 of 8", ps)
	}
	want := []string{"default/gone, which does not exist", "default/plain, which is not of type LoadBalancer", "default/web: address 2001:db8::1 is of a family"}
	if len(problems) != len(want) {
		t.Fatalf("problems %q", problems)
	}
	for i, w := range want {
		if !strings.Contains(problems[i], w) {
			t.Errorf("problem %q does not contain %q", problems[i], w)
		}
	}
}

// BenchmarkAllocate10000: a full run over 10,000 dual-stack LoadBalancer
// services, half of them already assigned (what the server does per
// change).
func BenchmarkAllocate10000(b *testing.B) {
	pools := []objects.LoadBalancerIPPool{mkPool("a", "10.200.0.0/16", "2001:db8::/112")}
	var svcs []objects.Service
	for i := range 10000 {
		svcs = append(svcs, mkSvc("s"+strconv.Itoa(i), dual))
	}
	half := Allocate(pools, svcs[:5000], nil).Assignments
	b.ResetTimer()
	for range b.N {
		if r := Allocate(pools, svcs, half); len(r.Assignments) != 10000 || r.Refused() != 0 {
			b.Fatal("not all assigned")
		}
	}
}
