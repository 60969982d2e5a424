package servicesync

import (
	"cmp"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"strings"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Annotations of a Service that make it global (ARCHITECTURE.md).
const (
	AnnotationGlobal   = "isthmus.io/global"
	AnnotationShared   = "isthmus.io/shared"
	AnnotationAffinity = "isthmus.io/affinity"
)

// Label keys of identities (identity.LabelCluster, identity.LabelNamespace).
const (
	labelCluster   = "isthmus.io/cluster"
	labelNamespace = "isthmus.io/namespace"
)

// Global is what a Service's annotations say about the mesh.
type Global struct {
	Global   bool
	Shared   bool
	Affinity records.Affinity
}

// GlobalOf reads the global-service annotations: "true"/"false" (any
// case, surrounding blanks ignored) and local|remote|none. shared defaults
// to true for a global service; shared and affinity on a service that is
// not global are an error, so a typo in the global annotation is noticed.
// The agent reads the same annotations with the same rules.
func GlobalOf(svc objects.Service) (Global, error) {
	a := svc.Metadata.Annotations
	var g Global
	var err error
	if g.Global, err = boolAnnotation(a, AnnotationGlobal, false); err != nil {
		return Global{}, err
	}
	if g.Shared, err = boolAnnotation(a, AnnotationShared, g.Global); err != nil {
		return Global{}, err
	}
	if v, ok := a[AnnotationAffinity]; ok {
		switch aff := records.Affinity(strings.ToLower(strings.TrimSpace(v))); aff {
		case records.AffinityLocal, records.AffinityRemote, records.AffinityNone:
			g.Affinity = aff
		default:
			return Global{}, fmt.Errorf("metadata.annotations[%q]: want %s, %s or %s, got %q",
				AnnotationAffinity, records.AffinityLocal, records.AffinityRemote, records.AffinityNone, v)
		}
	}
	if !g.Global {
		for _, k := range []string{AnnotationShared, AnnotationAffinity} {
			if _, ok := a[k]; ok {
				return Global{}, fmt.Errorf("metadata.annotations[%q]: applies to global services only (set %s: \"true\")", k, AnnotationGlobal)
			}
		}
	}
	return g, nil
}

func boolAnnotation(a map[string]string, key string, def bool) (bool, error) {
	v, ok := a[key]
	if !ok {
		return def, nil
	}
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("metadata.annotations[%q]: want \"true\" or \"false\", got %q", key, v)
}

// Endpoint is a workload of the cluster as the ipcache and the identities
// describe it.
type Endpoint struct {
	IP        netip.Addr
	Namespace string
	Labels    map[string]string
}

// Endpoints joins ipcache entries with the labels of their identities:
// single addresses of cluster whose identity is known, belongs to cluster
// and names a namespace. Others (CIDRs, reserved or unknown identities)
// back no service.
func Endpoints(cluster string, ips iter.Seq[records.IPCacheEntry], labels map[uint32]map[string]string) []Endpoint {
	var out []Endpoint
	for e := range ips {
		if e.Cluster != cluster || !e.Prefix.IsSingleIP() {
			continue
		}
		l, ok := labels[e.Identity]
		if !ok || l[labelCluster] != cluster || l[labelNamespace] == "" {
			continue
		}
		out = append(out, Endpoint{IP: e.Prefix.Addr(), Namespace: l[labelNamespace], Labels: l})
	}
	return out
}

// Build returns the service record of svc in cluster (ID clusterID), with
// the endpoints of eps it selects. A service whose global annotations do
// not parse is published as not global, and the error is returned with
// the record (rec is valid whenever err is nil or annErr is set).
func Build(cluster string, clusterID uint32, svc objects.Service, eps []Endpoint) (rec records.ServiceRecord, annErr, err error) {
	ns := svc.Metadata.Namespace
	if ns == "" {
		ns = objects.DefaultNamespace
	}
	svc.Metadata.Namespace = ns
	if err := svc.Validate(); err != nil {
		return records.ServiceRecord{}, nil, err
	}
	g, annErr := GlobalOf(svc)
	if annErr != nil {
		g = Global{}
	}
	rec = records.ServiceRecord{
		Version: records.CurrentVersion, Name: svc.Metadata.Name, Namespace: ns,
		Cluster: cluster, ClusterID: clusterID,
		Global: g.Global, Shared: g.Shared, Affinity: g.Affinity,
	}
	families := map[bool]bool{} // Is4 -> has a VIP
	for _, v := range svc.Spec.VIPs {
		vip, err := netip.ParseAddr(v)
		if err != nil {
			return records.ServiceRecord{}, annErr, fmt.Errorf("service %s/%s: vip %q: %w", ns, svc.Metadata.Name, v, err)
		}
		vip = vip.Unmap()
		families[vip.Is4()] = true
		for _, p := range svc.Spec.Ports {
			rec.Frontends = append(rec.Frontends, records.Frontend{IP: vip, Port: p.Port, Protocol: protocol(p), PortName: p.Name})
		}
	}

	// Candidate addresses: selected endpoints, then explicit backends.
	var addrs []netip.Addr
	if len(svc.Spec.Selector) > 0 {
		for _, ep := range eps {
			if ep.Namespace == ns && hasLabels(ep.Labels, svc.Spec.Selector) {
				addrs = append(addrs, ep.IP)
			}
		}
	}
	for _, b := range svc.Spec.Backends {
		if a, err := netip.ParseAddr(b.IP); err == nil {
			addrs = append(addrs, a)
		}
	}
	seen := map[records.Backend]bool{}
	for _, a := range addrs {
		a = a.Unmap().WithZone("")
		if !families[a.Is4()] {
			continue // no VIP of that family could reach it
		}
		for _, p := range svc.Spec.Ports {
			b := records.Backend{IP: a, Port: p.Target(), Protocol: protocol(p), PortName: p.Name, Cluster: cluster}
			if !seen[b] {
				seen[b] = true
				rec.Backends = append(rec.Backends, b)
			}
		}
	}
	slices.SortFunc(rec.Backends, func(x, y records.Backend) int {
		return cmp.Or(x.IP.Compare(y.IP), cmp.Compare(x.Port, y.Port),
			cmp.Compare(x.Protocol, y.Protocol), cmp.Compare(x.PortName, y.PortName))
	})
	if err := rec.Validate(); err != nil {
		return records.ServiceRecord{}, annErr, fmt.Errorf("service %s/%s: %w", ns, svc.Metadata.Name, err)
	}
	return rec, annErr, nil
}

func protocol(p objects.ServicePort) string {
	if strings.EqualFold(p.Protocol, objects.ProtocolUDP) {
		return records.ProtocolUDP
	}
	return records.ProtocolTCP
}

func hasLabels(l, sel map[string]string) bool {
	for k, v := range sel {
		if got, ok := l[k]; !ok || got != v {
			return false
		}
	}
	return true
}
