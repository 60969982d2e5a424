package lbipam

import (
	"fmt"
	"maps"
	"net/netip"
	"reflect"
	"slices"

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
// services, copying each one every time dominated a bulk apply. The
// zero value is ready; it is not safe for concurrent use.
type StatusCache struct {
	last map[string]statusMemo // by ServiceKey
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
	return applyStatus(objs, asg, c)
}

func applyStatus(objs map[string]objects.Object, asg map[string]Assignment, cache *StatusCache) (out map[string]objects.Object, problems []string) {
	var next map[string]statusMemo
	if cache != nil {
		next = make(map[string]statusMemo, len(asg))
		defer func() { cache.last = next }()
	}
	out = maps.Clone(objs)
	if out == nil {
		out = map[string]objects.Object{}
	}
	// Start from no status: what objs carried may be stale.
	for k, o := range objs {
		if s, ok := o.(*objects.Service); ok && !reflect.ValueOf(s.Status).IsZero() {
			c := *s
			c.Status = objects.ServiceStatus{}
			out[k] = &c
		}
	}
	byPool := map[string][]netip.Addr{}
	for _, key := range slices.Sorted(maps.Keys(asg)) {
		a := asg[key]
		o, ok := objs[objects.KindService+"/"+key]
		s, isSvc := o.(*objects.Service)
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("assignment for service %s, which does not exist", key))
			continue
		case !isSvc || !s.Spec.IsLoadBalancer():
			problems = append(problems, fmt.Sprintf("assignment for service %s, which is not of type LoadBalancer", key))
			continue
		}
		if m, ok := cache.lookup(key); ok && m.in == s && m.a.Equal(a) {
			// Only copies without problems are remembered.
			next[key] = m
			out[objects.Key(m.out)] = m.out
			for _, ad := range a.Addrs { // all went into the status
				byPool[ad.Pool] = append(byPool[ad.Pool], ad.IP)
			}
			continue
		}
		nProblems := len(problems)
		families := map[int]bool{}
		for _, v := range s.Spec.VIPs {
			if ip, err := netip.ParseAddr(v); err == nil {
				families[ip.BitLen()] = true
			}
		}
		c := *s
		c.Status = objects.ServiceStatus{}
		c.Status.LoadBalancer.Refused = a.Refused
		seen := map[int]bool{}
		for _, ad := range a.Addrs {
			f := ad.IP.BitLen()
			if !ad.IP.IsValid() || !families[f] || seen[f] {
				problems = append(problems, fmt.Sprintf("assignment for service %s: address %s is of a family the service has no VIP of (or a second one of it)", key, ad.IP))
				continue
			}
			seen[f] = true
			c.Status.LoadBalancer.Ingress = append(c.Status.LoadBalancer.Ingress, objects.LoadBalancerIngress{IP: ad.IP.String(), Pool: ad.Pool, Kept: ad.Kept})
			byPool[ad.Pool] = append(byPool[ad.Pool], ad.IP)
		}
		out[objects.Key(&c)] = &c
		if next != nil && len(problems) == nProblems {
			next[key] = statusMemo{in: s, a: a, out: &c}
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
