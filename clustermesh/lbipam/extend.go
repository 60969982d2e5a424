package lbipam

import (
	"iter"
	"maps"
	"math/big"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Extend is Allocate for the common case of a bulk apply: since prev was
// computed, services were only added (keys in added, by ServiceKey), and
// the pools did not change. It then allocates for the added services
// alone, in time proportional to them plus one pass over the addresses
// in use and reserved, instead of building every service's state again.
// svcs yields every service (the added ones included) for the VIPs and
// external IPs that are never handed out; prev.Assignments must be what
// Allocate returned for the same pools and the services before the
// additions.
//
// It returns ok false, and the caller runs Allocate, where the shortcut
// could give another answer than Allocate: when a service in prev was
// refused (an address an added service takes could be the one it waits
// for, or change the reason it is given) or an added service requests an
// address (honouring requests may move addresses between services).
// Otherwise the result equals Allocate(pools, svcs, prev.Assignments):
// the services of prev keep what they hold (none lacks an address, none
// requests one it does not have), and the added ones get, in key order,
// the lowest free address of the first pool that can give one, exactly
// as Allocate's last step does.
func Extend(pools []objects.LoadBalancerIPPool, svcs iter.Seq[*objects.Service], prev Result, added []objects.Service) (res Result, ok bool) {
	if prev.Refused() > 0 {
		return Result{}, false
	}
	a := &allocator{used: map[netip.Addr]*svc{}, reserved: map[netip.Addr]string{}}
	b := newAllocator(pools, added)
	a.pools = b.pools
	for _, s := range b.svcs {
		if len(s.request) > 0 {
			return Result{}, false
		}
		if _, dup := prev.Assignments[s.key]; dup {
			return Result{}, false // not added: the caller's bookkeeping is off
		}
	}
	// Only whether an address is reserved matters below (the owner is
	// named in request refusals, and there are no requests here).
	for s := range svcs {
		for _, v := range s.Spec.VIPs {
			if ip, err := netip.ParseAddr(v); err == nil {
				a.reserved[ip] = ""
			}
		}
		for _, v := range s.Spec.ExternalIPs {
			if ip, err := netip.ParseAddr(v); err == nil {
				a.reserved[ip] = ""
			}
		}
	}
	held := &svc{} // the owner of prev's addresses: only presence matters here
	for _, asg := range prev.Assignments {
		for _, ad := range asg.Addrs {
			a.used[ad.IP] = held
		}
	}
	a.svcs = b.svcs
	a.allocateRest()
	more := a.result()

	res = Result{Assignments: maps.Clone(prev.Assignments), Pools: map[string]PoolUsage{}}
	if res.Assignments == nil {
		res.Assignments = map[string]Assignment{}
	}
	maps.Copy(res.Assignments, more.Assignments)
	for name, u := range more.Pools {
		p := prev.Pools[name]
		if p.Total == nil {
			p.Total = new(big.Int).Set(u.Total)
		}
		p.Used += u.Used
		p.Kept = slices.Clone(p.Kept) // added services never hold kept addresses
		res.Pools[name] = p
	}
	return res, true
}
