package datapath

import (
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

func (s ipShadow) get(p netip.Prefix) (bpf.IPCacheEntry, bool) {
	v, ok := s[keyOf(p)]
	return v.entry(), ok
}

// ipcList is a listing of the BPF ipcache, for the drift check.
type ipcList struct {
	entries map[netip.Prefix]bpf.IPCacheEntry
	err     error
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
	go func() {
		entries, err := r.dp.IPCacheList()
		ch <- ipcList{entries, err}
		if r.requestRun != nil {
			r.requestRun()
		}
	}()
}

// driftIPCache compares a background listing, if one is in, with the
// shadow and writes again what differs, as the shadow says. The listing
// may be older than writes made meanwhile, or have missed entries written
// while it ran: for such an entry it differs from the shadow, and writing
// the shadow's value again is harmless, so no difference is mistaken for
// more than a rewrite. A listing that failed leaves the check to the next
// interval.
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
		want, ok := r.ipcShadow.get(p)
		switch {
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
