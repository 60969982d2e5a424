package service

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// Endpoint is a workload that can back services.
type Endpoint struct {
	// Key tells endpoints apart for Resolver (unique among them).
	Key       string
	Namespace string
	Labels    identity.Labels
	IPs       []netip.Addr
}

// Resolve returns the backends of every frontend of svcs; see the package
// documentation.
func Resolve(svcs []objects.Service, eps []Endpoint) map[bpf.Frontend][]bpf.Backend {
	// Sort by namespace/name so that a conflicting frontend always goes to
	// the same service, whatever the input order.
	sorted := slices.Clone(svcs)
	slices.SortStableFunc(sorted, func(a, b objects.Service) int {
		return cmp.Compare(objects.Key(a), objects.Key(b))
	})

	idx := indexEndpoints(eps)
	out := map[bpf.Frontend][]bpf.Backend{}
	for _, svc := range sorted {
		svc.Metadata.Namespace = namespaceOrDefault(svc.Metadata.Namespace)
		if svc.Validate() != nil {
			continue
		}
		frontends, err := allFrontends(svc)
		if err != nil {
			continue
		}
		addrs := serviceAddrs(svc, eps, idx)
		for _, f := range frontends {
			if _, taken := out[f]; taken {
				continue
			}
			out[f] = backendsFor(f, svc, addrs)
		}
	}
	return out
}

// labelIndex finds the endpoints a selector selects without a scan of
// them all: by namespace, then by label (key and value), the positions of
// the endpoints that carry it. A selector's candidates are the shortest
// list among its labels', so resolving a service costs about what it
// selects, not the number of endpoints.
type labelIndex map[string]map[[2]string][]int

func indexEndpoints(eps []Endpoint) labelIndex {
	idx := labelIndex{}
	for i, ep := range eps {
		ns := namespaceOrDefault(ep.Namespace)
		byLabel := idx[ns]
		if byLabel == nil {
			byLabel = map[[2]string][]int{}
			idx[ns] = byLabel
		}
		for k, v := range ep.Labels {
			byLabel[[2]string{k, v}] = append(byLabel[[2]string{k, v}], i)
		}
	}
	return idx
}

// candidates returns the positions of the endpoints of ns that may match
// selector (non-empty): those carrying its rarest label.
func (idx labelIndex) candidates(ns string, selector map[string]string) []int {
	var best []int
	first := true
	for k, v := range selector {
		l := idx[ns][[2]string{k, v}]
		if first || len(l) < len(best) {
			best, first = l, false
		}
		if len(best) == 0 {
			return nil
		}
	}
	return best
}

// serviceAddrs returns every candidate address of svc, of both families.
func serviceAddrs(svc objects.Service, eps []Endpoint, idx labelIndex) []netip.Addr {
	var addrs []netip.Addr
	if len(svc.Spec.Selector) > 0 {
		for _, i := range idx.candidates(svc.Metadata.Namespace, svc.Spec.Selector) {
			if ep := eps[i]; ep.Labels.Has(svc.Spec.Selector) {
				addrs = append(addrs, ep.IPs...)
			}
		}
	}
	for _, b := range svc.Spec.Backends {
		if ip, err := netip.ParseAddr(b.IP); err == nil {
			addrs = append(addrs, ip)
		}
	}
	return addrs
}

// backendsFor picks the addresses of f's family, with the target port of
// f's service port.
func backendsFor(f bpf.Frontend, svc objects.Service, addrs []netip.Addr) []bpf.Backend {
	port := targetPort(svc, f)
	backends := []bpf.Backend{}
	for _, a := range addrs {
		a = a.Unmap() // an IPv4-mapped IPv6 address is an IPv4 backend
		if !a.IsValid() || a.Is4() != f.VIP.Is4() {
			continue
		}
		backends = append(backends, bpf.Backend{Addr: a.WithZone(""), Port: port})
	}
	slices.SortFunc(backends, func(a, b bpf.Backend) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.ClusterID, b.ClusterID))
	})
	return slices.Compact(backends)
}

// targetPort finds the service port behind f.
func targetPort(svc objects.Service, f bpf.Frontend) uint16 {
	if p, ok := svc.PortFor(f); ok {
		return p.Target()
	}
	return f.Port
}

// allFrontends returns the service's frontends at its VIPs and then at its
// load-balancer and external addresses (objects.Service.ExternalFrontends),
// and its node ports (objects.Service.NodePortFrontends): inside the mesh,
// pods reach a service at any of them alike.
func allFrontends(svc objects.Service) ([]bpf.Frontend, error) {
	fs, err := svc.Frontends()
	if err != nil {
		return nil, err
	}
	fs = append(fs, svc.ExternalFrontends()...)
	return append(fs, svc.NodePortFrontends()...), nil
}

func namespaceOrDefault(ns string) string {
	if ns == "" {
		return objects.DefaultNamespace
	}
	return ns
}
