package localapi

import (
	"context"
	"maps"
	"slices"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

// Identities implements api.Backend: the reserved identities, then the
// allocated ones with the number of local endpoints carrying each.
func (h *Handlers) Identities(context.Context) ([]api.Identity, error) {
	refs := map[uint32]int{}
	for _, e := range h.store.Endpoints() {
		refs[e.Identity]++
	}
	var out []api.Identity
	for id := uint32(1); id <= identity.MaxReserved; id++ {
		if name, ok := identity.ReservedName(id); ok {
			out = append(out, api.Identity{ID: id, Labels: identity.Labels{identity.LabelReserved: name}})
		}
	}
	for _, id := range h.ids.List() {
		out = append(out, api.Identity{ID: id.ID, Labels: id.Labels, Endpoints: refs[id.ID]})
	}
	return out, nil
}

// Status implements api.Backend.
func (h *Handlers) Status(ctx context.Context) (api.Status, error) {
	svcs, pols := h.objects().Split()
	st := api.Status{
		Node: h.node, Cluster: h.cluster, ClusterID: h.clusterID,
		PodCIDRs: h.ipam.CIDRs(), AttachMode: h.dp.AttachMode(), Started: h.started,
		Endpoints: len(h.store.Endpoints()), Services: len(svcs), NetworkPolicies: len(pols),
		Identities: len(h.ids.List()),
	}
	var errs []error
	if fs, err := h.dp.ServiceList(); err == nil {
		st.Frontends = len(fs)
	} else {
		errs = append(errs, err)
	}
	if ps, err := h.dp.PolicyList(); err == nil {
		st.PolicyEntries = len(ps)
	} else {
		errs = append(errs, err)
	}
	if h.ipcache != nil {
		st.IPCacheEntries, st.IPCacheOverflow = h.ipcache()
	}
	if n, err := h.dp.ConntrackCount(); err == nil {
		st.Conntrack = n
	} else {
		errs = append(errs, err)
	}
	m, err := h.dp.Metrics()
	if err != nil {
		errs = append(errs, err)
	}
	for _, r := range slices.Sorted(maps.Keys(m)) {
		st.Metrics = append(st.Metrics, api.Metric{Reason: r.String(), Drop: r.IsDrop(), Packets: m[r].Packets, Bytes: m[r].Bytes})
	}
	rs := h.rec.Stats()
	st.Reconcile = api.ReconcileStatus{Runs: rs.Runs, LastSuccess: rs.LastSuccess}
	if rs.LastErr != nil {
		st.Reconcile.LastError = rs.LastErr.Error()
	}
	for _, err := range errs {
		st.Errors = append(st.Errors, err.Error())
	}
	st.ClusterMesh = h.mesh.Status()
	st.WireGuard = h.enc.Status()
	st.BigTCP = h.bigtcp.Status()
	if h.kubernetes != nil {
		st.Kubernetes = h.kubernetes()
	}
	if h.bgp != nil {
		st.BGP = h.bgp(ctx, false)
	}
	if h.northSouth != nil {
		st.NorthSouth = h.northSouth()
	}
	if h.l2 != nil {
		st.L2 = h.l2()
	}
	return st, nil
}

// BGP implements api.Backend.
func (h *Handlers) BGP(ctx context.Context, routes bool) (api.BGPStatus, error) {
	if h.bgp == nil {
		return api.BGPStatus{}, nil
	}
	if st := h.bgp(ctx, routes); st != nil {
		return *st, nil
	}
	return api.BGPStatus{}, nil
}
