// Package lbipam is LB-IPAM's allocator: which load-balancer addresses
// the Services of type LoadBalancer get from the LoadBalancerIPPools. It is
// pure: given the pools, the services and the previous assignments it
// returns the new assignments; the clustermesh server (package lbipamsync)
// stores them in the cluster's etcd, a standalone agent in its state dir.
//
// Rules:
//   - An address in use never moves: a service keeps its previous address
//     when a pool is edited (even one that no longer covers it: the
//     assignment says so in Kept), disabled or deleted, on restart, and
//     when pools overlap.
//   - A service gets one address per family of its VIPs.
//   - A requested address (spec.loadBalancerIPs) is honoured when it is in
//     an enabled pool that selects the service, unused, and not a VIP or
//     external IP of any service; otherwise the service is refused with the
//     reason (and keeps what it held).
//   - Otherwise the lowest free address of the first pool, in name order,
//     that is enabled, selects the service and has one of the family.
//   - A service that is deleted or no longer of type LoadBalancer is not in
//     the result: its addresses are free.
//
// Contract:
//
//	func Allocate(pools []objects.LoadBalancerIPPool, svcs []objects.Service, prev map[string]Assignment) Result
//	func ServiceKey(s objects.Service) string // "<namespace>/<name>"
//	func ApplyStatus(objs map[string]objects.Object, asg map[string]Assignment) (map[string]objects.Object, []string)
package lbipam

import (
	"cmp"
	"fmt"
	"maps"
	"math/big"
	"net/netip"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Addr is one address assigned to a service.
type Addr struct {
	IP netip.Addr
	// Pool is the pool the address belongs to: the one it came from, or,
	// if that one no longer covers it, the first pool that does.
	Pool string
	// Kept is set when the address stays although its pool no longer
	// offers it to the service, and says why.
	Kept string
}

// Assignment is what LB-IPAM decided for one service.
type Assignment struct {
	// Addrs holds at most one address per family, IPv4 first.
	Addrs []Addr
	// Refused says why the service lacks an address it should have (a
	// family without one, or a requested address not honoured); empty
	// when all is well.
	Refused string
}

// Equal reports whether two assignments are the same.
func (a Assignment) Equal(b Assignment) bool {
	return a.Refused == b.Refused && slices.Equal(a.Addrs, b.Addrs)
}

// PoolUsage is what one pool holds.
type PoolUsage struct {
	Total *big.Int // addresses in its blocks
	Used  int      // addresses assigned from it, kept ones included
	// Kept are assigned addresses of the pool that it no longer covers.
	Kept []netip.Addr
}

// Result is the outcome of Allocate.
type Result struct {
	// Assignments by ServiceKey, one per LoadBalancer service.
	Assignments map[string]Assignment
	// Pools by pool name.
	Pools map[string]PoolUsage
}

// Refused counts the services with a refusal.
func (r Result) Refused() int {
	n := 0
	for _, a := range r.Assignments {
		if a.Refused != "" {
			n++
		}
	}
	return n
}

// ServiceKey is the key of a service in assignments: "<namespace>/<name>".
func ServiceKey(s objects.Service) string {
	ns := s.Metadata.Namespace
	if ns == "" {
		ns = objects.DefaultNamespace
	}
	return ns + "/" + s.Metadata.Name
}

type pool struct {
	name   string
	spec   objects.LoadBalancerIPPool
	ranges []objects.AddrRange // sorted by first address
	// next is, per range, the lowest address that may still be free in
	// this run: allocations only take addresses, so it only moves up.
	next []netip.Addr
}

func (p *pool) covers(a netip.Addr) bool {
	return slices.ContainsFunc(p.ranges, func(r objects.AddrRange) bool { return r.Contains(a) })
}

func (p *pool) has(family int) bool {
	return slices.ContainsFunc(p.ranges, func(r objects.AddrRange) bool { return r.From.BitLen() == family })
}

func (p *pool) selects(s objects.Service) bool {
	return p.spec.Spec.ServiceSelector.Matches(s.Metadata.Labels)
}

type svc struct {
	key      string
	s        objects.Service
	families []int              // bit lengths of its VIPs: 32 and/or 128, IPv4 first
	request  map[int]netip.Addr // requested address per family
	have     map[int]Addr       // held address per family
	reasons  map[int]string     // refusal per family
}

// Allocate returns the assignments of the LoadBalancer services among
// svcs, starting from prev (by ServiceKey; assignments of services that
// are gone are dropped). Pools and services need not be sorted; invalid
// blocks and addresses are skipped (Validate refuses them at apply).
func Allocate(pools []objects.LoadBalancerIPPool, svcs []objects.Service, prev map[string]Assignment) Result {
	a := newAllocator(pools, svcs)
	a.keep(prev)
	a.honourRequests()
	a.allocateRest()
	return a.result()
}

type allocator struct {
	pools []*pool
	svcs  []*svc
	// used maps an assigned address to its service.
	used map[netip.Addr]*svc
	// reserved maps the VIPs and external IPs of every service to a
	// description of their owner: never handed out.
	reserved map[netip.Addr]string
	// taken, when set (Extend), tells of more addresses that are not
	// free: held by services the allocator does not know, or reserved.
	taken func(netip.Addr) bool
}

func newAllocator(pools []objects.LoadBalancerIPPool, svcs []objects.Service) *allocator {
	a := &allocator{used: map[netip.Addr]*svc{}, reserved: map[netip.Addr]string{}}
	for _, p := range pools {
		rs := p.Ranges()
		slices.SortFunc(rs, func(x, y objects.AddrRange) int { return x.From.Compare(y.From) })
		pl := &pool{name: objects.PoolName(p), spec: p, ranges: rs, next: make([]netip.Addr, len(rs))}
		for i, r := range rs {
			pl.next[i] = r.From
		}
		a.pools = append(a.pools, pl)
	}
	slices.SortFunc(a.pools, func(x, y *pool) int { return cmp.Compare(x.name, y.name) })
	for _, s := range svcs {
		key := ServiceKey(s)
		for _, v := range s.Spec.VIPs {
			if ip, err := netip.ParseAddr(v); err == nil {
				a.reserved[ip] = "a VIP of service " + key
			}
		}
		for _, v := range s.Spec.ExternalIPs {
			if ip, err := netip.ParseAddr(v); err == nil {
				a.reserved[ip] = "an external IP of service " + key
			}
		}
		if !s.Spec.IsLoadBalancer() {
			continue
		}
		sv := &svc{key: key, s: s, request: map[int]netip.Addr{}, have: map[int]Addr{}, reasons: map[int]string{}}
		for _, v := range s.Spec.VIPs {
			if ip, err := netip.ParseAddr(v); err == nil && !slices.Contains(sv.families, ip.BitLen()) {
				sv.families = append(sv.families, ip.BitLen())
			}
		}
		slices.Sort(sv.families)
		for _, v := range s.Spec.LoadBalancerIPs {
			if ip, err := netip.ParseAddr(v); err == nil {
				sv.request[ip.BitLen()] = ip
			}
		}
		a.svcs = append(a.svcs, sv)
	}
	slices.SortFunc(a.svcs, func(x, y *svc) int { return cmp.Compare(x.key, y.key) })
	return a
}

// keep gives every service back the addresses it held, for the families
// it still has. Two services claiming one address (only a corrupt or hand-
// written store does that) leave it to the first in key order.
func (a *allocator) keep(prev map[string]Assignment) {
	for _, s := range a.svcs {
		for _, ad := range prev[s.key].Addrs {
			f := ad.IP.BitLen()
			if !ad.IP.IsValid() || !slices.Contains(s.families, f) {
				continue // the service no longer has a VIP of that family
			}
			if _, dup := s.have[f]; dup {
				continue
			}
			if _, taken := a.used[ad.IP]; taken {
				continue
			}
			s.have[f] = ad
			a.used[ad.IP] = s
		}
	}
}

// honourRequests moves requested addresses to their services where they
// can be honoured. It runs until nothing changes, so an address a service
// releases (its own request changed) serves another request of the same
// run, whatever the order.
func (a *allocator) honourRequests() {
	for progress := true; progress; {
		progress = false
		for _, s := range a.svcs {
			for _, f := range s.families {
				req, ok := s.request[f]
				if !ok || s.have[f].IP == req {
					continue
				}
				if a.requestProblem(s, req) != "" {
					continue
				}
				if old, had := s.have[f]; had {
					delete(a.used, old.IP)
				}
				s.have[f] = Addr{IP: req, Pool: a.poolFor(s, req).name}
				a.used[req] = s
				progress = true
			}
		}
	}
	for _, s := range a.svcs {
		for _, f := range s.families {
			if req, ok := s.request[f]; ok && s.have[f].IP != req {
				s.reasons[f] = fmt.Sprintf("loadBalancerIP %s %s", req, a.requestProblem(s, req))
			}
		}
		for f, req := range s.request {
			if !slices.Contains(s.families, f) {
				// Validate refuses this at apply; a store may still hold it.
				s.reasons[f] = fmt.Sprintf("loadBalancerIP %s is %s but the service has no VIP of that family", req, familyName(f))
			}
		}
	}
}

// requestProblem says why req cannot go to s ("" when it can).
func (a *allocator) requestProblem(s *svc, req netip.Addr) string {
	if owner, taken := a.used[req]; taken && owner != s {
		return "is in use by service " + owner.key
	}
	if what, ok := a.reserved[req]; ok {
		return "is " + what
	}
	if a.poolFor(s, req) == nil {
		return "is not in any enabled LoadBalancerIPPool that selects the service"
	}
	return ""
}

// poolFor returns the first enabled pool that covers ip and selects s.
func (a *allocator) poolFor(s *svc, ip netip.Addr) *pool {
	for _, p := range a.pools {
		if !p.spec.Spec.Disabled && p.selects(s.s) && p.covers(ip) {
			return p
		}
	}
	return nil
}

// allocateRest gives every family still without an address (and without
// a request) the lowest free address of the first pool that can.
func (a *allocator) allocateRest() {
	for _, s := range a.svcs {
		for _, f := range s.families {
			if _, ok := s.have[f]; ok {
				continue
			}
			if _, ok := s.request[f]; ok {
				continue // refused above
			}
			var candidates []string
			for _, p := range a.pools {
				if p.spec.Spec.Disabled || !p.selects(s.s) || !p.has(f) {
					continue
				}
				candidates = append(candidates, p.name)
				if ip, ok := a.lowestFree(p, f); ok {
					s.have[f] = Addr{IP: ip, Pool: p.name}
					a.used[ip] = s
					break
				}
			}
			switch {
			case s.have[f].IP.IsValid():
			case len(candidates) == 0:
				s.reasons[f] = fmt.Sprintf("no enabled LoadBalancerIPPool with %s addresses selects the service", familyName(f))
			default:
				s.reasons[f] = fmt.Sprintf("no free %s address in the LoadBalancerIPPools that select the service (%s)", familyName(f), strings.Join(candidates, ", "))
			}
		}
	}
}

// lowestFree takes the pool's lowest free address of family f.
func (a *allocator) lowestFree(p *pool, f int) (netip.Addr, bool) {
	for i, r := range p.ranges {
		if r.From.BitLen() != f {
			continue
		}
		for ip := p.next[i]; ip.IsValid() && r.Contains(ip); ip = ip.Next() {
			_, taken := a.used[ip]
			_, reserved := a.reserved[ip]
			if !taken && !reserved && (a.taken == nil || !a.taken(ip)) {
				p.next[i] = ip.Next()
				return ip, true
			}
		}
		p.next[i] = netip.Addr{} // exhausted
	}
	return netip.Addr{}, false
}

// result settles each address's pool and note and counts the pools.
func (a *allocator) result() Result {
	res := Result{Assignments: map[string]Assignment{}, Pools: map[string]PoolUsage{}}
	byName := map[string]*pool{}
	for _, p := range a.pools {
		byName[p.name] = p
		res.Pools[p.name] = PoolUsage{Total: p.spec.TotalAddresses()}
	}
	for _, s := range a.svcs {
		var asg Assignment
		for _, f := range s.families {
			ad, ok := s.have[f]
			if !ok {
				continue
			}
			ad.Pool, ad.Kept = a.settle(s, ad, byName)
			asg.Addrs = append(asg.Addrs, ad)
			if u, ok := res.Pools[ad.Pool]; ok {
				u.Used++
				if !byName[ad.Pool].covers(ad.IP) {
					u.Kept = append(u.Kept, ad.IP)
				}
				res.Pools[ad.Pool] = u
			}
		}
		var reasons []string
		for _, f := range slices.Sorted(maps.Keys(s.reasons)) {
			reasons = append(reasons, s.reasons[f])
		}
		asg.Refused = strings.Join(reasons, "; ")
		res.Assignments[s.key] = asg
	}
	for name, u := range res.Pools {
		slices.SortFunc(u.Kept, netip.Addr.Compare)
		res.Pools[name] = u
	}
	return res
}

// settle returns the pool an address belongs to and, if that pool no
// longer offers it to the service, why it is kept anyway.
func (a *allocator) settle(s *svc, ad Addr, byName map[string]*pool) (string, string) {
	p := byName[ad.Pool]
	if p == nil || !p.covers(ad.IP) {
		// Edited or deleted: another pool that covers it now owns it.
		p = nil
		for _, q := range a.pools {
			if q.covers(ad.IP) {
				p = q
				break
			}
		}
	}
	switch {
	case p == nil && byName[ad.Pool] == nil:
		return ad.Pool, fmt.Sprintf("pool %s was deleted; an address in use never moves", ad.Pool)
	case p == nil:
		return ad.Pool, fmt.Sprintf("pool %s no longer covers it; an address in use never moves", ad.Pool)
	case !p.selects(s.s):
		return p.name, fmt.Sprintf("pool %s no longer selects the service; an address in use never moves", p.name)
	}
	return p.name, ""
}

func familyName(bits int) string {
	if bits == 32 {
		return "IPv4"
	}
	return "IPv6"
}
