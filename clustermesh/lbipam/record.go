package lbipam

import (
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// FromRecord returns the assignment a stored record holds.
func FromRecord(r records.LBAssignment) Assignment {
	a := Assignment{Refused: r.Refused}
	for _, ad := range r.Addresses {
		a.Addrs = append(a.Addrs, Addr{IP: ad.IP, Pool: ad.Pool, Kept: ad.Kept})
	}
	return a
}

// Record returns the record of the assignment of the service with key
// (a ServiceKey).
func (a Assignment) Record(key string) records.LBAssignment {
	ns, name, _ := strings.Cut(key, "/")
	r := records.LBAssignment{Version: records.CurrentVersion, Namespace: ns, Name: name, Refused: a.Refused}
	for _, ad := range a.Addrs {
		r.Addresses = append(r.Addresses, records.LBAddress{IP: ad.IP, Pool: ad.Pool, Kept: ad.Kept})
	}
	return r
}

// Inputs returns the services and the pools among objs (applied objects
// by any key), the inputs of Allocate.
func Inputs(objs map[string]objects.Object) (svcs []objects.Service, pools []objects.LoadBalancerIPPool) {
	for _, o := range objs {
		switch v := o.(type) {
		case *objects.Service:
			svcs = append(svcs, *v)
		case *objects.LoadBalancerIPPool:
			pools = append(pools, *v)
		}
	}
	return svcs, pools
}

// FromRecords indexes stored records by ServiceKey.
func FromRecords(rs []records.LBAssignment) map[string]Assignment {
	out := make(map[string]Assignment, len(rs))
	for _, r := range rs {
		out[r.Namespace+"/"+r.Name] = FromRecord(r)
	}
	return out
}

// ToRecords returns the records of assignments, sorted by service.
func ToRecords(m map[string]Assignment) []records.LBAssignment {
	out := make([]records.LBAssignment, 0, len(m))
	for _, key := range slices.Sorted(maps.Keys(m)) {
		out = append(out, m[key].Record(key))
	}
	return out
}

// FromObjects returns the assignments the LoadBalancer services among objs
// carry in their status (as ApplyStatus put them there).
func FromObjects(objs map[string]objects.Object) map[string]Assignment {
	out := map[string]Assignment{}
	for _, o := range objs {
		s, ok := o.(*objects.Service)
		if !ok || !s.Spec.IsLoadBalancer() {
			continue
		}
		st := s.Status.LoadBalancer
		if len(st.Ingress) == 0 && st.Refused == "" {
			continue
		}
		a := Assignment{Refused: st.Refused}
		for _, in := range st.Ingress {
			if ip, err := netip.ParseAddr(in.IP); err == nil {
				a.Addrs = append(a.Addrs, Addr{IP: ip, Pool: in.Pool, Kept: in.Kept})
			}
		}
		out[ServiceKey(*s)] = a
	}
	return out
}

// Equal reports whether two sets of assignments are the same.
func Equal(a, b map[string]Assignment) bool {
	return maps.EqualFunc(a, b, Assignment.Equal)
}
