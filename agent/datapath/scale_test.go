package datapath

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// churnNode is a standalone node as the service-backend bench builds it:
// n endpoints in groups of 10, n services, each selecting a group, a
// policy selecting every endpoint (admitting one group); its endpoints
// churn one at a time.
type churnNode struct {
	m       *epStore
	s       desired.State
	removed map[int]state.Endpoint
}

func newChurnNode(t testing.TB, n int) *churnNode {
	c := &churnNode{m: newEPStore(), removed: map[int]state.Endpoint{}}
	for i := range n {
		c.m.put(churnEndpoint(i, n/10))
	}
	objs := desired.Objects{}
	for i := range n {
		s := &objects.Service{APIVersion: objects.APIVersion, Kind: objects.KindService, Metadata: objects.Meta{Name: fmt.Sprint("svc-", i), Namespace: "default"},
			Spec: objects.ServiceSpec{VIPs: []string{fmt.Sprintf("10.98.%d.%d", i/250, i%250+1)}, Ports: []objects.ServicePort{{Port: 80}},
				Selector: map[string]string{"app": fmt.Sprint("g", i%(n/10))}}}
		objs[objects.Key(s)] = s
	}
	pol := decode[objects.NetworkPolicy](t, `
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: from-g1}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {app: g1}}]
    toPorts: [{port: 80}]
`)
	c.s = desired.State{Cluster: "c1", Objects: objs, ObjectsGen: 2, Policies: []objects.NetworkPolicy{pol},
		HostAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, Mesh: desired.Mesh{Ready: true}}
	c.m.state(&c.s)
	return c
}

func churnEndpoint(i, groups int) state.Endpoint {
	return state.Endpoint{Name: fmt.Sprintf("be-%d", i), Namespace: "default", Labels: identity.Labels{"app": fmt.Sprint("g", i%groups), "tier": "be"},
		ID: uint32(i + 1), IfIndex: 100 + i, IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 64, byte(i >> 8), byte(i)})},
		HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:01:01"}
}

// toggle deletes endpoint i, or adds it back, and takes the new state.
func (c *churnNode) toggle(i int) {
	if e, ok := c.removed[i]; ok {
		delete(c.removed, i)
		c.m.put(e)
	} else {
		c.removed[i] = c.m.eps[fmt.Sprintf("default/be-%d", i)]
		c.m.del(fmt.Sprintf("default/be-%d", i))
	}
	c.m.state(&c.s)
}

// syncAllocs returns the allocations per Sync of a reconciler over a node
// of n endpoints and services while its endpoints churn, one change per
// run.
func syncAllocs(t testing.TB, n int) float64 {
	c := newChurnNode(t, n)
	r := NewReconciler(agenttest.NewFakeDatapath())
	if _, err := r.Sync(c.s); err != nil {
		t.Fatal(err)
	}
	const runs = 40
	var total uint64
	for i := range runs {
		c.toggle(i * 7 % n)
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		res, err := r.Sync(c.s)
		runtime.ReadMemStats(&m1)
		if err != nil || len(res.Errs) > 0 || res.Changes() == 0 {
			t.Fatalf("run %d: %+v %v", i, res, err)
		}
		total += m1.Mallocs - m0.Mallocs
	}
	return float64(total) / runs
}

// An endpoint that comes or goes costs a run about the same whatever the
// size of the node: compiling its policy, resolving the services that
// select it and writing its entries, not every endpoint's and service's.
// Allocations count the work (the machine's load does not skew them).
func TestSyncCostsTheChange(t *testing.T) {
	small, large := syncAllocs(t, 100), syncAllocs(t, 2000)
	t.Logf("allocations per run: %.0f at 100 endpoints and services, %.0f at 2,000", small, large)
	if large > 1.5*small+50 {
		t.Errorf("a run with one endpoint changed allocates %.0f times at 2,000 endpoints, %.0f at 100: its cost grows with the node", large, small)
	}
}

// BenchmarkSyncEndpointChange: one endpoint added or deleted per run, at
// n endpoints and services, with the endpoints that changed known (what
// the agent gives) and without (every endpoint derived again).
func BenchmarkSyncEndpointChange(b *testing.B) {
	for _, n := range []int{100, 1000, 4000} {
		for _, known := range []bool{true, false} {
			b.Run(fmt.Sprintf("%d/changes-known=%v", n, known), func(b *testing.B) {
				c := newChurnNode(b, n)
				r := NewReconciler(agenttest.NewFakeDatapath())
				if _, err := r.Sync(c.s); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for i := range b.N {
					b.StopTimer()
					c.toggle(i % n)
					if !known {
						c.s.EndpointsChangedSince = nil
					}
					b.StartTimer()
					if _, err := r.Sync(c.s); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
