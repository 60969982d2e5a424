package agent

import (
	"context"
	"fmt"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
)

// reconcile runs the reconcilers in order: the BPF maps, then the routes
// to other nodes' pod CIDRs, then WireGuard. Routes and tunnels that cannot
// be made concern traffic to some nodes only: they are reported in the
// status and retried (SoftFail), and do not fail the run (which would roll
// back unrelated API calls).
func (a *Agent) reconcile(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	want, err := a.desiredState()
	if err != nil {
		return err
	}
	res, err := a.maps.Sync(want)
	if err != nil {
		return err
	}
	routeChanges := 0
	if a.routes != nil {
		n, err := a.routes.SyncRoutes(want.Mesh.PodRoutes(), want.Mesh.Ready)
		routeChanges += n
		a.mesh.SetRouteErr(err)
		if err != nil {
			a.rec.SoftFail()
		}
	}
	if a.enc != nil {
		n, err := a.enc.Sync(want.Mesh)
		routeChanges += n
		if err != nil {
			a.rec.SoftFail()
			a.log.Warn("wireguard: peers or tunnel routes incomplete; retrying", "err", err)
		}
	}
	if res.Changes()+routeChanges > 0 {
		a.log.Info("datapath reconciled", "ipcacheChanges", res.IPCache, "endpointChanges", res.Endpoints,
			"policyChanges", res.Policy, "serviceChanges", res.Services, "routeChanges", routeChanges, "errors", len(res.Errs))
	}
	return oneline.Join(res.Errs...)
}

// desiredState is what one reconcile run converges to.
func (a *Agent) desiredState() (desired.State, error) {
	svcs, pols := a.objects().Split()
	s := desired.State{Cluster: a.cfg.ClusterName, Endpoints: a.store.Endpoints(), Services: svcs, Policies: pols,
		Identities: a.ids, Mesh: a.mesh.Desired()}
	addrs, err := a.nodeAddrs()
	if err != nil {
		return s, fmt.Errorf("list node addresses: %w", err)
	}
	s.HostAddrs = addrs
	return s, nil
}
