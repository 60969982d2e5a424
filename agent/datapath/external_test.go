package datapath

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// isth_lb from desired state: the external frontends (external IPs and
// assigned load-balancer addresses x ports) with all backends under
// Cluster and this node's under Local, the known addresses, and the same
// frontends in the services map; a run without a change writes nothing,
// and a removed service leaves nothing behind.
func TestSyncExternal(t *testing.T) {
	web := state.Endpoint{Name: "web", Namespace: "default", Labels: identity.Labels{"app": "web"}, ID: 1, Identity: 1<<20 | 1,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}, HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01", IfIndex: 7}
	svc := decode[objects.Service](t, `
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  vips: [10.96.0.1]
  externalIPs: [203.0.113.10]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: web}
  backends: [{ip: 10.9.9.9}]
`)
	svc.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: "203.0.113.20"}}
	s := desired.State{Cluster: "c1", Endpoints: []state.Endpoint{web}, Services: []objects.Service{svc}, Identities: ids{},
		Mesh: desired.Mesh{Ready: true}, EndpointsGen: 1, ObjectsGen: 1}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	sync := func() []string {
		t.Helper()
		res, err := r.Sync(s)
		if err != nil || len(res.Errs) != 0 {
			t.Fatalf("Sync: %v %v", err, res.Errs)
		}
		return dp.TakeWrites()
	}
	sync()
	all := []bpf.Backend{{Addr: netip.MustParseAddr("10.0.0.2"), Port: 8080}, {Addr: netip.MustParseAddr("10.9.9.9"), Port: 8080}}
	for _, a := range []string{"203.0.113.10", "203.0.113.20"} {
		f := bpf.Frontend{VIP: netip.MustParseAddr(a), Port: 80, Proto: bpf.ProtoTCP}
		if e := dp.Ext[f]; e.Policy != bpf.ExternalCluster || !slices.Equal(e.Backends, all) {
			t.Fatalf("%s: %+v, want Cluster with %v", f, e, all)
		}
		if _, ok := dp.Ext[bpf.ExternalAddr(f.VIP)]; !ok {
			t.Fatalf("%s is not a known address: %v", a, dp.Ext)
		}
		if !slices.Equal(dp.Svcs[f], all) {
			t.Fatalf("%s is not a frontend in the services map: %v", f, dp.Svcs[f])
		}
	}
	if len(dp.Ext) != 4 {
		t.Fatalf("isth_lb holds %d entries, want 4: %v", len(dp.Ext), dp.Ext)
	}
	if w := sync(); len(w) != 0 {
		t.Fatalf("a run without a change wrote %v", w)
	}

	// Local: this node's backends only.
	svc.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
	s.Services, s.ObjectsGen = []objects.Service{svc}, 2
	sync()
	f := bpf.Frontend{VIP: netip.MustParseAddr("203.0.113.10"), Port: 80, Proto: bpf.ProtoTCP}
	if e := dp.Ext[f]; e.Policy != bpf.ExternalLocal || !slices.Equal(e.Backends, all[:1]) {
		t.Fatalf("Local: %+v, want only %v", e, all[:1])
	}
	if !slices.Equal(dp.Svcs[f], all) {
		t.Fatalf("Local: pods still reach every backend at the address, got %v", dp.Svcs[f])
	}
	// The local endpoint goes: a Local frontend without a backend stays
	// (its traffic is dropped and counted).
	s.Endpoints, s.EndpointsGen = nil, 2
	sync()
	if e, ok := dp.Ext[f]; !ok || len(e.Backends) != 0 {
		t.Fatalf("Local without local endpoints: %+v %v", e, ok)
	}

	// The service goes: nothing of it stays.
	s.Services, s.ObjectsGen = nil, 3
	sync()
	if len(dp.Ext) != 0 {
		t.Fatalf("after the service went, isth_lb holds %v", dp.Ext)
	}
}

// Node ports: the services map holds each at the unspecified address of
// each family (pods reach any node's address), and isth_lb at each of the
// node's addresses but loopback, with those addresses known as the node's;
// the frontends follow the node's addresses, Local keeps this node's
// backends, and a removed service leaves nothing behind.
func TestSyncNodePorts(t *testing.T) {
	web := state.Endpoint{Name: "web", Namespace: "default", Labels: identity.Labels{"app": "web"}, ID: 1, Identity: 1<<20 | 1,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")}, HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01", IfIndex: 7}
	svc := decode[objects.Service](t, `
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  vips: [10.96.0.1, fd96::1]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}, {port: 53, protocol: UDP, nodePort: 30053}]
  selector: {app: web}
  backends: [{ip: 10.9.9.9}]
`)
	n4, n6, lo := netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("fd10::1"), netip.MustParseAddr("127.0.0.1")
	s := desired.State{Cluster: "c1", Endpoints: []state.Endpoint{web}, Services: []objects.Service{svc}, Identities: ids{},
		HostAddrs: []netip.Addr{n6, lo, n4}, Mesh: desired.Mesh{Ready: true}, EndpointsGen: 1, ObjectsGen: 1}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	sync := func() []string {
		t.Helper()
		res, err := r.Sync(s)
		if err != nil || len(res.Errs) != 0 {
			t.Fatalf("Sync: %v %v", err, res.Errs)
		}
		return dp.TakeWrites()
	}
	sync()
	all4 := []bpf.Backend{{Addr: netip.MustParseAddr("10.0.0.2"), Port: 8080}, {Addr: netip.MustParseAddr("10.9.9.9"), Port: 8080}}
	if got := dp.Svcs[bpf.NodePort(false, 30080, bpf.ProtoTCP)]; !slices.Equal(got, all4) {
		t.Fatalf("services map at 0.0.0.0:30080: %v, want %v", got, all4)
	}
	if got := dp.Svcs[bpf.NodePort(true, 30053, bpf.ProtoUDP)]; len(got) != 1 || got[0].Addr != netip.MustParseAddr("fd00::2") || got[0].Port != 53 {
		t.Fatalf("services map at [::]:30053: %v", got)
	}
	f4 := bpf.Frontend{VIP: n4, Port: 30080, Proto: bpf.ProtoTCP}
	if e := dp.Ext[f4]; e.Policy != bpf.ExternalCluster || !slices.Equal(e.Backends, all4) {
		t.Fatalf("%s: %+v, want Cluster with %v", f4, e, all4)
	}
	for _, a := range []netip.Addr{n4, n6} {
		if e, ok := dp.Ext[bpf.ExternalAddr(a)]; !ok || !e.Node {
			t.Fatalf("%s is not known as a node address: %+v %v", a, e, ok)
		}
	}
	// 2 node ports x 2 addresses (one per family each), 2 addresses; no loopback.
	if len(dp.Ext) != 6 {
		t.Fatalf("isth_lb holds %d entries, want 6: %v", len(dp.Ext), dp.Ext)
	}
	if r.ExternalCounts().Cluster != 4 {
		t.Fatalf("counts %+v: the SNAT is needed", r.ExternalCounts())
	}
	if w := sync(); len(w) != 0 {
		t.Fatalf("a run without a change wrote %v", w)
	}

	// A new node address gets the node ports, one that goes loses them.
	n4b := netip.MustParseAddr("192.168.2.1")
	s.HostAddrs = []netip.Addr{n6, n4b}
	sync()
	if _, ok := dp.Ext[f4]; ok {
		t.Fatalf("the node port stayed at a gone address: %v", dp.Ext)
	}
	if _, ok := dp.Ext[bpf.ExternalAddr(n4)]; ok {
		t.Fatalf("a gone address stayed known: %v", dp.Ext)
	}
	if e := dp.Ext[bpf.Frontend{VIP: n4b, Port: 30080, Proto: bpf.ProtoTCP}]; !slices.Equal(e.Backends, all4) {
		t.Fatalf("the new address has not the node port: %v", dp.Ext)
	}

	// Local: this node's backends; then none when the endpoint goes.
	svc.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
	s.Services, s.ObjectsGen = []objects.Service{svc}, 2
	sync()
	f4 = bpf.Frontend{VIP: n4b, Port: 30080, Proto: bpf.ProtoTCP}
	if e := dp.Ext[f4]; e.Policy != bpf.ExternalLocal || !slices.Equal(e.Backends, all4[:1]) {
		t.Fatalf("Local: %+v, want only %v", e, all4[:1])
	}
	s.Endpoints, s.EndpointsGen = nil, 2
	sync()
	if e, ok := dp.Ext[f4]; !ok || len(e.Backends) != 0 {
		t.Fatalf("Local without local endpoints: %+v %v", e, ok)
	}

	// The service goes: nothing of it stays.
	s.Services, s.ObjectsGen = nil, 3
	sync()
	if len(dp.Ext) != 0 || len(dp.Svcs) != 0 {
		t.Fatalf("after the service went: isth_lb %v, services %v", dp.Ext, dp.Svcs)
	}
}

// isth_lb as runs keep it, writing only what changed, is what a fresh
// reconciler writes from scratch for the same state, after every step of
// random sequences of services added, changed and deleted (external IPs
// and load-balancer addresses shared between services, node ports,
// Cluster and Local), local endpoints coming and going and the node's
// addresses changing; the counts agree too.
func TestSyncExternalMatchesFresh(t *testing.T) {
	for seed := range uint64(15) {
		rng := rand.New(rand.NewPCG(seed, 3))
		s := desired.State{Cluster: "c1", Identities: ids{}, Mesh: desired.Mesh{Ready: true},
			HostAddrs: []netip.Addr{netip.MustParseAddr("192.168.1.1")}, EndpointsGen: 1, ObjectsGen: 1}
		svcs := map[string]objects.Service{}
		dp := agenttest.NewFakeDatapath()
		r := NewReconciler(dp)
		for step := range 80 {
			switch op := rng.IntN(10); {
			case op < 5:
				name := fmt.Sprintf("s%d", rng.IntN(6))
				svc := objects.Service{APIVersion: "isthmus.io/v1alpha1", Kind: objects.KindService, Metadata: objects.Meta{Name: name, Namespace: "default"}}
				svc.Spec.VIPs = []string{fmt.Sprintf("10.96.0.%d", rng.IntN(4)+1)}
				svc.Spec.Selector = map[string]string{"app": fmt.Sprintf("a%d", rng.IntN(2))}
				svc.Spec.Ports = []objects.ServicePort{{Port: uint16(80 + rng.IntN(2)), TargetPort: 8080}}
				if rng.IntN(3) == 0 {
					svc.Spec.Type = objects.ServiceTypeNodePort
					svc.Spec.Ports[0].NodePort = uint16(30080 + rng.IntN(2))
				}
				for range rng.IntN(3) {
					svc.Spec.ExternalIPs = append(svc.Spec.ExternalIPs, fmt.Sprintf("203.0.113.%d", rng.IntN(4)+1))
				}
				svc.Spec.ExternalIPs = slices.Compact(slices.Sorted(slices.Values(svc.Spec.ExternalIPs)))
				if rng.IntN(2) == 0 {
					svc.Status.LoadBalancer.Ingress = []objects.LoadBalancerIngress{{IP: fmt.Sprintf("198.51.100.%d", rng.IntN(3)+1)}}
				}
				if rng.IntN(3) == 0 {
					svc.Spec.ExternalTrafficPolicy = objects.TrafficPolicyLocal
				}
				svcs[name] = svc
				s.ObjectsGen++
			case op < 7:
				delete(svcs, fmt.Sprintf("s%d", rng.IntN(6)))
				s.ObjectsGen++
			case op < 9:
				if len(s.Endpoints) > 0 && rng.IntN(2) == 0 {
					s.Endpoints = s.Endpoints[1:]
				} else {
					i := len(s.Endpoints) + step*10
					s.Endpoints = append(slices.Clip(s.Endpoints), state.Endpoint{Name: fmt.Sprint("e", i), Namespace: "default",
						Labels: identity.Labels{"app": fmt.Sprintf("a%d", rng.IntN(2))}, ID: uint32(i + 1), Identity: 1<<20 | 1,
						IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})}, HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01", IfIndex: 7})
				}
				s.EndpointsGen++
			default:
				s.HostAddrs = []netip.Addr{netip.AddrFrom4([4]byte{192, 168, 1, byte(rng.IntN(2) + 1)})}
			}
			s.Services = nil
			for _, k := range slices.Sorted(maps.Keys(svcs)) {
				s.Services = append(s.Services, svcs[k])
			}
			if res, err := r.Sync(s); err != nil || len(res.Errs) != 0 {
				t.Fatalf("seed %d step %d: Sync: %v %v", seed, step, err, res.Errs)
			}
			fresh := agenttest.NewFakeDatapath()
			fr := NewReconciler(fresh)
			if res, err := fr.Sync(s); err != nil || len(res.Errs) != 0 {
				t.Fatalf("seed %d step %d: fresh Sync: %v %v", seed, step, err, res.Errs)
			}
			if !reflect.DeepEqual(dp.Ext, fresh.Ext) {
				t.Fatalf("seed %d step %d: isth_lb\n %v\nfrom scratch\n %v", seed, step, dp.Ext, fresh.Ext)
			}
			if r.ExternalCounts() != fr.ExternalCounts() {
				t.Fatalf("seed %d step %d: counts %+v, from scratch %+v", seed, step, r.ExternalCounts(), fr.ExternalCounts())
			}
		}
	}
}
