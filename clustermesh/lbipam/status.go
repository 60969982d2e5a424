package lbipam

import (
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// ApplyStatus returns objs (by objects.Key) with LB-IPAM's status filled
// in: each LoadBalancer service's addresses and refusal from asg (by
// ServiceKey), each pool's usage. objs is not modified; objects that
// change are copies. An assignment for a service that does not exist or
// is not of type LoadBalancer, and an address of a family the service
// has no VIP of, are left out and described in problems (the store may
// lag behind the objects, or hold a record written by hand).
func ApplyStatus(objs map[string]objects.Object, asg map[string]Assignment) (out map[string]objects.Object, problems []string) {
	return applyStatus(objs, asg, nil)
}

// StatusCache makes repeated ApplyStatus calls cheap when little changes:
// a service whose object (the same pointer) and assignment are those of
// the last call gets the same copy as then, without building it again.
// An agent rebuilds its objects with status on every change of the
// applied objects or of LB-IPAM's records; with 10,000 LoadBalancer
// services, copying each one every time dominated a bulk apply. Patch
// goes further: told what changed, it costs that rather than every
// object. The zero value is ready; it is not safe for concurrent use.
type StatusCache struct {
	last map[string]statusMemo // by ServiceKey

	// Patch's state, valid while patchable: the last result, and per
	// service (by ServiceKey) the addresses that went into its status
	// and its problems; the addresses of every status by pool (counted:
	// a corrupt store may give one to two services); the pools' keys.
	patchable bool
	out       map[string]objects.Object
	contrib   map[string][]Addr
	problems  map[string][]string
	byPool    map[string]map[netip.Addr]int
	poolKeys  map[string]bool
	// A pool's status is kept up to date per address, so that a Patch
	// costs what changed, not every address of the pools: per pool
	// name, its ranges (those of the pool object, nil when there is
	// none), how many addresses it has in statuses, and those of them
	// outside its ranges (counted like byPool).
	poolRanges map[string][]objects.AddrRange
	poolUsed   map[string]int
	poolKept   map[string]map[netip.Addr]int
}

type statusMemo struct {
	in  *objects.Service
	a   Assignment
	out *objects.Service
}

// ApplyStatus is ApplyStatus reusing the copies of the last call where
// nothing changed. The caller must not modify the objects it passes or
// gets back (they are shared with later calls).
func (c *StatusCache) ApplyStatus(objs map[string]objects.Object, asg map[string]Assignment) (out map[string]objects.Object, problems []string) {
	c.patchable = false
	return applyStatus(objs, asg, c)
}

// Patch is ApplyStatus for a caller that knows what changed since its
// last call of Patch: the keys (objects.Key) of the objects added,
// changed or removed, and the keys (ServiceKey) of the assignments
// added, changed or removed. It gives what ApplyStatus gives, at the cost
// of what changed, one copy of the result map and a pass over the
// pools' addresses, instead of every object. The first call (or the
// first after ApplyStatus) builds everything. The result must not be
// modified.
func (c *StatusCache) Patch(objs map[string]objects.Object, asg map[string]Assignment, objKeys, asgKeys []string) (out map[string]objects.Object, problems []string) {
	if !c.patchable {
		out, problems = applyStatus(objs, asg, c)
		c.rebuildIndex(objs, asg)
		return out, problems
	}
	if len(objKeys) == 0 && len(asgKeys) == 0 {
		return c.out, c.allProblems()
	}
	out = maps.Clone(c.out)
	var changedPools []string
	svcKeys := map[string]bool{}
	for _, k := range asgKeys {
		svcKeys[k] = true
	}
	for _, k := range objKeys {
		if rest, ok := strings.CutPrefix(k, objects.KindService+"/"); ok {
			svcKeys[rest] = true
			continue
		}
		delete(out, k)
		if _, isPool := objs[k].(*objects.LoadBalancerIPPool); isPool || c.poolKeys[k] {
			changedPools = append(changedPools, k)
		}
		delete(c.poolKeys, k)
		switch o := objs[k].(type) {
		case nil:
		case *objects.LoadBalancerIPPool:
			c.poolKeys[k] = true // its status is set below
		default:
			out[k] = o
		}
	}
	for key := range svcKeys {
		for _, ad := range c.contrib[key] {
			c.countAddr(ad, -1)
		}
		delete(c.contrib, key)
		delete(c.problems, key)
		delete(out, objects.KindService+"/"+key)
		if o, ok := objs[objects.KindService+"/"+key]; ok {
			out[objects.KindService+"/"+key] = withoutStatus(o)
		}
		a, ok := asg[key]
		if !ok {
			delete(c.last, key)
			continue
		}
		s, addrs, probs := c.serviceStatus(key, objs, a)
		if s != nil {
			out[objects.KindService+"/"+key] = s
		}
		c.noteService(key, addrs, probs)
	}
	for _, k := range changedPools {
		c.setPoolRanges(k, objs)
	}
	for k := range c.poolKeys {
		out[k] = c.poolStatus(objs[k].(*objects.LoadBalancerIPPool))
	}
	c.out = out
	return out, c.allProblems()
}

// setPoolRanges takes the ranges of the pool with objects.Key key from
// objs (none when it is not there) and sorts its addresses into those
// inside and outside them again.
func (c *StatusCache) setPoolRanges(key string, objs map[string]objects.Object) {
	name := key[strings.LastIndexByte(key, '/')+1:] // pools have no namespace
	delete(c.poolRanges, name)
	if p, ok := objs[key].(*objects.LoadBalancerIPPool); ok {
		c.poolRanges[name] = p.Ranges()
	}
	delete(c.poolKept, name)
	for ip, n := range c.byPool[name] {
		if !c.inRanges(name, ip) {
			if c.poolKept[name] == nil {
				c.poolKept[name] = map[netip.Addr]int{}
			}
			c.poolKept[name][ip] = n
		}
	}
}

// inRanges reports whether ip is in the ranges of pool name.
func (c *StatusCache) inRanges(name string, ip netip.Addr) bool {
	return slices.ContainsFunc(c.poolRanges[name], func(r objects.AddrRange) bool { return r.Contains(ip) })
}

// countAddr adds d (1 or -1) to the count of address ad in its pool.
func (c *StatusCache) countAddr(ad Addr, d int) {
	add := func(m map[string]map[netip.Addr]int) {
		if m[ad.Pool] == nil {
			m[ad.Pool] = map[netip.Addr]int{}
		}
		if n := m[ad.Pool][ad.IP] + d; n > 0 {
			m[ad.Pool][ad.IP] = n
		} else {
			delete(m[ad.Pool], ad.IP)
		}
	}
	add(c.byPool)
	c.poolUsed[ad.Pool] += d
	if !c.inRanges(ad.Pool, ad.IP) {
		add(c.poolKept)
	}
}

// PoolKeys are the keys (objects.Key) of the pools Patch knows of: each
// Patch gives every pool a new status.
func (c *StatusCache) PoolKeys() []string { return slices.Collect(maps.Keys(c.poolKeys)) }

// noteService records what one service's status holds: its addresses
// (counted per pool) and its problems.
func (c *StatusCache) noteService(key string, addrs []Addr, probs []string) {
	c.contrib[key] = addrs
	if len(probs) > 0 {
		c.problems[key] = probs
	}
	for _, ad := range addrs {
		c.countAddr(ad, 1)
	}
}

// rebuildIndex sets Patch's state from a whole ApplyStatus.
func (c *StatusCache) rebuildIndex(objs map[string]objects.Object, asg map[string]Assignment) {
	c.contrib, c.problems = map[string][]Addr{}, map[string][]string{}
	c.byPool, c.poolKeys = map[string]map[netip.Addr]int{}, map[string]bool{}
	c.poolRanges, c.poolUsed, c.poolKept = map[string][]objects.AddrRange{}, map[string]int{}, map[string]map[netip.Addr]int{}
	for _, o := range objs {
		if p, ok := o.(*objects.LoadBalancerIPPool); ok {
			c.poolRanges[p.Metadata.Name] = p.Ranges()
		}
	}
	for key, a := range asg {
		// The status is in c.last's copies already; this recomputes
		// only what went into it (addresses, problems).
		_, addrs, probs := c.serviceStatus(key, objs, a)
		c.noteService(key, addrs, probs)
	}
	for k, o := range objs {
		if _, ok := o.(*objects.LoadBalancerIPPool); ok {
			c.poolKeys[k] = true
		}
	}
	c.patchable = true
}

// allProblems are the problems of every assignment, in key order.
func (c *StatusCache) allProblems() []string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(c.problems)) {
		out = append(out, c.problems[k]...)
	}
	return out
}

// serviceStatus is the status of the service with ServiceKey key for
// its assignment a: the copy with status (nil when the service does not
// take one), the addresses that went into it, and the problems.
func (c *StatusCache) serviceStatus(key string, objs map[string]objects.Object, a Assignment) (*objects.Service, []Addr, []string) {
	o, ok := objs[objects.KindService+"/"+key]
	s, isSvc := o.(*objects.Service)
	switch {
	case !ok:
		return nil, nil, []string{fmt.Sprintf("assignment for service %s, which does not exist", key)}
	case !isSvc || !s.Spec.IsLoadBalancer():
		return nil, nil, []string{fmt.Sprintf("assignment for service %s, which is not of type LoadBalancer", key)}
	}
	if m, ok := c.lookup(key); ok && m.in == s && m.a.Equal(a) {
		return m.out, a.Addrs, nil // only copies without problems are remembered
	}
	var problems []string
	families := map[int]bool{}
	for _, v := range s.Spec.VIPs {
		if ip, err := netip.ParseAddr(v); err == nil {
			families[ip.BitLen()] = true
		}
	}
	cp := *s
	cp.Status = objects.ServiceStatus{}
	cp.Status.LoadBalancer.Refused = a.Refused
	seen := map[int]bool{}
	var addrs []Addr
	for _, ad := range a.Addrs {
		f := ad.IP.BitLen()
		if !ad.IP.IsValid() || !families[f] || seen[f] {
			problems = append(problems, fmt.Sprintf("assignment for service %s: address %s is of a family the service has no VIP of (or a second one of it)", key, ad.IP))
			continue
		}
		seen[f] = true
		cp.Status.LoadBalancer.Ingress = append(cp.Status.LoadBalancer.Ingress, objects.LoadBalancerIngress{IP: ad.IP.String(), Pool: ad.Pool, Kept: ad.Kept})
		addrs = append(addrs, ad)
	}
	if c != nil {
		if c.last == nil {
			c.last = map[string]statusMemo{}
		}
		if len(problems) == 0 {
			c.last[key] = statusMemo{in: s, a: a, out: &cp}
		} else {
			delete(c.last, key)
		}
	}
	return &cp, addrs, problems
}

// poolStatus is p with its status from the counts of its addresses.
func (c *StatusCache) poolStatus(p *objects.LoadBalancerIPPool) *objects.LoadBalancerIPPool {
	cp := *p
	var kept []netip.Addr
	for ip, k := range c.poolKept[p.Metadata.Name] {
		for range k {
			kept = append(kept, ip)
		}
	}
	cp.Status = objects.LoadBalancerIPPoolStatus{Total: p.TotalAddresses().String(), Used: c.poolUsed[p.Metadata.Name]}
	slices.SortFunc(kept, netip.Addr.Compare)
	for _, ip := range kept {
		cp.Status.Kept = append(cp.Status.Kept, ip.String())
	}
	return &cp
}

// withoutStatus is o, or a copy of a service without the status it
// carried (what objs carried may be stale).
func withoutStatus(o objects.Object) objects.Object {
	if s, ok := o.(*objects.Service); ok && !reflect.ValueOf(s.Status).IsZero() {
		c := *s
		c.Status = objects.ServiceStatus{}
		return &c
	}
	return o
}

func applyStatus(objs map[string]objects.Object, asg map[string]Assignment, cache *StatusCache) (out map[string]objects.Object, problems []string) {
	var next map[string]statusMemo
	if cache != nil {
		next = make(map[string]statusMemo, len(asg))
		defer func() { cache.last = next; cache.out = out }()
	}
	out = maps.Clone(objs)
	if out == nil {
		out = map[string]objects.Object{}
	}
	// Start from no status: what objs carried may be stale.
	for k, o := range objs {
		out[k] = withoutStatus(o)
	}
	byPool := map[string][]netip.Addr{}
	for _, key := range slices.Sorted(maps.Keys(asg)) {
		s, addrs, probs := cache.serviceStatus(key, objs, asg[key])
		problems = append(problems, probs...)
		if s == nil {
			continue
		}
		out[objects.KindService+"/"+key] = s
		for _, ad := range addrs {
			byPool[ad.Pool] = append(byPool[ad.Pool], ad.IP)
		}
		if next != nil && len(probs) == 0 {
			next[key] = cache.last[key]
		}
	}
	for k, o := range objs {
		p, ok := o.(*objects.LoadBalancerIPPool)
		if !ok {
			continue
		}
		c := *p
		c.Status = objects.LoadBalancerIPPoolStatus{Total: p.TotalAddresses().String(), Used: len(byPool[p.Metadata.Name])}
		rs := p.Ranges()
		ips := slices.SortedFunc(slices.Values(byPool[p.Metadata.Name]), netip.Addr.Compare)
		for _, ip := range ips {
			if !slices.ContainsFunc(rs, func(r objects.AddrRange) bool { return r.Contains(ip) }) {
				c.Status.Kept = append(c.Status.Kept, ip.String())
			}
		}
		out[k] = &c
	}
	return out, problems
}

func (c *StatusCache) lookup(key string) (statusMemo, bool) {
	if c == nil {
		return statusMemo{}, false
	}
	m, ok := c.last[key]
	return m, ok
}
