package service

import (
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Resolver is Resolve followed by Merge, kept up to date per change: a
// changed endpoint touches only the services whose selector matches it
// (before or after the change), a changed service only itself, a changed
// remote record only the services of its namespace and name. It keeps a
// label index of the endpoints, an index of the services by one label of
// their selector (the reverse), and per service what it resolved to.
//
// The result is the same as Merge(Resolve(svcs, eps), svcs, remote) for
// the last inputs given (TestResolverMatchesResolve). A Resolver is not
// safe for concurrent use.
type Resolver struct {
	started                  bool
	svcGen, epGen, remoteGen uint64

	svcs   map[string]*resolved // by objects.Key
	byName map[string]string    // "ns/name" -> objects.Key
	eps    map[string]Endpoint  // by Endpoint.Key
	// epIdx: namespace -> label -> the keys of the endpoints that carry it.
	epIdx map[string]map[[2]string]map[string]struct{}
	// selIdx: namespace -> label -> the keys of the services whose
	// selector has it as its first label (by key): an endpoint can only
	// match a selector whose first label it carries.
	selIdx map[string]map[[2]string]map[string]struct{}
	remote map[string][]records.ServiceRecord // "ns/name" -> global, shared records
	// claims: the services that claim a frontend, sorted by key; the
	// first holds it.
	claims map[bpf.Frontend][]string
	out    map[bpf.Frontend][]bpf.Backend
	// pending are the services ChangeEndpoints affected, resolved by the
	// next Update.
	pending map[string]struct{}
}

// resolved is one service as the Resolver last computed it.
type resolved struct {
	svc       objects.Service  // namespace defaulted
	src       *objects.Service // the object svc was copied from, if given
	frontends []bpf.Frontend   // nil when the service is invalid
	selKey    [2]string        // its entry in selIdx (if it has a selector)
	backends  map[bpf.Frontend][]bpf.Backend
	external  []bpf.Frontend // those of frontends at load-balancer and external addresses
}

// NewResolver returns an empty Resolver.
func NewResolver() *Resolver {
	return &Resolver{
		svcs: map[string]*resolved{}, byName: map[string]string{}, eps: map[string]Endpoint{},
		epIdx: map[string]map[[2]string]map[string]struct{}{}, selIdx: map[string]map[[2]string]map[string]struct{}{},
		remote: map[string][]records.ServiceRecord{}, claims: map[bpf.Frontend][]string{}, out: map[bpf.Frontend][]bpf.Backend{},
		pending: map[string]struct{}{},
	}
}

// Update takes the inputs with their generations (equal generation: same
// input, not looked at; 0: unknown, always looked at) and returns every
// frontend with its backends, and the frontends whose backends may have
// changed since the last call. The map is the Resolver's: read it, do not
// keep or modify it. Every endpoint needs a Key unique among eps.
//
// src, when not nil, holds the objects svcs are copies of (src[i] for
// svcs[i]), from immutable snapshots: a service whose object is the one
// of the last call is unchanged without comparing it field by field,
// which kept a run O(all services) however little changed.
func (r *Resolver) Update(svcs []objects.Service, src []*objects.Service, svcGen uint64, eps []Endpoint, epGen uint64,
	remote []records.ServiceRecord, remoteGen uint64) (map[bpf.Frontend][]bpf.Backend, []bpf.Frontend) {
	return r.update(func(affected map[string]struct{}, touched map[bpf.Frontend]struct{}) {
		r.diffServices(svcs, src, affected, touched)
	}, svcGen, eps, epGen, remote, remoteGen)
}

// UpdateObjects is Update with the services given as the objects
// snapshot objs (by objects.Key; other kinds are skipped, the services
// are used as they are, not copied) and, when changed is not nil, what
// returns the keys of the objects changed since an earlier generation
// (ok false: not known). Then a run looks at the services changed since
// the last call only: its cost is the change, not every service.
func (r *Resolver) UpdateObjects(objs map[string]objects.Object, changed func(since uint64) ([]string, bool), svcGen uint64,
	eps []Endpoint, epGen uint64, remote []records.ServiceRecord, remoteGen uint64) (map[bpf.Frontend][]bpf.Backend, []bpf.Frontend) {
	return r.update(func(affected map[string]struct{}, touched map[bpf.Frontend]struct{}) {
		if changed != nil && r.started && r.svcGen != 0 && svcGen != 0 {
			if keys, ok := changed(r.svcGen); ok {
				for _, key := range keys {
					if !strings.HasPrefix(key, objects.KindService+"/") {
						continue
					}
					if s, ok := objs[key].(*objects.Service); ok {
						r.upsertService(key, *s, s, affected)
					} else if rs, ok := r.svcs[key]; ok {
						r.removeService(key, rs, touched)
					}
				}
				return
			}
		}
		var svcs []objects.Service
		var src []*objects.Service
		for _, o := range objs {
			if s, ok := o.(*objects.Service); ok {
				svcs, src = append(svcs, *s), append(src, s)
			}
		}
		r.diffServices(svcs, src, affected, touched)
	}, svcGen, eps, epGen, remote, remoteGen)
}

func (r *Resolver) update(diffSvcs func(affected map[string]struct{}, touched map[bpf.Frontend]struct{}), svcGen uint64, eps []Endpoint, epGen uint64,
	remote []records.ServiceRecord, remoteGen uint64) (map[bpf.Frontend][]bpf.Backend, []bpf.Frontend) {
	affected := r.pending
	r.pending = map[string]struct{}{}
	touched := map[bpf.Frontend]struct{}{}
	if !r.started || svcGen == 0 || svcGen != r.svcGen {
		diffSvcs(affected, touched)
	}
	if !r.started || epGen == 0 || epGen != r.epGen {
		r.diffEndpoints(eps, affected)
	}
	if !r.started || remoteGen == 0 || remoteGen != r.remoteGen {
		r.diffRemote(remote, affected)
	}
	r.started, r.svcGen, r.epGen, r.remoteGen = true, svcGen, epGen, remoteGen

	for key := range affected {
		rs, ok := r.svcs[key]
		if !ok {
			continue // removed: its claims went in diffServices
		}
		for _, f := range rs.frontends {
			touched[f] = struct{}{}
		}
		r.resolve(rs)
		for _, f := range rs.frontends {
			touched[f] = struct{}{}
		}
	}
	out := make([]bpf.Frontend, 0, len(touched))
	for f := range touched {
		out = append(out, f)
		claim := r.claims[f]
		if len(claim) == 0 {
			delete(r.out, f)
			continue
		}
		r.out[f] = r.svcs[claim[0]].backends[f]
	}
	return r.out, out
}

// External reports whether f, in the result of the last Update, is a
// frontend at a load-balancer or external address, or a node port
// (bpf.Frontend.IsNodePort), of the service that holds it, and that service's external traffic policy
// (objects.TrafficPolicyCluster or objects.TrafficPolicyLocal).
func (r *Resolver) External(f bpf.Frontend) (policy string, ok bool) {
	claim := r.claims[f]
	if len(claim) == 0 {
		return "", false
	}
	rs := r.svcs[claim[0]]
	if !slices.Contains(rs.external, f) {
		return "", false
	}
	return rs.svc.Spec.ExternalTraffic(), true
}

// diffServices applies a new list of services: removed ones give up their
// frontends; new and changed ones are affected. src is Update's.
func (r *Resolver) diffServices(svcs []objects.Service, src []*objects.Service, affected map[string]struct{}, touched map[bpf.Frontend]struct{}) {
	if src != nil && len(src) != len(svcs) {
		src = nil // not the sources of svcs: compare the values
	}
	next := make(map[string]int, len(svcs)) // index in svcs
	for i := range svcs {
		next[objects.Key(&svcs[i])] = i
	}
	for key, rs := range r.svcs {
		if _, ok := next[key]; !ok {
			r.removeService(key, rs, touched)
		}
	}
	for key, i := range next {
		var from *objects.Service
		if src != nil {
			from = src[i]
		}
		r.upsertService(key, svcs[i], from, affected)
	}
}

// removeService takes out a service that went: it gives up its
// frontends (they go, or to whoever else claims them).
func (r *Resolver) removeService(key string, rs *resolved, touched map[bpf.Frontend]struct{}) {
	r.unclaim(key, rs)
	r.unindexService(key, rs)
	delete(r.byName, rs.svc.Metadata.Namespace+"/"+rs.svc.Metadata.Name)
	delete(r.svcs, key)
	for _, f := range rs.frontends {
		touched[f] = struct{}{}
	}
}

// upsertService takes in service s (copied from the object from, if not
// nil) with key key: new or changed, it is affected.
func (r *Resolver) upsertService(key string, s objects.Service, from *objects.Service, affected map[string]struct{}) {
	rs, ok := r.svcs[key]
	if ok && from != nil && rs.src == from {
		return // the same immutable object as last time
	}
	s.Metadata.Namespace = namespaceOrDefault(s.Metadata.Namespace)
	// Pointers: DeepEqual of the values would copy both into
	// interfaces, two allocations per service.
	if ok && reflect.DeepEqual(&rs.svc, &s) {
		rs.src = from
		return
	}
	if ok {
		r.unindexService(key, rs)
	} else {
		rs = &resolved{}
		r.svcs[key] = rs
	}
	rs.svc, rs.src = s, from
	r.byName[s.Metadata.Namespace+"/"+s.Metadata.Name] = key
	r.indexService(key, rs)
	affected[key] = struct{}{}
}

// diffEndpoints applies a new list of endpoints: every service that
// selects an endpoint that came, changed or went is affected.
func (r *Resolver) diffEndpoints(eps []Endpoint, affected map[string]struct{}) {
	next := make(map[string]Endpoint, len(eps))
	for _, ep := range eps {
		next[ep.Key] = ep
	}
	for key := range r.eps {
		if _, ok := next[key]; !ok {
			r.removeEndpoint(key, affected)
		}
	}
	for _, ep := range next {
		r.putEndpoint(ep, affected)
	}
}

// ChangeEndpoints applies changes of the endpoints without the whole list
// (what Update's eps would have been, the endpoints of the last call with
// these changes): upserts are endpoints new or changed, removed the keys
// of endpoints gone, each key in one of them at most. The next Update, given the endpoint generation of the
// last call (so that it does not diff a list), resolves the services they
// touched: the cost is the change, not every endpoint.
func (r *Resolver) ChangeEndpoints(upserts []Endpoint, removed []string) {
	for _, key := range removed {
		r.removeEndpoint(key, r.pending)
	}
	for _, ep := range upserts {
		r.putEndpoint(ep, r.pending)
	}
}

// putEndpoint takes in ep, new or changed (or the same as before: then
// nothing happens); the services that select it, before or after, are
// affected.
func (r *Resolver) putEndpoint(ep Endpoint, affected map[string]struct{}) {
	ep.Namespace = namespaceOrDefault(ep.Namespace)
	if old, ok := r.eps[ep.Key]; ok {
		if sameEndpoint(old, ep) {
			return
		}
		r.removeEndpoint(ep.Key, affected)
	}
	r.eps[ep.Key] = ep
	r.indexEndpoint(ep.Key, ep)
	r.selecting(ep, affected)
}

// removeEndpoint takes out the endpoint of key, if any; the services that
// selected it are affected.
func (r *Resolver) removeEndpoint(key string, affected map[string]struct{}) {
	old, ok := r.eps[key]
	if !ok {
		return
	}
	r.selecting(old, affected)
	r.unindexEndpoint(key, old)
	delete(r.eps, key)
}

// diffRemote applies new remote service records: the services of the
// namespaces and names whose records changed are affected.
func (r *Resolver) diffRemote(remote []records.ServiceRecord, affected map[string]struct{}) {
	next := map[string][]records.ServiceRecord{}
	for _, rec := range remote {
		if rec.Global && rec.Shared {
			k := rec.Namespace + "/" + rec.Name
			next[k] = append(next[k], rec)
		}
	}
	for _, recs := range next {
		slices.SortFunc(recs, func(a, b records.ServiceRecord) int { return strings.Compare(a.Cluster, b.Cluster) })
	}
	for _, name := range unionKeys(r.remote, next) {
		if !reflect.DeepEqual(r.remote[name], next[name]) {
			if key, ok := r.byName[name]; ok {
				affected[key] = struct{}{}
			}
		}
	}
	r.remote = next
}

// resolve computes a service's frontends and their backends, and updates
// its claims.
func (r *Resolver) resolve(rs *resolved) {
	key := objects.Key(rs.svc)
	r.unclaim(key, rs)
	rs.frontends, rs.backends, rs.external = nil, nil, nil
	if rs.svc.Validate() != nil {
		return
	}
	fs, err := allFrontends(rs.svc)
	if err != nil {
		return
	}
	rs.frontends = fs
	rs.external = append(rs.svc.ExternalFrontends(), rs.svc.NodePortFrontends()...)
	rs.backends = make(map[bpf.Frontend][]bpf.Backend, len(fs))
	addrs := r.addrs(rs.svc)
	g, gerr := GlobalOf(rs.svc)
	recs := r.remote[rs.svc.Metadata.Namespace+"/"+rs.svc.Metadata.Name]
	for _, f := range fs {
		bs := backendsFor(f, rs.svc, addrs)
		if gerr == nil && g.Global && len(recs) > 0 {
			bs = pickBackends(g.Affinity, bs, remoteBackends(f, rs.svc, recs))
		}
		rs.backends[f] = bs
		c := r.claims[f]
		i, _ := slices.BinarySearch(c, key)
		r.claims[f] = slices.Insert(c, i, key)
	}
}

// addrs returns the candidate addresses of svc: the selected endpoints'
// (through the index) and the explicit backends.
func (r *Resolver) addrs(svc objects.Service) []netip.Addr {
	var out []netip.Addr
	if sel := svc.Spec.Selector; len(sel) > 0 {
		var best map[string]struct{}
		first := true
		for k, v := range sel {
			if l := r.epIdx[svc.Metadata.Namespace][[2]string{k, v}]; first || len(l) < len(best) {
				best, first = l, false
			}
		}
		// Sorted, so the backends do not depend on map order (they are
		// sorted again, but equal addresses must dedupe the same way).
		for _, key := range slices.Sorted(maps.Keys(best)) {
			if ep := r.eps[key]; ep.Labels.Has(sel) {
				out = append(out, ep.IPs...)
			}
		}
	}
	for _, b := range svc.Spec.Backends {
		if ip, err := netip.ParseAddr(b.IP); err == nil {
			out = append(out, ip)
		}
	}
	return out
}

func (r *Resolver) unclaim(key string, rs *resolved) {
	for _, f := range rs.frontends {
		c := r.claims[f]
		if i, ok := slices.BinarySearch(c, key); ok {
			c = slices.Delete(c, i, i+1)
		}
		if len(c) == 0 {
			delete(r.claims, f)
		} else {
			r.claims[f] = c
		}
	}
}

// selecting adds to affected the services whose selector matches ep.
func (r *Resolver) selecting(ep Endpoint, affected map[string]struct{}) {
	byLabel := r.selIdx[ep.Namespace]
	for k, v := range ep.Labels {
		for key := range byLabel[[2]string{k, v}] {
			if ep.Labels.Has(r.svcs[key].svc.Spec.Selector) {
				affected[key] = struct{}{}
			}
		}
	}
}

func (r *Resolver) indexService(key string, rs *resolved) {
	sel := rs.svc.Spec.Selector
	if len(sel) == 0 {
		return
	}
	k := slices.Min(slices.Collect(maps.Keys(sel)))
	rs.selKey = [2]string{k, sel[k]}
	addIdx(r.selIdx, rs.svc.Metadata.Namespace, rs.selKey, key)
}

func (r *Resolver) unindexService(key string, rs *resolved) {
	if len(rs.svc.Spec.Selector) > 0 {
		delIdx(r.selIdx, rs.svc.Metadata.Namespace, rs.selKey, key)
	}
}

func (r *Resolver) indexEndpoint(key string, ep Endpoint) {
	for k, v := range ep.Labels {
		addIdx(r.epIdx, ep.Namespace, [2]string{k, v}, key)
	}
}

func (r *Resolver) unindexEndpoint(key string, ep Endpoint) {
	for k, v := range ep.Labels {
		delIdx(r.epIdx, ep.Namespace, [2]string{k, v}, key)
	}
}

func addIdx(idx map[string]map[[2]string]map[string]struct{}, ns string, l [2]string, key string) {
	byLabel := idx[ns]
	if byLabel == nil {
		byLabel = map[[2]string]map[string]struct{}{}
		idx[ns] = byLabel
	}
	set := byLabel[l]
	if set == nil {
		set = map[string]struct{}{}
		byLabel[l] = set
	}
	set[key] = struct{}{}
}

func delIdx(idx map[string]map[[2]string]map[string]struct{}, ns string, l [2]string, key string) {
	set := idx[ns][l]
	delete(set, key)
	if len(set) == 0 {
		delete(idx[ns], l)
	}
	if len(idx[ns]) == 0 {
		delete(idx, ns)
	}
}

func sameEndpoint(a, b Endpoint) bool {
	return a.Namespace == b.Namespace && maps.Equal(a.Labels, b.Labels) && slices.Equal(a.IPs, b.IPs)
}

func unionKeys[V any](a, b map[string]V) []string {
	out := slices.Collect(maps.Keys(a))
	for k := range b {
		if _, ok := a[k]; !ok {
			out = append(out, k)
		}
	}
	return out
}
