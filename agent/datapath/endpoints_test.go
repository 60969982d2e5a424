package datapath

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// epStore models the agent's endpoint store for a reconciler: the
// endpoints by key with a generation per change and the log of the keys
// changed (state.Store's EndpointsGen and EndpointsChangedSince), and
// the node-local identity allocator (one identity per label set, a
// version that moves when one is allocated or freed).
type epStore struct {
	eps  map[string]state.Endpoint
	gen  uint64
	log  []string // log[g-1]: the key generation g changed
	ids  map[string]uint32
	refs map[uint32]int
	idV  uint64
	next uint32
}

func newEPStore() *epStore {
	return &epStore{eps: map[string]state.Endpoint{}, ids: map[string]uint32{}, refs: map[uint32]int{}, idV: 1}
}

// put adds or replaces e, giving it the identity of its labels.
func (m *epStore) put(e state.Endpoint) {
	m.drop(e.Key())
	l := desired.IdentityLabels("c1", e.Namespace, e.Labels)
	id, ok := m.ids[l.String()]
	if !ok {
		m.next++
		id = 1<<20 | m.next
		m.ids[l.String()] = id
		m.idV++
	}
	m.refs[id]++
	e.Identity = id
	m.eps[e.Key()] = e
	m.changed(e.Key())
}

// del deletes the endpoint of key, if any.
func (m *epStore) del(key string) {
	if m.drop(key) {
		m.changed(key)
	}
}

func (m *epStore) drop(key string) bool {
	old, ok := m.eps[key]
	if !ok {
		return false
	}
	delete(m.eps, key)
	if m.refs[old.Identity]--; m.refs[old.Identity] == 0 {
		delete(m.refs, old.Identity)
		for k, id := range m.ids {
			if id == old.Identity {
				delete(m.ids, k)
			}
		}
		m.idV++
	}
	return true
}

func (m *epStore) changed(key string) {
	m.gen++
	m.log = append(m.log, key)
}

// state fills in s what the agent takes from the store.
func (m *epStore) state(s *desired.State) {
	s.Endpoints = nil
	for _, k := range slices.Sorted(maps.Keys(m.eps)) {
		s.Endpoints = append(s.Endpoints, m.eps[k])
	}
	var all ids
	for k, id := range m.ids {
		l, err := identity.ParseLabels(k)
		if err != nil {
			panic(err)
		}
		all = append(all, identity.Identity{ID: id, Labels: l})
	}
	slices.SortFunc(all, func(a, b identity.Identity) int { return int(a.ID) - int(b.ID) })
	s.Identities, s.IdentitiesGen = all, m.idV
	gen := m.gen
	s.EndpointsGen = gen + 1
	s.EndpointsChangedSince = func(since uint64) ([]string, bool) {
		if since == 0 || since-1 > gen {
			return nil, false
		}
		var keys []string
		for _, k := range m.log[since-1 : gen] {
			if !slices.Contains(keys, k) {
				keys = append(keys, k)
			}
		}
		return keys, true
	}
}

// A run that takes only the endpoints that changed (the policy and
// endpoints maps compiled for them alone, the services resolved for
// them, the ipcache's pod entries) leaves the maps as a reconciler
// starting from scratch makes them, after any sequence of endpoints
// coming, relabelled, readdressed (several at once too) and going,
// identities coming and going with them, policies and services
// changing, the node's addresses and an external workload changing.
func TestIncrementalEndpointsMatchRebuild(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { checkIncrementalEndpoints(t, seed) })
	}
}

func checkIncrementalEndpoints(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 3))
	pols := []string{`
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{port: 8080}]
`, `
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: out}
spec:
  endpointSelector: {matchLabels: {tier: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
  - toEntities: [world]
`}
	svcs := desired.Objects{}
	for i, app := range []string{"web", "client", "db"} {
		s := &objects.Service{APIVersion: objects.APIVersion, Kind: objects.KindService, Metadata: objects.Meta{Name: app, Namespace: "default"},
			Spec: objects.ServiceSpec{VIPs: []string{fmt.Sprintf("10.96.0.%d", i+1)}, Ports: []objects.ServicePort{{Port: 80}}, Selector: map[string]string{"app": app}}}
		svcs[objects.Key(s)] = s
	}
	m := newEPStore()
	dp := agenttest.NewFakeDatapath()
	r := NewReconciler(dp)
	s := desired.State{Cluster: "c1", Objects: svcs, ObjectsGen: 1, HostAddrs: []netip.Addr{selfIP}, Mesh: desired.Mesh{Ready: true},
		AllowLocalHostIngress: seed%2 == 1}
	nextID := uint32(0)
	endpoint := func(i int) state.Endpoint {
		l := identity.Labels{"app": []string{"web", "client", "db"}[rng.IntN(3)]}
		if rng.IntN(2) == 0 {
			l["tier"] = []string{"a", "b"}[rng.IntN(2)]
		}
		// Addresses per endpoint (as IPAM gives them), sometimes a new one.
		ips := []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(rng.IntN(2)), byte(i + 1)})}
		if rng.IntN(3) == 0 {
			ips = append(ips, netip.AddrFrom16([16]byte{0xfd, 0, 14: byte(rng.IntN(2)), 15: byte(i + 1)}))
		}
		nextID++ // IDs are never reused
		return state.Endpoint{Name: fmt.Sprint("ep", i), Namespace: "default", Labels: l, ID: nextID,
			IfIndex: 10 + i, IPs: ips, HostMAC: "02:00:00:00:00:01", PodMAC: fmt.Sprintf("02:00:00:00:01:%02x", i)}
	}
	compared, incremental, backends, policies := 0, 0, 0, 0
	for step := range 300 {
		switch k := rng.IntN(20); {
		case k < 12:
			for range 1 + rng.IntN(3) {
				i := rng.IntN(15)
				if _, ok := m.eps["default/"+fmt.Sprint("ep", i)]; ok && rng.IntN(3) == 0 {
					m.del("default/" + fmt.Sprint("ep", i))
				} else {
					m.put(endpoint(i))
				}
			}
		case k < 14:
			s.Policies = nil
			for _, p := range pols {
				if rng.IntN(2) == 0 {
					s.Policies = append(s.Policies, decode[objects.NetworkPolicy](t, p))
				}
			}
			s.ObjectsGen++
		case k == 14:
			s.HostAddrs = []netip.Addr{selfIP}
			if rng.IntN(2) == 0 {
				s.HostAddrs = append(s.HostAddrs, netip.MustParseAddr("10.1.0.1")) // a pod's address too, at times
			}
		case k == 15:
			s.Workload = nil
			if rng.IntN(2) == 0 {
				s.Workload = &state.Endpoint{Name: "vm", Namespace: "default", Labels: identity.Labels{"app": "client"}, ID: desired.WorkloadEndpointID,
					Identity: 1<<20 | 999, IPs: []netip.Addr{netip.MustParseAddr("10.9.0.1")}, IfIndex: 3}
			}
		case k == 16:
			s.Mesh.Ready = rng.IntN(4) > 0 // not ready: nothing stale may go yet
		case k == 17:
			s.EndpointsChangedSince = nil // a run that does not know
		default:
			continue // several changes in one run
		}
		m.state(&s)
		if k := rng.IntN(10); k == 0 {
			s.EndpointsChangedSince = nil
		}
		compiler, epGen := r.polCompiler, r.polApplied.endpoints
		if res, err := r.Sync(s); err != nil || len(res.Errs) > 0 {
			t.Fatalf("step %d: %v %v", step, err, res.Errs)
		}
		if r.polCompiler == compiler && epGen != 0 && epGen != s.EndpointsGen {
			incremental++ // endpoints changed, and only theirs were compiled
		}
		if !s.Mesh.Ready {
			continue // entries stay that a rebuild does not make
		}
		ref := agenttest.NewFakeDatapath()
		if res, err := NewReconciler(ref).Sync(s); err != nil || len(res.Errs) > 0 {
			t.Fatal(err, res.Errs)
		}
		for _, c := range []struct {
			name      string
			got, want any
			equal     bool
		}{
			{"endpoints", dp.EPs, ref.EPs, maps.EqualFunc(dp.EPs, ref.EPs, sameEndpointInfo)},
			{"policy", dp.Pol, ref.Pol, maps.Equal(dp.Pol, ref.Pol)},
			{"services", dp.Svcs, ref.Svcs, maps.EqualFunc(dp.Svcs, ref.Svcs, slices.Equal)},
			{"ipcache", dp.IPCache, ref.IPCache, maps.Equal(dp.IPCache, ref.IPCache)},
		} {
			if !c.equal {
				t.Fatalf("step %d: %s differ from a rebuild:\n got %v\nwant %v", step, c.name, c.got, c.want)
			}
		}
		compared++
		for _, bs := range ref.Svcs {
			backends += len(bs)
		}
		policies += len(ref.Pol)
	}
	if compared < 100 || incremental < 50 || backends == 0 || policies == 0 {
		t.Fatalf("%d runs compared (%d incremental), %d backends and %d policy entries in them: the test checks too little",
			compared, incremental, backends, policies)
	}
}
