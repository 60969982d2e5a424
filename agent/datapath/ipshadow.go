package datapath

import (
	"maps"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/bpf"
)

// ipShadow is the BPF ipcache as the reconciler last wrote it, compact:
// netip.Prefix and netip.Addr each carry a pointer and padding (a
// map[netip.Prefix]bpf.IPCacheEntry slot is 64 bytes), these 44. At
// hundreds of thousands of entries the shadow is most of the reconciler's
// heap.
type ipShadow map[ipKey]ipVal

type ipKey struct {
	addr [16]byte
	bits uint8
	v4   bool
}

type ipVal struct {
	identity uint32
	host     [16]byte
	fam      uint8 // of host: 0 none, 4, 6
	// epoch is the Reconciler's ipcEpoch when the entry was written (in
	// the padding: the struct stays 24 bytes). The drift check leaves
	// alone what was written after its listing started.
	epoch uint16
}

func keyOf(p netip.Prefix) ipKey {
	return ipKey{addr: p.Addr().As16(), bits: uint8(p.Bits()), v4: p.Addr().Is4()}
}

func (k ipKey) prefix() netip.Prefix {
	a := netip.AddrFrom16(k.addr)
	if k.v4 {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, int(k.bits))
}

func valOf(e bpf.IPCacheEntry) ipVal {
	v := ipVal{identity: e.Identity}
	switch {
	case e.HostIP.Is4():
		v.host, v.fam = e.HostIP.As16(), 4
	case e.HostIP.Is6():
		v.host, v.fam = e.HostIP.As16(), 6
	}
	return v
}

func (v ipVal) entry() bpf.IPCacheEntry {
	e := bpf.IPCacheEntry{Identity: v.identity}
	switch v.fam {
	case 4:
		e.HostIP = netip.AddrFrom16(v.host).Unmap()
	case 6:
		e.HostIP = netip.AddrFrom16(v.host)
	}
	return e
}

func shadowOf(m map[netip.Prefix]bpf.IPCacheEntry) ipShadow {
	s := make(ipShadow, len(m))
	for p, e := range m {
		s[keyOf(p)] = valOf(e)
	}
	return s
}

// grown returns s in a map with room for n entries.
func (s ipShadow) grown(n int) ipShadow {
	g := make(ipShadow, n)
	maps.Copy(g, s)
	return g
}

func (s ipShadow) get(p netip.Prefix) (bpf.IPCacheEntry, bool) {
	v, ok := s[keyOf(p)]
	return v.entry(), ok
}

// ipcList is a listing of the BPF ipcache, for the drift check.
type ipcList struct {
	entries map[netip.Prefix]bpf.IPCacheEntry
	err     error
	epoch   uint16 // the ipcEpoch of the writes made since it started
}

// listIPCacheInBackground lists the BPF ipcache off the reconcile loop: at
// hundreds of thousands of entries that takes a second or more, during
// which changes keep flowing. The next run after it compares (driftIPCache).
func (r *Reconciler) listIPCacheInBackground() {
	if r.ipcListing != nil || r.ipcShadow == nil {
		return // one in flight, or the next run lists anyway
	}
	ch := make(chan ipcList, 1)
	r.ipcListing = ch
	r.ipcEpoch++
	epoch := r.ipcEpoch
	go func() {
		entries, err := r.dp.IPCacheList()
		ch <- ipcList{entries, err, epoch}
		if r.requestRun != nil {
			r.requestRun()
		}
	}()
}

// driftIPCache compares a background listing, if one is in, with the
// shadow and writes again what differs, as the shadow says. The listing
// may be older than writes made meanwhile, or have missed entries written
// while it ran: the entries the shadow has from writes since the listing
// started (their epoch) are left alone, as they were just written (a full
// sync during a listing writes 100,000 of them, and writing them all
// again doubled the agent's syscalls). A prefix deleted meanwhile is
// deleted again, which is harmless. A listing that failed leaves the
// check to the next interval. (The epoch wraps after 65,536 listings,
// about 45 days of them: an entry unchanged since then whose epoch comes
// round again is checked at the next one.)
func (r *Reconciler) driftIPCache(res *Result) {
	if r.ipcListing == nil {
		return
	}
	var l ipcList
	select {
	case l = <-r.ipcListing:
		r.ipcListing = nil
	default:
		return // still listing
	}
	if l.err != nil || r.ipcShadow == nil {
		return
	}
	fixed := 0
	for p, e := range l.entries {
		v, ok := r.ipcShadow[keyOf(p)]
		want := v.entry()
		switch {
		case ok && v.epoch == l.epoch:
			// written since the listing started
		case !ok:
			if err := r.dp.IPCacheDelete(p); err != nil {
				res.note(&res.IPCache, err)
				continue
			}
			fixed++
		case want != e:
			if err := r.dp.IPCacheUpsert(p, want); err != nil {
				res.note(&res.IPCache, err)
				continue
			}
			fixed++
		}
	}
	for k, v := range r.ipcShadow {
		if v.epoch == l.epoch {
			continue
		}
		p := k.prefix()
		if _, ok := l.entries[p]; !ok {
			if err := r.dp.IPCacheUpsert(p, v.entry()); err != nil {
				res.note(&res.IPCache, err)
				continue
			}
			fixed++
		}
	}
	res.IPCache += fixed
	r.ipcDrift.Add(int64(fixed))
}
