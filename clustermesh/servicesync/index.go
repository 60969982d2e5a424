package servicesync

import (
	"log/slog"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// tables hold what the syncer knows (Services, the cluster's ipcache
// entries and identities) with indexes both ways between labels and
// services, so that a change costs what it touches, not services ×
// endpoints:
//
//   - an ipcache entry is indexed under its identity (ipsByID), an identity
//     under each of its labels (idsByLabel), a Service under each label of
//     its selector (svcsByLabel);
//   - a changed endpoint marks dirty only the services that select its
//     identity (found through svcsByLabel), a changed identity only the
//     services that select its old or new labels, and only if it has
//     endpoints; a changed Service only itself;
//   - rebuilding a dirty service looks up the identities it selects through
//     the rarest label of its selector, and their endpoints.
//
// desired then holds the value every service calls for, by record key, and
// pending the record keys to compare with etcd on the next write. The
// result equals a rebuild from scratch (TestTablesMatchRebuild).
type tables struct {
	cluster   string
	clusterID uint32
	log       *slog.Logger

	svcs   map[string]objects.Service // by config key
	ips    map[string]records.IPCacheEntry
	labels map[uint32]map[string]string

	ipsByID     map[uint32]map[string]netip.Addr // single-address entries of the cluster
	idsByLabel  map[label]map[uint32]struct{}
	svcsByLabel map[label]map[string]struct{}

	dirty   map[string]struct{} // config keys to rebuild
	desired map[string][]byte   // record key -> value
	recOf   map[string]string   // config key -> the record key it publishes
	pending map[string]struct{} // record keys to compare with etcd
}

type label struct{ k, v string }

func newTables(cluster string, clusterID uint32, log *slog.Logger) *tables {
	return &tables{cluster: cluster, clusterID: clusterID, log: log,
		svcs: map[string]objects.Service{}, ips: map[string]records.IPCacheEntry{}, labels: map[uint32]map[string]string{},
		ipsByID: map[uint32]map[string]netip.Addr{}, idsByLabel: map[label]map[uint32]struct{}{}, svcsByLabel: map[label]map[string]struct{}{},
		dirty: map[string]struct{}{}, desired: map[string][]byte{}, recOf: map[string]string{}, pending: map[string]struct{}{}}
}

func addTo[K, V comparable](m map[K]map[V]struct{}, k K, v V) {
	if m[k] == nil {
		m[k] = map[V]struct{}{}
	}
	m[k][v] = struct{}{}
}

func removeFrom[K, V comparable](m map[K]map[V]struct{}, k K, v V) {
	if s := m[k]; s != nil {
		delete(s, v)
		if len(s) == 0 {
			delete(m, k)
		}
	}
}

// ---- services ----

func (t *tables) putService(key string, svc objects.Service) {
	t.deleteService(key)
	t.svcs[key] = svc
	for k, v := range svc.Spec.Selector {
		addTo(t.svcsByLabel, label{k, v}, key)
	}
}

func (t *tables) deleteService(key string) {
	t.dirty[key] = struct{}{}
	old, ok := t.svcs[key]
	if !ok {
		return
	}
	for k, v := range old.Spec.Selector {
		removeFrom(t.svcsByLabel, label{k, v}, key)
	}
	delete(t.svcs, key)
}

// ---- endpoints ----

// endpointOf returns what of an ipcache entry services depend on: its
// identity and address, if it is a single address of the cluster.
func (t *tables) endpointOf(e records.IPCacheEntry) (uint32, netip.Addr, bool) {
	if e.Cluster != t.cluster || !e.Prefix.IsSingleIP() {
		return 0, netip.Addr{}, false
	}
	return e.Identity, e.Prefix.Addr(), true
}

func (t *tables) putIP(key string, e records.IPCacheEntry) {
	old, had := t.ips[key]
	t.ips[key] = e
	oid, oaddr, oep := t.endpointOf(old)
	nid, naddr, nep := t.endpointOf(e)
	if had && oep == nep && oid == nid && oaddr == naddr {
		return // host IP or owner changed: no service record depends on them
	}
	if had && oep {
		t.unindexIP(key, oid)
	}
	if nep {
		if t.ipsByID[nid] == nil {
			t.ipsByID[nid] = map[string]netip.Addr{}
		}
		t.ipsByID[nid][key] = naddr
		t.markSelecting(t.labels[nid])
	}
}

func (t *tables) deleteIP(key string) {
	old, ok := t.ips[key]
	if !ok {
		return
	}
	delete(t.ips, key)
	if id, _, ep := t.endpointOf(old); ep {
		t.unindexIP(key, id)
	}
}

func (t *tables) unindexIP(key string, id uint32) {
	if m := t.ipsByID[id]; m != nil {
		delete(m, key)
		if len(m) == 0 {
			delete(t.ipsByID, id)
		}
	}
	t.markSelecting(t.labels[id])
}

// ---- identities ----

func (t *tables) putIdentity(id uint32, l map[string]string) {
	t.deleteIdentity(id)
	t.labels[id] = l
	for k, v := range l {
		addTo(t.idsByLabel, label{k, v}, id)
	}
	if len(t.ipsByID[id]) > 0 {
		t.markSelecting(l)
	}
}

func (t *tables) deleteIdentity(id uint32) {
	old, ok := t.labels[id]
	if !ok {
		return
	}
	if len(t.ipsByID[id]) > 0 {
		t.markSelecting(old)
	}
	for k, v := range old {
		removeFrom(t.idsByLabel, label{k, v}, id)
	}
	delete(t.labels, id)
}

// eligible reports whether endpoints of an identity with labels l can
// back services (as Endpoints decides): of the cluster, with a namespace.
func (t *tables) eligible(l map[string]string) bool {
	return l != nil && l[labelCluster] == t.cluster && l[labelNamespace] != ""
}

// markSelecting marks dirty the services that select identities labelled
// l: those indexed under one of its labels whose namespace and selector
// match.
func (t *tables) markSelecting(l map[string]string) {
	if !t.eligible(l) {
		return
	}
	ns := l[labelNamespace]
	for k, v := range l {
		for key := range t.svcsByLabel[label{k, v}] {
			if _, done := t.dirty[key]; done {
				continue
			}
			svc := t.svcs[key]
			if namespaceOf(svc) == ns && hasLabels(l, svc.Spec.Selector) {
				t.dirty[key] = struct{}{}
			}
		}
	}
}

func namespaceOf(svc objects.Service) string {
	if svc.Metadata.Namespace == "" {
		return objects.DefaultNamespace
	}
	return svc.Metadata.Namespace
}

// selected returns the endpoints svc selects: the identities under the
// rarest of its selector's labels (and its namespace's) that match, and
// their addresses.
func (t *tables) selected(svc objects.Service) []Endpoint {
	if len(svc.Spec.Selector) == 0 {
		return nil
	}
	ns := namespaceOf(svc)
	ids := t.idsByLabel[label{labelNamespace, ns}]
	for k, v := range svc.Spec.Selector {
		if s := t.idsByLabel[label{k, v}]; len(s) < len(ids) {
			ids = s
		}
	}
	var out []Endpoint
	for id := range ids {
		l := t.labels[id]
		if !t.eligible(l) || l[labelNamespace] != ns || !hasLabels(l, svc.Spec.Selector) {
			continue
		}
		for _, a := range t.ipsByID[id] {
			out = append(out, Endpoint{IP: a, Namespace: ns, Labels: l})
		}
	}
	return out
}

// ---- records ----

// rebuild recomputes the records of the dirty services into desired and
// adds the record keys it changed to pending.
func (t *tables) rebuild() {
	for key := range t.dirty {
		delete(t.dirty, key)
		old, hadOld := t.recOf[key]
		if hadOld {
			delete(t.recOf, key)
			delete(t.desired, old)
			t.pending[old] = struct{}{}
		}
		svc, ok := t.svcs[key]
		if !ok {
			continue
		}
		rec, annErr, err := Build(t.cluster, t.clusterID, svc, t.selected(svc))
		if annErr != nil {
			t.log.Warn("servicesync: global-service annotations ignored", "service", key, "err", annErr)
		}
		var value []byte
		if err == nil {
			value, err = rec.Marshal()
		}
		if err != nil {
			t.log.Warn("servicesync: service not published", "service", key, "err", err)
			continue
		}
		rk := records.ServiceKey(t.cluster, rec.Namespace, rec.Name)
		t.recOf[key] = rk
		t.desired[rk] = value
		t.pending[rk] = struct{}{}
	}
}
