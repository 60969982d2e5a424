package datapath

import (
	"maps"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// localIPs is the part of the desired ipcache the node decides itself,
// which overrides the mesh's entries: the world by default, the own
// cluster's other nodes (remote-node), the node's addresses (host), its
// pods' addresses (their identities), each overriding the one before.
// Its size is the node's, not the mesh's. The pods' part is kept per
// endpoint, so that a run updates it for the endpoints that changed only.
// (An address is one endpoint's: IPAM gives it to one.)
type localIPs struct {
	base  map[netip.Prefix]bpf.IPCacheEntry // the world, the nodes, the node's addresses
	eps   map[netip.Prefix]bpf.IPCacheEntry // the pods' addresses
	of    map[string][]netip.Prefix         // the prefixes of each endpoint, by key
	epGen uint64                            // the EndpointsGen of eps
}

// localBase is the node's part of the desired ipcache but its pods'.
func localBase(s desired.State) map[netip.Prefix]bpf.IPCacheEntry {
	base := map[netip.Prefix]bpf.IPCacheEntry{
		netip.MustParsePrefix("0.0.0.0/0"): {Identity: bpf.IdentityWorld},
		netip.MustParsePrefix("::/0"):      {Identity: bpf.IdentityWorld},
	}
	maps.Copy(base, s.Mesh.NodeIPCache())
	for _, ip := range s.HostAddrs {
		base[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: bpf.IdentityHost}
	}
	return base
}

// newLocalIPs derives the node's part of s from scratch.
func newLocalIPs(s desired.State) *localIPs {
	l := &localIPs{base: localBase(s), eps: map[netip.Prefix]bpf.IPCacheEntry{}, of: map[string][]netip.Prefix{}, epGen: s.EndpointsGen}
	for _, ep := range s.Endpoints {
		l.addEndpoint(ep)
	}
	return l
}

// addEndpoint adds ep's addresses and returns their prefixes.
func (l *localIPs) addEndpoint(ep state.Endpoint) []netip.Prefix {
	ps := make([]netip.Prefix, 0, len(ep.IPs))
	for _, ip := range ep.IPs {
		p := netip.PrefixFrom(ip, ip.BitLen())
		l.eps[p] = bpf.IPCacheEntry{Identity: ep.Identity}
		ps = append(ps, p)
	}
	l.of[ep.Key()] = ps
	return ps
}

// update brings l to s, deriving again the base and the endpoints that
// changed since l's, and returns the prefixes whose entry may have
// changed; ok is false when the changed endpoints are not known and l was
// derived from scratch (any entry may have changed).
func (l *localIPs) update(s desired.State) (changed []netip.Prefix, ok bool) {
	keys, known := []string(nil), false
	if s.EndpointsGen != 0 && s.EndpointsChangedSince != nil {
		keys, known = s.EndpointsChangedSince(l.epGen)
	}
	if !known {
		*l = *newLocalIPs(s)
		return nil, false
	}
	base := localBase(s)
	for p, e := range base {
		if old, ok := l.base[p]; !ok || old != e {
			changed = append(changed, p)
		}
	}
	for p := range l.base {
		if _, ok := base[p]; !ok {
			changed = append(changed, p)
		}
	}
	l.base = base
	for _, k := range keys {
		for _, p := range l.of[k] {
			delete(l.eps, p)
			changed = append(changed, p)
		}
		delete(l.of, k)
		if i, ok := state.SearchEndpoints(s.Endpoints, k); ok {
			changed = append(changed, l.addEndpoint(s.Endpoints[i])...)
		}
	}
	l.epGen = s.EndpointsGen
	return changed, true
}

// get returns the node's entry for p.
func (l *localIPs) get(p netip.Prefix) (bpf.IPCacheEntry, bool) {
	if e, ok := l.eps[p]; ok {
		return e, true
	}
	e, ok := l.base[p]
	return e, ok
}

// rangeAll calls f with every entry.
func (l *localIPs) rangeAll(f func(netip.Prefix, bpf.IPCacheEntry)) {
	for p, e := range l.base {
		if _, over := l.eps[p]; !over {
			f(p, e)
		}
	}
	for p, e := range l.eps {
		f(p, e)
	}
}

// wantIPCache is the whole desired ipcache: the mesh's entries under the
// local ones.
func wantIPCache(s desired.State, local *localIPs) map[netip.Prefix]bpf.IPCacheEntry {
	want := map[netip.Prefix]bpf.IPCacheEntry{}
	s.Mesh.AddIPCache(want)
	local.rangeAll(func(p netip.Prefix, e bpf.IPCacheEntry) { want[p] = e })
	return want
}

// syncIPCache writes what differs between the desired ipcache and the
// shadow of the map. It looks only at the prefixes that changed: those the
// mesh reports and those whose local entry changed since the last run. A
// full pass (every entry) happens when the shadow is listed again (first
// run, resync, after a failed write), when the mesh asks for it, and when
// what the mesh part is read with changed (readiness, the node's IPs).
func (r *Reconciler) syncIPCache(s desired.State, res *Result) error {
	r.driftIPCache(res)
	changed, full := s.Mesh.TakeIPChanges()
	var localChanged []netip.Prefix
	if r.ipcLocal == nil {
		r.ipcLocal, full = newLocalIPs(s), true
	} else if c, ok := r.ipcLocal.update(s); ok {
		localChanged = c
	} else {
		full = true
	}
	local := r.ipcLocal
	if r.ipcShadow == nil {
		have, err := r.dp.IPCacheList()
		if err != nil {
			r.ipcLocal = nil // the changes taken are lost: a full pass next time
			return err
		}
		r.ipcShadow = shadowOf(have)
		full = true
	}
	if s.Mesh.Ready != r.ipcReady || !slices.Equal(s.Mesh.NodeIPs, r.ipcNodeIPs) {
		full = true
	}
	if n := len(r.ipcShadow) + len(changed); len(changed) > len(r.ipcShadow) && n > 1024 {
		// Many new entries at once (a remote cluster came into use):
		// grow the shadow once, not by doubling while writing them.
		r.ipcShadow = r.ipcShadow.grown(n)
	}
	have := r.ipcShadow
	failed := false
	overflow := 0
	if !full {
		overflow = int(r.ipcOverflow.Load()) // those left out stay out until a full pass
	}
	// Upserts are queued and written in batches (one syscall per
	// bpf.IPCacheBatch entries), each in the background while the next
	// one is built. The shadow takes them when queued, so that the limit
	// counts them; a write that fails lists the map again next time
	// (failed), which repairs the shadow.
	var ups batchUpserts
	onFail := func(err error) {
		failed = true
		res.Errs = append(res.Errs, err) // counted in res.IPCache when queued
	}
	flush := func() { ups.flush(r.dp, onFail) }
	write := func(p netip.Prefix, e bpf.IPCacheEntry, ok bool) {
		h, had := have.get(p)
		if ok && !had && len(have) >= r.ipcMeshLimit {
			if _, mine := local.get(p); !mine {
				overflow++ // a mesh entry past the limit: the node's own come first
				return
			}
		}
		switch {
		case ok && (!had || h != e):
			ups.add(p, e)
			v := valOf(e)
			v.epoch = r.ipcEpoch
			have[keyOf(p)] = v
			res.IPCache++
			if len(ups.ps) >= bpf.IPCacheBatch {
				ups.start(r.dp, onFail)
			}
		case !ok && had && s.Mesh.MayRemove(p):
			// A delete goes after the upserts queued before it (one
			// of them may name the same prefix).
			flush()
			if err := r.dp.IPCacheDelete(p); err != nil {
				failed = true
				res.note(&res.IPCache, err)
				return
			}
			delete(have, keyOf(p))
			res.IPCache++
		}
	}
	if full {
		want := wantIPCache(s, local)
		// Removals first, then the node's own entries, then the mesh's:
		// when the map is full, what is left out is the mesh's.
		for k := range have {
			if p := k.prefix(); !hasKey(want, p) {
				write(p, bpf.IPCacheEntry{}, false)
			}
		}
		local.rangeAll(func(p netip.Prefix, e bpf.IPCacheEntry) { write(p, e, true) })
		for p, e := range want {
			if _, mine := local.get(p); !mine {
				write(p, e, true)
			}
		}
	} else {
		one := func(p netip.Prefix) {
			if e, ok := local.get(p); ok {
				write(p, e, true)
				return
			}
			e, ok := s.Mesh.LookupIP(p)
			write(p, e, ok)
		}
		for _, p := range changed {
			one(p)
		}
		for _, p := range localChanged {
			one(p)
		}
	}
	flush()
	r.ipcReady, r.ipcNodeIPs = s.Mesh.Ready, slices.Clone(s.Mesh.NodeIPs)
	if failed {
		r.ipcShadow = nil // list the map again next time, and a full pass
	}
	r.ipcEntries.Store(int64(len(have))) // for /metrics, without walking the map
	if old := r.ipcOverflow.Swap(int64(overflow)); overflow > 0 && old == 0 {
		res.Overflow = overflow
	}
	return nil
}

func hasKey[K comparable, V any](m map[K]V, k K) bool {
	_, ok := m[k]
	return ok
}

// batchUpserts queues ipcache upserts for Datapath.IPCacheUpsertBatch.
// start writes the queued ones in the background, while the caller queues
// the next batch (at most one batch in flight: the datapath is never
// called from two goroutines at once); flush writes what is queued and
// waits until everything is written.
type batchUpserts struct {
	ps []netip.Prefix
	es []bpf.IPCacheEntry
	// The batch in flight: its failures come on done.
	done chan []error
	// spare buffers, of the last batch written
	spareP []netip.Prefix
	spareE []bpf.IPCacheEntry
}

func (b *batchUpserts) add(p netip.Prefix, e bpf.IPCacheEntry) {
	b.ps, b.es = append(b.ps, p), append(b.es, e)
}

// start waits for the batch in flight (its failures go to failed) and
// starts writing the queued upserts in the background.
func (b *batchUpserts) start(dp Datapath, failed func(error)) {
	b.wait(failed)
	if len(b.ps) == 0 {
		return
	}
	ps, es := b.ps, b.es
	b.ps, b.es = b.spareP[:0], b.spareE[:0]
	b.done = make(chan []error, 1)
	go func(done chan<- []error) { done <- writeUpserts(dp, ps, es) }(b.done)
	b.spareP, b.spareE = ps, es // written by the time wait returns
}

// wait waits for the batch in flight, if any; its failures go to failed.
func (b *batchUpserts) wait(failed func(error)) {
	if b.done == nil {
		return
	}
	for _, err := range <-b.done {
		failed(err)
	}
	b.done = nil
}

// flush writes the queued upserts and waits until every batch is written.
func (b *batchUpserts) flush(dp Datapath, failed func(error)) {
	b.start(dp, failed)
	b.wait(failed)
}

// writeUpserts writes ps[i] -> es[i]. An entry that fails is reported and
// the ones after it are written still, as one by one.
func writeUpserts(dp Datapath, ps []netip.Prefix, es []bpf.IPCacheEntry) []error {
	var errs []error
	for len(ps) > 0 {
		n, err := dp.IPCacheUpsertBatch(ps, es)
		if err == nil {
			break
		}
		errs = append(errs, err)
		n++ // the failed one
		ps, es = ps[min(n, len(ps)):], es[min(n, len(es)):]
	}
	return errs
}
