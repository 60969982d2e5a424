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
