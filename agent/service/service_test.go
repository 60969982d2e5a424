package service

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

func svc(ns, name string, vips []string, ports []objects.ServicePort, sel map[string]string, backends ...string) objects.Service {
	s := objects.Service{
		APIVersion: objects.APIVersion,
		Kind:       objects.KindService,
		Metadata:   objects.Meta{Name: name, Namespace: ns},
		Spec:       objects.ServiceSpec{VIPs: vips, Ports: ports, Selector: sel},
	}
	for _, b := range backends {
		s.Spec.Backends = append(s.Spec.Backends, objects.ExplicitBackend{IP: b})
	}
	return s
}

func fe(vip string, port uint16, proto bpf.Proto) bpf.Frontend {
	return bpf.Frontend{VIP: ip(vip), Port: port, Proto: proto}
}

func be(addr string, port uint16) bpf.Backend {
	return bpf.Backend{Addr: ip(addr), Port: port}
}

var web = map[string]string{"app": "web"}

var testEndpoints = []Endpoint{
	{Namespace: "default", Labels: identity.Labels{"app": "web", "v": "1"}, IPs: []netip.Addr{ip("10.0.1.3"), ip("fd00:1::3")}},
	{Namespace: "default", Labels: identity.Labels{"app": "web", "v": "2"}, IPs: []netip.Addr{ip("fd00:1::2"), ip("10.0.1.2")}},
	{Namespace: "default", Labels: identity.Labels{"app": "db"}, IPs: []netip.Addr{ip("10.0.1.9")}},
	{Namespace: "prod", Labels: identity.Labels{"app": "web"}, IPs: []netip.Addr{ip("10.0.2.2")}},
	{Namespace: "", Labels: identity.Labels{"app": "web"}, IPs: []netip.Addr{ip("::ffff:10.0.1.4")}}, // empty namespace = default; mapped = IPv4
}

func TestResolve(t *testing.T) {
	tests := []struct {
		name string
		svcs []objects.Service
		want map[bpf.Frontend][]bpf.Backend
	}{
		{
			name: "none",
			want: map[bpf.Frontend][]bpf.Backend{},
		},
		{
			name: "selector, dual stack, target port, family filter, namespace",
			svcs: []objects.Service{svc("default", "web", []string{"10.96.0.1", "fd00:96::1"},
				[]objects.ServicePort{{Port: 80, TargetPort: 8080}, {Port: 53, Protocol: "UDP"}}, web)},
			want: map[bpf.Frontend][]bpf.Backend{
				fe("10.96.0.1", 80, bpf.ProtoTCP):  {be("10.0.1.2", 8080), be("10.0.1.3", 8080), be("10.0.1.4", 8080)},
				fe("10.96.0.1", 53, bpf.ProtoUDP):  {be("10.0.1.2", 53), be("10.0.1.3", 53), be("10.0.1.4", 53)},
				fe("fd00:96::1", 80, bpf.ProtoTCP): {be("fd00:1::2", 8080), be("fd00:1::3", 8080)},
				fe("fd00:96::1", 53, bpf.ProtoUDP): {be("fd00:1::2", 53), be("fd00:1::3", 53)},
			},
		},
		{
			name: "explicit backends plus selector, deduplicated",
			svcs: []objects.Service{svc("prod", "web", []string{"10.96.0.2"},
				[]objects.ServicePort{{Port: 443, Protocol: "tcp"}}, web, "192.0.2.1", "10.0.2.2", "2001:db8::1", "192.0.2.1")},
			want: map[bpf.Frontend][]bpf.Backend{
				fe("10.96.0.2", 443, bpf.ProtoTCP): {be("10.0.2.2", 443), be("192.0.2.1", 443)},
			},
		},
		{
			name: "backends only: no selector, no endpoints picked",
			svcs: []objects.Service{svc("default", "ext", []string{"fd00:96::3"}, []objects.ServicePort{{Port: 80}}, nil, "2001:db8::2")},
			want: map[bpf.Frontend][]bpf.Backend{
				fe("fd00:96::3", 80, bpf.ProtoTCP): {be("2001:db8::2", 80)},
			},
		},
		{
			name: "no backend of the family: frontend kept, empty",
			svcs: []objects.Service{svc("default", "db", []string{"10.96.0.4", "fd00:96::4"}, []objects.ServicePort{{Port: 5432}}, map[string]string{"app": "db"})},
			want: map[bpf.Frontend][]bpf.Backend{
				fe("10.96.0.4", 5432, bpf.ProtoTCP):  {be("10.0.1.9", 5432)},
				fe("fd00:96::4", 5432, bpf.ProtoTCP): {},
			},
		},
		{
			name: "selector matching nothing",
			svcs: []objects.Service{svc("default", "x", []string{"10.96.0.5"}, []objects.ServicePort{{Port: 1}}, map[string]string{"app": "none"})},
			want: map[bpf.Frontend][]bpf.Backend{fe("10.96.0.5", 1, bpf.ProtoTCP): {}},
		},
		{
			name: "invalid service skipped",
			svcs: []objects.Service{
				svc("default", "bad", []string{"10.96.0.6"}, []objects.ServicePort{{Port: 0}}, web),
				svc("default", "bad2", []string{"not-an-ip"}, []objects.ServicePort{{Port: 1}}, web),
			},
			want: map[bpf.Frontend][]bpf.Backend{},
		},
		{
			name: "conflicting frontend: first by namespace/name wins",
			svcs: []objects.Service{
				svc("default", "zzz", []string{"10.96.0.7"}, []objects.ServicePort{{Port: 80}}, nil, "192.0.2.9"),
				svc("default", "aaa", []string{"10.96.0.7"}, []objects.ServicePort{{Port: 80}}, nil, "192.0.2.1"),
			},
			want: map[bpf.Frontend][]bpf.Backend{fe("10.96.0.7", 80, bpf.ProtoTCP): {be("192.0.2.1", 80)}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Resolve(tt.svcs, testEndpoints)
			if len(got) != len(tt.want) {
				t.Errorf("got %d frontends, want %d: %v", len(got), len(tt.want), got)
			}
			for f, want := range tt.want {
				bs, ok := got[f]
				if !ok {
					t.Errorf("frontend %v missing", f)
					continue
				}
				if bs == nil {
					t.Errorf("frontend %v: nil slice, want a non-nil (possibly empty) one", f)
				}
				if !slices.Equal(bs, want) {
					t.Errorf("frontend %v: got %v, want %v", f, bs, want)
				}
			}
		})
	}
}

func TestResolveDoesNotModifyInput(t *testing.T) {
	svcs := []objects.Service{
		svc("", "b", []string{"10.96.0.1"}, []objects.ServicePort{{Port: 80}}, web),
		svc("default", "a", []string{"10.96.0.2"}, []objects.ServicePort{{Port: 80}}, web),
	}
	Resolve(svcs, testEndpoints)
	if svcs[0].Metadata.Name != "b" || svcs[0].Metadata.Namespace != "" {
		t.Errorf("input changed: %+v", svcs[0].Metadata)
	}
}

// The label index selects exactly what a scan of every endpoint selects,
// over random endpoints, namespaces and selectors.
func TestResolveIndexMatchesScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	vals := []string{"a", "b", "c"}
	for round := range 50 {
		var eps []Endpoint
		for i := range 200 {
			l := identity.Labels{}
			for _, k := range []string{"app", "tier", "zone"} {
				if rng.IntN(3) > 0 {
					l[k] = vals[rng.IntN(len(vals))]
				}
			}
			ns := []string{"", "default", "prod"}[rng.IntN(3)]
			eps = append(eps, Endpoint{Namespace: ns, Labels: l, IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})}})
		}
		var svcs []objects.Service
		for i := range 20 {
			sel := map[string]string{}
			for _, k := range []string{"app", "tier", "zone"} {
				if rng.IntN(2) == 0 {
					sel[k] = vals[rng.IntN(len(vals))]
				}
			}
			if len(sel) == 0 {
				sel["app"] = "a"
			}
			svcs = append(svcs, svc([]string{"", "prod"}[rng.IntN(2)], fmt.Sprint("s", i), []string{fmt.Sprintf("10.96.0.%d", i+1)},
				[]objects.ServicePort{{Port: 80}}, sel))
		}
		got := Resolve(svcs, eps)
		selected := 0
		for _, s := range svcs {
			ns := namespaceOrDefault(s.Metadata.Namespace)
			var addrs []netip.Addr
			for _, ep := range eps {
				if namespaceOrDefault(ep.Namespace) == ns && ep.Labels.Has(s.Spec.Selector) {
					addrs = append(addrs, ep.IPs...)
				}
			}
			f := fe(s.Spec.VIPs[0], 80, bpf.ProtoTCP)
			s.Metadata.Namespace = ns
			want := backendsFor(f, s, addrs)
			selected += len(want)
			if !slices.Equal(got[f], want) {
				t.Fatalf("round %d, service %s %v: index selects %v, a scan %v", round, s.Metadata.Name, s.Spec.Selector, got[f], want)
			}
		}
		if selected == 0 {
			t.Fatalf("round %d selected nothing: the test checks nothing", round)
		}
	}
}
