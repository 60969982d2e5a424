package lbipam

import (
	"maps"
	"math/big"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Extend is Allocate for the common case of a bulk apply: since prev was
// computed, services were only added (added, every one new), and the
// pools did not change. It then allocates for the added services alone,
// in time proportional to them: taken tells it which addresses are not
// free (held by an assignment of prev, or a VIP or external IP of any
// service, the added ones included), which the caller keeps up to date as
// services come and go (Reserved, Held) instead of Extend walking every
// service and assignment on each call. prev must be what Allocate (or
// Extend) returned for the same pools and the services before the
// additions; its Assignments map is extended in place and returned in
// res (copying it would cost O(all services) per call again), so the
// caller must not use prev afterwards.
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
// as Allocate's last step does. prev is untouched when ok is false.
func Extend(pools []objects.LoadBalancerIPPool, taken func(netip.Addr) bool, prev Result, added []objects.Service) (res Result, ok bool) {
	if prev.Refused() > 0 {
		return Result{}, false
	}
	b := newAllocator(pools, added)
	for _, s := range b.svcs {
		if len(s.request) > 0 {
			return Result{}, false
		}
		if _, dup := prev.Assignments[s.key]; dup {
			return Result{}, false // not added: the caller's bookkeeping is off
		}
	}
	// The added services' own VIPs are in b.reserved too, but taken
	// already answers for them; only whether an address is taken matters
	// below (the owner is named in request refusals, and there are no
	// requests here).
	b.taken = taken
	b.allocateRest()
	more := b.result()

	res = Result{Assignments: prev.Assignments, Pools: map[string]PoolUsage{}}
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

// Taken is an index of the addresses Extend must not hand out, kept up to
// date by its caller: the VIPs and external IPs of every service
// (counted, as two services may name one address until a conflict check
// refuses the second) and the addresses held by the last result. The
// zero value is not ready; use NewTaken.
type Taken struct {
	reserved map[netip.Addr]int
	held     map[netip.Addr]struct{}
}

// NewTaken returns an empty index.
func NewTaken() *Taken {
	return &Taken{reserved: map[netip.Addr]int{}, held: map[netip.Addr]struct{}{}}
}

// Reserve counts s's VIPs and external IPs in (add true) or out.
func (t *Taken) Reserve(s *objects.Service, add bool) {
	for _, vs := range [][]string{s.Spec.VIPs, s.Spec.ExternalIPs} {
		for _, v := range vs {
			ip, err := netip.ParseAddr(v)
			if err != nil {
				continue
			}
			if add {
				t.reserved[ip]++
			} else if t.reserved[ip]--; t.reserved[ip] <= 0 {
				delete(t.reserved, ip)
			}
		}
	}
}

// Hold marks the addresses of asg as held.
func (t *Taken) Hold(asg Assignment) {
	for _, ad := range asg.Addrs {
		t.held[ad.IP] = struct{}{}
	}
}

// HoldOnly makes the held addresses those of asgs (after a whole
// allocation).
func (t *Taken) HoldOnly(asgs map[string]Assignment) {
	clear(t.held)
	for _, a := range asgs {
		t.Hold(a)
	}
}

// Has reports whether ip is reserved or held: Extend's taken.
func (t *Taken) Has(ip netip.Addr) bool {
	if _, ok := t.held[ip]; ok {
		return true
	}
	return t.reserved[ip] > 0
}
