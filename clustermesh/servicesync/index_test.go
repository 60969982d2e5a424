package servicesync

import (
	"bytes"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// model is the syncer's input as plain maps, and rebuild the records
// computed from scratch the way the syncer did before it had indexes:
// every service against every endpoint.
type model struct {
	svcs   map[string]objects.Service
	ips    map[string]records.IPCacheEntry
	labels map[uint32]map[string]string
}

func (m *model) rebuild(t *testing.T) map[string][]byte {
	t.Helper()
	want := map[string][]byte{}
	eps := Endpoints("c1", maps.Values(m.ips), m.labels)
	for _, key := range slices.Sorted(maps.Keys(m.svcs)) {
		rec, _, err := Build("c1", 1, m.svcs[key], eps)
		if err != nil {
			continue
		}
		v, err := rec.Marshal()
		if err != nil {
			continue
		}
		want[records.ServiceKey("c1", rec.Namespace, rec.Name)] = v
	}
	return want
}

// randomOps drives tables and model with the same random changes.
type randomOps struct {
	rng *rand.Rand
	tb  *tables
	m   *model
}

var (
	opNamespaces = []string{"default", "prod"}
	opApps       = []string{"web", "db", "cache"}
	opTiers      = []string{"", "front", "back"}
)

func (o *randomOps) pick(n int) int { return o.rng.IntN(n) }

func (o *randomOps) identity() uint32 {
	switch o.pick(10) {
	case 0:
		return 2 // reserved (world)
	case 1:
		return 2<<20 | uint32(1+o.pick(3)) // another cluster's
	}
	return 1<<20 | uint32(1+o.pick(12))
}

func (o *randomOps) labels() map[string]string {
	l := map[string]string{"app": opApps[o.pick(len(opApps))]}
	switch o.pick(8) {
	case 0: // no cluster label
	case 1:
		l[labelCluster] = "c2"
	default:
		l[labelCluster] = "c1"
	}
	if o.pick(8) > 0 {
		l[labelNamespace] = opNamespaces[o.pick(len(opNamespaces))]
	}
	if tier := opTiers[o.pick(len(opTiers))]; tier != "" {
		l["tier"] = tier
	}
	return l
}

func (o *randomOps) service() objects.Service {
	s := svc(fmt.Sprintf("s%d", o.pick(8)), nil, nil)
	s.Metadata.Namespace = opNamespaces[o.pick(len(opNamespaces))]
	if o.pick(6) == 0 {
		s.Metadata.Namespace = "" // the default namespace
	}
	s.Spec.Selector = map[string]string{}
	if o.pick(6) > 0 {
		s.Spec.Selector["app"] = opApps[o.pick(len(opApps))]
	}
	if tier := opTiers[o.pick(len(opTiers))]; tier != "" {
		s.Spec.Selector["tier"] = tier
	}
	if o.pick(3) == 0 {
		s.Spec.VIPs = append(s.Spec.VIPs, "fd00:96::10")
	}
	if o.pick(5) == 0 {
		s.Spec.Backends = []objects.ExplicitBackend{{IP: "192.0.2.7"}}
	}
	if o.pick(15) == 0 {
		s.Spec.Ports = nil // invalid: not published
	}
	return s
}

func (o *randomOps) ipEntry() (string, records.IPCacheEntry) {
	var p netip.Prefix
	switch i := o.pick(24); {
	case i < 2:
		p = netip.MustParsePrefix("10.1.7.0/24") // a CIDR backs nothing
	case i < 8:
		p = netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 1, 15: byte(i)}), 128)
	default:
		p = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, 0, byte(i)}), 32)
	}
	key := records.IPCacheKey("c1", fmt.Sprintf("n%d", o.pick(2)), p)
	e := records.IPCacheEntry{Version: records.CurrentVersion, Prefix: p, Identity: o.identity(), Cluster: "c1"}
	if o.pick(2) == 0 {
		e.HostIP = netip.MustParseAddr("192.168.0.1")
	}
	return key, e
}

func (o *randomOps) step() string {
	switch o.pick(9) {
	case 0, 1:
		s := o.service()
		key := ServiceConfigPrefix + objects.Key(&s)
		o.tb.putService(key, s)
		o.m.svcs[key] = s
		return "put service " + key
	case 2:
		keys := slices.Sorted(maps.Keys(o.m.svcs))
		if len(keys) == 0 {
			return "nothing"
		}
		key := keys[o.pick(len(keys))]
		o.tb.deleteService(key)
		delete(o.m.svcs, key)
		return "delete service " + key
	case 3, 4, 5:
		key, e := o.ipEntry()
		o.tb.putIP(key, e)
		o.m.ips[key] = e
		return fmt.Sprintf("put ip %s identity %d", key, e.Identity)
	case 6:
		keys := slices.Sorted(maps.Keys(o.m.ips))
		if len(keys) == 0 {
			return "nothing"
		}
		key := keys[o.pick(len(keys))]
		o.tb.deleteIP(key)
		delete(o.m.ips, key)
		return "delete ip " + key
	case 7:
		id, l := 1<<20|uint32(1+o.pick(12)), o.labels()
		o.tb.putIdentity(id, l)
		o.m.labels[id] = l
		return fmt.Sprintf("put identity %d %v", id, l)
	default:
		ids := slices.Sorted(maps.Keys(o.m.labels))
		if len(ids) == 0 {
			return "nothing"
		}
		id := ids[o.pick(len(ids))]
		o.tb.deleteIdentity(id)
		delete(o.m.labels, id)
		return fmt.Sprintf("delete identity %d", id)
	}
}

// After every random sequence of adds, updates and deletes of services,
// ipcache entries and identities, the incremental records equal a rebuild
// from scratch, and every record whose value changed is pending (so the
// next sync writes it).
func TestTablesMatchRebuild(t *testing.T) {
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, 42))
		o := &randomOps{rng: rng, tb: newTables("c1", 1, quiet), m: &model{
			svcs: map[string]objects.Service{}, ips: map[string]records.IPCacheEntry{}, labels: map[uint32]map[string]string{}}}
		prev := map[string][]byte{}
		var history []string
		for step := range 400 {
			history = append(history, o.step())
			if rng.IntN(3) > 0 && step != 399 {
				continue // several changes between two syncs
			}
			o.tb.rebuild()
			want := o.m.rebuild(t)
			for _, k := range slices.Sorted(maps.Keys(want)) {
				if got, ok := o.tb.desired[k]; !ok || !bytes.Equal(got, want[k]) {
					t.Fatalf("seed %d step %d: record %s\n incremental: %s\n from scratch: %s\nlast changes: %q", seed, step, k, got, want[k], tail(history))
				}
			}
			for k := range o.tb.desired {
				if _, ok := want[k]; !ok {
					t.Fatalf("seed %d step %d: incremental has %s, a rebuild does not\nlast changes: %q", seed, step, k, tail(history))
				}
			}
			for k := range keysUnion(prev, want) {
				if !bytes.Equal(prev[k], want[k]) {
					if _, ok := o.tb.pending[k]; !ok {
						t.Fatalf("seed %d step %d: record %s changed but is not pending: it would not be written\nlast changes: %q", seed, step, k, tail(history))
					}
				}
			}
			clear(o.tb.pending)
			prev = maps.Clone(want)
		}
		// Deleting everything leaves no index entry behind.
		for k := range o.m.svcs {
			o.tb.deleteService(k)
		}
		for k := range o.m.ips {
			o.tb.deleteIP(k)
		}
		for id := range o.m.labels {
			o.tb.deleteIdentity(id)
		}
		o.tb.rebuild()
		if n := len(o.tb.svcsByLabel) + len(o.tb.idsByLabel) + len(o.tb.ipsByID) + len(o.tb.desired) + len(o.tb.recOf); n != 0 {
			t.Fatalf("seed %d: %d index entries left after deleting everything", seed, n)
		}
	}
}

func keysUnion(a, b map[string][]byte) map[string]struct{} {
	out := map[string]struct{}{}
	for k := range a {
		out[k] = struct{}{}
	}
	for k := range b {
		out[k] = struct{}{}
	}
	return out
}

func tail(h []string) []string { return h[max(0, len(h)-8):] }

// benchTables holds 1,000 services of 10 endpoints each (one identity per
// service), and its model for the from-scratch rebuild.
func benchTables(b *testing.B) (*tables, *model, func(i int) (string, records.IPCacheEntry)) {
	tb := newTables("c1", 1, quiet)
	m := &model{svcs: map[string]objects.Service{}, ips: map[string]records.IPCacheEntry{}, labels: map[uint32]map[string]string{}}
	ep := func(i int) (string, records.IPCacheEntry) {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 32)
		return records.IPCacheKey("c1", "n1", p), records.IPCacheEntry{Version: 1, Prefix: p, Identity: 1<<20 | uint32(1+i/10), Cluster: "c1"}
	}
	for s := range 1000 {
		sv := svc(fmt.Sprintf("s%d", s), nil, func(x *objects.Service) { x.Spec.Selector = map[string]string{"app": fmt.Sprint(s)} })
		key := ServiceConfigPrefix + objects.Key(&sv)
		tb.putService(key, sv)
		m.svcs[key] = sv
		id := 1<<20 | uint32(1+s)
		l := map[string]string{labelCluster: "c1", labelNamespace: "default", "app": fmt.Sprint(s)}
		tb.putIdentity(id, l)
		m.labels[id] = l
	}
	for i := range 10_000 {
		k, e := ep(i)
		tb.putIP(k, e)
		m.ips[k] = e
	}
	tb.rebuild()
	return tb, m, ep
}

// BenchmarkEndpointChange: one endpoint moves to another service (two
// records change), 1,000 services x 10 endpoints.
func BenchmarkEndpointChange(b *testing.B) {
	b.Run("incremental", func(b *testing.B) {
		tb, _, ep := benchTables(b)
		i := 0
		for b.Loop() {
			k, e := ep(i % 10_000)
			e.Identity = 1<<20 | uint32(1+(i*7+i/10_000)%1000) // a new service each time
			tb.putIP(k, e)
			tb.rebuild()
			clear(tb.pending)
			i++
		}
	})
	b.Run("from-scratch", func(b *testing.B) {
		_, m, ep := benchTables(b)
		t := &testing.T{}
		i := 0
		for b.Loop() {
			k, e := ep(i % 10_000)
			e.Identity = 1<<20 | uint32(1+(i*7+i/10_000)%1000) // a new service each time
			m.ips[k] = e
			m.rebuild(t)
			i++
		}
	})
}
