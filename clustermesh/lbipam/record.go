package lbipam

import (
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
