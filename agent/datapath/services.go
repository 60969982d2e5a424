package datapath

import (
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/service"
)

// syncServices resolves the services against the endpoints that may back
// them (local ones, the own cluster's other nodes', other clusters' shared
// backends of global services) and writes the frontends that differ.
func (r *Reconciler) syncServices(s desired.State, res *Result) error {
	seps := make([]service.Endpoint, 0, len(s.Endpoints))
	for _, ep := range s.Endpoints {
		seps = append(seps, service.Endpoint{Namespace: ep.Namespace, Labels: desired.IdentityLabels(s.Cluster, ep.Namespace, ep.Labels), IPs: ep.IPs})
	}
	seps = append(seps, s.Mesh.ClusterEndpoints(s.Identities)...) // the own cluster's other nodes
	want := service.Resolve(s.Services, seps)
	want = service.Merge(want, s.Services, s.Mesh.View.RemoteServices) // nothing to merge in standalone mode
	if r.svcShadow == nil {
		have, err := r.dp.ServiceList()
		if err != nil {
			return err
		}
		r.svcShadow = have
	}
	have := r.svcShadow
	failed := false
	for f, bes := range want {
		h, ok := have[f]
		if ok {
			bes = s.Mesh.KeepUnknown(h, bes)
		}
		if !ok || !slices.Equal(h, bes) {
			err := r.dp.ServiceUpsert(f, bes)
			res.note(&res.Services, err)
			failed = failed || err != nil
			if err == nil {
				have[f] = bes
			}
		}
	}
	for f := range have {
		if _, ok := want[f]; !ok && s.Mesh.Ready {
			err := r.dp.ServiceDelete(f)
			res.note(&res.Services, err)
			failed = failed || err != nil
			if err == nil {
				delete(have, f)
			}
		}
	}
	if failed {
		r.svcShadow = nil // list again next time
	}
	return nil
}
