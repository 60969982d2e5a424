package datapath

import (
	"fmt"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// svcEndpointInputs identifies the endpoints services select from: the
// local ones, and the own cluster's other nodes' (their ipcache entries,
// labelled by their identities, not this node's).
type svcEndpointInputs struct {
	endpoints, ownIPs, identities uint64
	nodeIPs                       string
}

// serviceEndpoint is a local endpoint as services select it.
func serviceEndpoint(cluster string, ep state.Endpoint) service.Endpoint {
	return service.Endpoint{Key: "local/" + ep.Key(), Namespace: ep.Namespace,
		Labels: desired.IdentityLabels(cluster, ep.Namespace, ep.Labels), IPs: ep.IPs}
}

// changeServiceEndpoints hands the Resolver the local endpoints changed
// since the last run, when they are all that changed of what services
// select from and are known, and reports whether it did; otherwise the
// Resolver is given every endpoint.
func (r *Reconciler) changeServiceEndpoints(s desired.State, in svcEndpointInputs) bool {
	last := r.svcEPIn
	if r.resolver == nil || s.EndpointsGen == 0 || last.endpoints == 0 || s.EndpointsChangedSince == nil {
		return false
	}
	last.endpoints = in.endpoints
	if last != in {
		return false
	}
	keys, ok := s.EndpointsChangedSince(r.svcEPIn.endpoints)
	if !ok {
		return false
	}
	var ups []service.Endpoint
	var gone []string
	for _, k := range keys {
		if i, ok := state.SearchEndpoints(s.Endpoints, k); ok {
			ups = append(ups, serviceEndpoint(s.Cluster, s.Endpoints[i]))
		} else {
			gone = append(gone, "local/"+k)
		}
	}
	r.resolver.ChangeEndpoints(ups, gone)
	r.svcEPIn = in
	return true
}

// syncServices resolves the services against the endpoints that may back
// them (local ones, the own cluster's other nodes', other clusters' shared
// backends of global services) through the incremental service.Resolver,
// and writes the frontends that differ: those the Resolver says it
// touched, or all of them when the shadow was just listed or the mesh's
// readiness changed.
func (r *Reconciler) syncServices(s desired.State, res *Result) error {
	if r.resolver == nil {
		r.resolver = service.NewResolver()
	}
	in := svcEndpointInputs{endpoints: s.EndpointsGen, ownIPs: s.Mesh.View.Versions.OwnIPs,
		identities: s.Mesh.View.Versions.Identities, nodeIPs: fmt.Sprint(s.Mesh.NodeIPs)}
	var seps []service.Endpoint
	if (s.EndpointsGen == 0 || in != r.svcEPIn) && !r.changeServiceEndpoints(s, in) {
		r.svcEPIn = in
		r.svcEPGen++
		seps = make([]service.Endpoint, 0, len(s.Endpoints))
		for _, ep := range s.Endpoints {
			seps = append(seps, serviceEndpoint(s.Cluster, ep))
		}
		seps = append(seps, s.Mesh.ClusterEndpoints(s.Identities)...) // the own cluster's other nodes
	}
	epGen := r.svcEPGen
	if s.EndpointsGen == 0 {
		epGen = 0 // unknown: the Resolver looks
	}
	var want map[bpf.Frontend][]bpf.Backend
	var touched []bpf.Frontend
	if s.Objects != nil {
		want, touched = r.resolver.UpdateObjects(s.Objects, s.ObjectsChangedSince, s.ObjectsGen, seps, epGen, s.Mesh.View.RemoteServices, s.Mesh.View.Versions.Services)
	} else {
		want, touched = r.resolver.Update(s.Services, s.ServiceSources, s.ObjectsGen, seps, epGen, s.Mesh.View.RemoteServices, s.Mesh.View.Versions.Services)
	}

	full := false
	if r.svcShadow == nil {
		have, err := r.dp.ServiceList()
		if err != nil {
			return err
		}
		r.svcShadow, full = have, true
	}
	if s.Mesh.Ready != r.svcReady {
		full = true
	}
	have := r.svcShadow
	failed := false
	write := func(f bpf.Frontend) {
		bes, ok := want[f]
		h, had := have[f]
		switch {
		case ok:
			if had {
				bes = s.Mesh.KeepUnknown(h, bes)
			}
			if !had || !slices.Equal(h, bes) {
				err := r.dp.ServiceUpsert(f, bes)
				res.note(&res.Services, err)
				failed = failed || err != nil
				if err == nil {
					have[f] = bes
				}
			}
		case had && s.Mesh.Ready:
			err := r.dp.ServiceDelete(f)
			res.note(&res.Services, err)
			failed = failed || err != nil
			if err == nil {
				delete(have, f)
			}
		}
	}
	if full {
		for f := range want {
			write(f)
		}
		for f := range have {
			if _, ok := want[f]; !ok {
				write(f)
			}
		}
	} else {
		for _, f := range touched {
			write(f)
		}
	}
	r.svcReady = s.Mesh.Ready
	// The frontends at load-balancer and external addresses, for traffic
	// from outside the mesh: from what was just written. A change of this
	// node's endpoints may change a Local frontend's backends without
	// touching the frontend (an address that moved here from another
	// node): the Local ones are checked again then.
	check := touched
	if s.EndpointsGen == 0 || s.EndpointsGen != r.lbEPGen {
		for f, e := range r.lbWant {
			if e.Policy == bpf.ExternalLocal {
				if np, ok := r.lbNodeOf[f]; ok {
					f = np // a node port is checked as a whole
				}
				check = append(check, f)
			}
		}
	}
	r.lbEPGen = s.EndpointsGen
	if err := r.syncExternal(s, want, check, full, res); err != nil {
		return err
	}
	if failed {
		r.svcShadow = nil // list again next time, and diff everything
	}
	return nil
}
