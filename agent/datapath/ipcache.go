package datapath

import (
	"maps"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// localIPCache is the part of the desired ipcache the node decides itself,
// which overrides the mesh's entries: the world by default, the own
// cluster's other nodes (remote-node), the node's addresses (host), its
// pods' addresses (their identities), each overriding the one before.
// Its size is the node's, not the mesh's.
func localIPCache(s desired.State) map[netip.Prefix]bpf.IPCacheEntry {
	want := map[netip.Prefix]bpf.IPCacheEntry{
		netip.MustParsePrefix("0.0.0.0/0"): {Identity: bpf.IdentityWorld},
		netip.MustParsePrefix("::/0"):      {Identity: bpf.IdentityWorld},
	}
	maps.Copy(want, s.Mesh.NodeIPCache())
	for _, ip := range s.HostAddrs {
		want[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: bpf.IdentityHost}
	}
	for _, ep := range s.Endpoints {
		for _, ip := range ep.IPs {
			want[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: ep.Identity}
		}
	}
	return want
}

// wantIPCache is the whole desired ipcache: the mesh's entries under the
// local ones.
func wantIPCache(s desired.State, local map[netip.Prefix]bpf.IPCacheEntry) map[netip.Prefix]bpf.IPCacheEntry {
	want := map[netip.Prefix]bpf.IPCacheEntry{}
	s.Mesh.AddIPCache(want)
	maps.Copy(want, local)
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
	local := localIPCache(s)
	if r.ipcShadow == nil {
		have, err := r.dp.IPCacheList()
		if err != nil {
			r.ipcLocal = nil // the changes taken are lost: a full pass next time
			return err
		}
		r.ipcShadow = shadowOf(have)
		full = true
	}
	if r.ipcLocal == nil || s.Mesh.Ready != r.ipcReady || !slices.Equal(s.Mesh.NodeIPs, r.ipcNodeIPs) {
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
			if _, mine := local[p]; !mine {
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
		for p, e := range local {
			write(p, e, true)
		}
		for p, e := range want {
			if _, mine := local[p]; !mine {
				write(p, e, true)
			}
		}
	} else {
		one := func(p netip.Prefix) {
			if e, ok := local[p]; ok {
				write(p, e, true)
				return
			}
			e, ok := s.Mesh.LookupIP(p)
			write(p, e, ok)
		}
		for _, p := range changed {
			one(p)
		}
		for p, e := range local {
			if old, ok := r.ipcLocal[p]; !ok || old != e {
				one(p)
			}
		}
		for p := range r.ipcLocal {
			if _, ok := local[p]; !ok {
				one(p)
			}
		}
	}
	flush()
	r.ipcLocal, r.ipcReady, r.ipcNodeIPs = local, s.Mesh.Ready, slices.Clone(s.Mesh.NodeIPs)
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
