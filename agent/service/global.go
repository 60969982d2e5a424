package service

import (
	"cmp"
	"slices"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/servicesync"
)

// The global-service annotations are read exactly as the cluster's
// service syncer reads them when it publishes this cluster's backends: one
// implementation, in clustermesh/servicesync.
const (
	AnnotationGlobal   = servicesync.AnnotationGlobal
	AnnotationShared   = servicesync.AnnotationShared
	AnnotationAffinity = servicesync.AnnotationAffinity
)

// Global is what a Service's annotations say about the mesh.
type Global = servicesync.Global

// GlobalOf reads the global-service annotations of svc ("true"/"false",
// local|remote|none; shared defaults to true when global; shared or
// affinity without global is an error).
func GlobalOf(svc objects.Service) (Global, error) { return servicesync.GlobalOf(svc) }

// Merge adds the backends of remote clusters to the global services among
// svcs. local is what Resolve returned for svcs (this cluster's backends);
// remote holds other clusters' service records. The result is a new map;
// local is not modified.
//
// For each frontend of a global service, the candidates from other clusters
// are the backends of the records with the same namespace and name that are
// global and shared, with the frontend's protocol and port name (so a
// multi-port service needs port names, as in Kubernetes) and the VIP's
// address family. Each carries its cluster's ID. Affinity (annotation of the
// local service) then picks per frontend:
//
//	none (default)  local and remote backends
//	local           local backends; remote ones only while there is no local one
//	remote          remote backends; local ones only while there is no remote one
//
// A frontend that another service won in Resolve (a conflict) is left as
// Resolve made it. Services whose annotations do not parse are not global.
func Merge(local map[bpf.Frontend][]bpf.Backend, svcs []objects.Service, remote []records.ServiceRecord) map[bpf.Frontend][]bpf.Backend {
	out := make(map[bpf.Frontend][]bpf.Backend, len(local))
	for f, bs := range local {
		out[f] = bs
	}
	byName := map[string][]records.ServiceRecord{}
	for _, r := range remote {
		if r.Global && r.Shared {
			k := r.Namespace + "/" + r.Name
			byName[k] = append(byName[k], r)
		}
	}
	if len(byName) == 0 {
		return out
	}

	// The same order as Resolve, so a contested frontend is attributed to
	// the service that won it there.
	sorted := slices.Clone(svcs)
	slices.SortStableFunc(sorted, func(a, b objects.Service) int {
		return cmp.Compare(objects.Key(a), objects.Key(b))
	})
	claimed := map[bpf.Frontend]bool{}
	for _, svc := range sorted {
		svc.Metadata.Namespace = namespaceOrDefault(svc.Metadata.Namespace)
		if svc.Validate() != nil {
			continue
		}
		frontends, err := allFrontends(svc)
		if err != nil {
			continue
		}
		g, gerr := GlobalOf(svc)
		recs := byName[svc.Metadata.Namespace+"/"+svc.Metadata.Name]
		for _, f := range frontends {
			if claimed[f] {
				continue
			}
			claimed[f] = true
			if gerr != nil || !g.Global || len(recs) == 0 {
				continue
			}
			localBs, ok := local[f]
			if !ok {
				continue
			}
			out[f] = pickBackends(g.Affinity, localBs, remoteBackends(f, svc, recs))
		}
	}
	return out
}

// remoteBackends returns the backends of recs that serve frontend f of svc.
func remoteBackends(f bpf.Frontend, svc objects.Service, recs []records.ServiceRecord) []bpf.Backend {
	proto, portName := records.ProtocolTCP, ""
	if f.Proto == bpf.ProtoUDP {
		proto = records.ProtocolUDP
	}
	if p, ok := svc.PortFor(f); ok {
		portName = p.Name
	}
	var out []bpf.Backend
	for _, r := range recs {
		for _, b := range r.Backends {
			if b.Protocol != proto || b.PortName != portName {
				continue
			}
			addr := b.IP.Unmap()
			if !addr.IsValid() || addr.Is4() != f.VIP.Is4() {
				continue
			}
			out = append(out, bpf.Backend{Addr: addr.WithZone(""), Port: b.Port, ClusterID: r.ClusterID})
		}
	}
	return out
}

// pickBackends applies affinity to the local and remote candidates.
func pickBackends(aff records.Affinity, local, remote []bpf.Backend) []bpf.Backend {
	var bs []bpf.Backend
	switch aff {
	case records.AffinityLocal:
		bs = local
		if len(local) == 0 {
			bs = remote
		}
	case records.AffinityRemote:
		bs = remote
		if len(remote) == 0 {
			bs = local
		}
	default:
		bs = append(slices.Clone(local), remote...)
	}
	bs = slices.Clone(bs)
	if bs == nil {
		bs = []bpf.Backend{}
	}
	slices.SortFunc(bs, compareBackends)
	return slices.Compact(bs)
}

func compareBackends(a, b bpf.Backend) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.ClusterID, b.ClusterID))
}
