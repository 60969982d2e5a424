package datapath

import (
	"net/netip"
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
