package datapath

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

type ids []identity.Identity

func (l ids) List() []identity.Identity { return l }
func (l ids) Get(id uint32) (identity.Labels, bool) {
	for _, i := range l {
		if i.ID == id {
			return i.Labels, true
		}
	}
	return nil, false
}

func decode[T any](t testing.TB, doc string) T {
	t.Helper()
	objs, err := objects.Decode([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return *any(objs[0]).(*T)
}

// The order of one run keeps allowed flows flowing: policy entries are in
// the map before enforcement is switched on, and stay until it is off; a
// second run over the same state writes nothing.
func TestSyncOrder(t *testing.T) {
	web := state.Endpoint{Name: "web", Namespace: "default", Labels: identity.Labels{"app": "web"}, ID: 1, Identity: 1<<20 | 1,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}, HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01", IfIndex: 7}
	client := state.Endpoint{Name: "client", Namespace: "default", Labels: identity.Labels{"app": "client"}, ID: 2, Identity: 1<<20 | 2,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.3")}, HostMAC: "02:00:00:00:00:02", PodMAC: "02:00:00:00:01:02", IfIndex: 8}
	all := ids{
		{ID: web.Identity, Labels: desired.IdentityLabels("c1", "default", web.Labels)},
		{ID: client.Identity, Labels: desired.IdentityLabels("c1", "default", client.Labels)},
	}
	pol := decode[objects.NetworkPolicy](t, `
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: server}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{port: 8080}]
`)
	s := desired.State{Cluster: "c1", Endpoints: []state.Endpoint{web, client}, Identities: all,
		HostAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, Mesh: desired.Mesh{Ready: true}}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)

	sync := func() (Result, []string) {
		t.Helper()
		res, err := r.Sync(s)
		if err != nil || len(res.Errs) != 0 {
			t.Fatalf("Sync: %v %v", err, res.Errs)
		}
		return res, dp.TakeWrites()
	}
	res, _ := sync()
	if res.IPCache != 5 || res.Endpoints != 2 || r.IPCacheEntries() != 5 {
		t.Errorf("first run: %+v, %d ipcache entries", res, r.IPCacheEntries())
	}
	if res, w := sync(); res.Changes() != 0 || len(w) != 0 {
		t.Errorf("second run changed %+v: %v", res, w)
	}

	// Policy on: entries first, then the endpoint's enforcement.
	s.Policies = []objects.NetworkPolicy{pol}
	_, w := sync()
	if i, j := slices.Index(w, "policy+ 1"), slices.Index(w, "ep+ 10.0.0.2"); i < 0 || j < i {
		t.Errorf("policy on wrote %v: want the policy entries before the endpoint", w)
	}
	if !dp.EPs[web.IPs[0]].PolicyIngress {
		t.Error("enforcement not on")
	}
	// Policy off: enforcement first, then the entries go.
	s.Policies = nil
	_, w = sync()
	if i, j := slices.Index(w, "ep+ 10.0.0.2"), slices.Index(w, "policy- 1"); i < 0 || j < i {
		t.Errorf("policy off wrote %v: want the endpoint before the entries go", w)
	}
}

// Until the mesh is listed, only the node's own pods' addresses leave the
// ipcache.
func TestSyncKeepsMeshEntriesUntilReady(t *testing.T) {
	dp := agenttest.NewFakeDatapath()
	remote := netip.MustParsePrefix("10.2.0.5/32")
	stale := netip.MustParsePrefix("10.1.1.9/32") // a local pod that is gone
	dp.IPCache[remote] = bpf.IPCacheEntry{Identity: 2<<20 | 1}
	dp.IPCache[stale] = bpf.IPCacheEntry{Identity: 1<<20 | 3}
	s := desired.State{Cluster: "c1", Identities: ids{},
		Mesh: desired.Mesh{PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24")}}}
	r := NewReconciler(dp)
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if _, ok := dp.IPCache[remote]; !ok {
		t.Error("a mesh entry left before the mesh was listed")
	}
	if _, ok := dp.IPCache[stale]; ok {
		t.Error("a gone local pod stayed")
	}
	s.Mesh.Ready = true
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if w := strings.Join(dp.TakeWrites(), ","); !strings.Contains(w, "ipcache- "+remote.String()) {
		t.Errorf("ready mesh: writes %s, want %s removed", w, remote)
	}
}

// An external workload's host is an endpoint of its own datapath: the
// policies that select it by its labels are compiled for it, its entry
// enforces them (no MACs: its device is L3), and its identity arriving
// later applies them without any other input changing.
func TestSyncWorkloadEndpoint(t *testing.T) {
	host := netip.MustParseAddr("10.1.200.10")
	w := &state.Endpoint{Name: "db", Namespace: "default", Labels: identity.Labels{"app": "db"}, ID: desired.WorkloadEndpointID,
		Identity: 1<<20 | 5, IPs: []netip.Addr{host}, HostIfName: "wg-c1", IfIndex: 9}
	clientID := uint32(1<<20 | 6)
	all := ids{
		{ID: w.Identity, Labels: desired.IdentityLabels("c1", "default", w.Labels)},
		{ID: clientID, Labels: desired.IdentityLabels("c1", "default", identity.Labels{"app": "client"})},
	}
	pol := decode[objects.NetworkPolicy](t, `
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{port: 5432}]
`)
	s := desired.State{Cluster: "c1", Identities: all, Policies: []objects.NetworkPolicy{pol},
		Mesh: desired.Mesh{Ready: true}, EndpointsGen: 1, ObjectsGen: 1}
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if _, ok := dp.EPs[host]; ok {
		t.Fatal("the host has an entry before its identity is known")
	}
	s.Workload = w // the identity is allocated: nothing else changed
	if res, err := r.Sync(s); err != nil || len(res.Errs) > 0 {
		t.Fatalf("Sync: %v %v", err, res.Errs)
	}
	e, ok := dp.EPs[host]
	if !ok || !e.PolicyIngress || e.PolicyEgress || e.ID != desired.WorkloadEndpointID || e.Identity != w.Identity || e.IfIndex != 9 {
		t.Fatalf("the host's entry: %+v (present %v)", e, ok)
	}
	want := bpf.PolicyKey{EndpointID: desired.WorkloadEndpointID, PeerIdentity: clientID, Port: 5432, Proto: bpf.ProtoTCP, Direction: bpf.Ingress}
	if !dp.Pol[want] {
		t.Fatalf("policy entries %v, want %+v", dp.Pol, want)
	}
	s.Workload = nil
	if _, err := r.Sync(s); err != nil {
		t.Fatal(err)
	}
	if _, ok := dp.EPs[host]; ok {
		t.Fatal("the host's entry stayed after the workload went")
	}
}
