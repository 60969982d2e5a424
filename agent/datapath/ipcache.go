package datapath

import (
	"net/netip"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// wantIPCache is who owns which address: the world by default, the rest
// of the mesh, then the local facts, which override it (the node's
// addresses are the host, its pods' addresses their identities).
func wantIPCache(s desired.State) map[netip.Prefix]bpf.IPCacheEntry {
	want := map[netip.Prefix]bpf.IPCacheEntry{
		netip.MustParsePrefix("0.0.0.0/0"): {Identity: bpf.IdentityWorld},
		netip.MustParsePrefix("::/0"):      {Identity: bpf.IdentityWorld},
	}
	s.Mesh.AddIPCache(want) // the rest of the mesh; local facts below override it
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

// syncIPCache diffs against the shadow of the map (listed again when stale
// or after a failed write) and writes the difference.
func (r *Reconciler) syncIPCache(s desired.State, res *Result) error {
	want := wantIPCache(s)
	if r.ipcShadow == nil || time.Since(r.ipcListedAt) >= reconcile.ResyncInterval {
		have, err := r.dp.IPCacheList()
		if err != nil {
			return err
		}
		r.ipcShadow, r.ipcListedAt = have, time.Now()
	}
	have := r.ipcShadow
	failed := false
	for p, e := range want {
		if h, ok := have[p]; !ok || h != e {
			if err := r.dp.IPCacheUpsert(p, e); err != nil {
				failed = true
				res.note(&res.IPCache, err)
				continue
			}
			have[p] = e
			res.IPCache++
		}
	}
	for p := range have {
		if _, ok := want[p]; !ok && s.Mesh.MayRemove(p) {
			if err := r.dp.IPCacheDelete(p); err != nil {
				failed = true
				res.note(&res.IPCache, err)
				continue
			}
			delete(have, p)
			res.IPCache++
		}
	}
	if failed {
		r.ipcShadow = nil // list the map again next time
	}
	r.ipcEntries.Store(int64(len(have))) // for /metrics, without walking the map
	return nil
}
