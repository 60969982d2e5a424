package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// reconcile makes the datapath maps equal to the desired state, writing only
// what differs. Additions go before removals, and policy entries exist
// before an endpoint's enforcement is switched on (and outlive it when it is
// switched off), so no allowed flow sees a gap.
func (a *Agent) reconcile(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	eps := a.store.Endpoints()
	svcs, pols := a.objects().Split()
	ids := a.ids.List()
	mesh := a.meshState()
	var stats reconcileStats

	// 1. ipcache: who owns which address.
	hostAddrs, err := a.nodeAddrs()
	if err != nil {
		return fmt.Errorf("list node addresses: %w", err)
	}
	wantIPC := map[netip.Prefix]bpf.IPCacheEntry{
		netip.MustParsePrefix("0.0.0.0/0"): {Identity: bpf.IdentityWorld},
		netip.MustParsePrefix("::/0"):      {Identity: bpf.IdentityWorld},
	}
	mesh.AddIPCache(wantIPC) // the rest of the mesh; local facts below override it
	for _, ip := range hostAddrs {
		wantIPC[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: bpf.IdentityHost}
	}
	for _, ep := range eps {
		for _, ip := range ep.IPs {
			wantIPC[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: ep.Identity}
		}
	}
	if a.ipcShadow == nil || time.Since(a.ipcListedAt) >= reconcile.ResyncInterval {
		have, err := a.dp.IPCacheList()
		if err != nil {
			return err
		}
		a.ipcShadow, a.ipcListedAt = have, time.Now()
	}
	haveIPC := a.ipcShadow
	var errs []error
	ipcFailed := false
	for p, e := range wantIPC {
		if h, ok := haveIPC[p]; !ok || h != e {
			if err := a.dp.IPCacheUpsert(p, e); err != nil {
				ipcFailed = true
				errs = appendErr(errs, err, &stats.ipcache)
				continue
			}
			haveIPC[p] = e
			stats.ipcache++
		}
	}
	for p := range haveIPC {
		if _, ok := wantIPC[p]; !ok && mesh.MayRemove(p) {
			if err := a.dp.IPCacheDelete(p); err != nil {
				ipcFailed = true
				errs = appendErr(errs, err, &stats.ipcache)
				continue
			}
			delete(haveIPC, p)
			stats.ipcache++
		}
	}
	if ipcFailed {
		a.ipcShadow = nil // list the map again next time
	}
	a.ipcEntries.Store(int64(len(haveIPC))) // for /metrics, without walking the map

	// 2. Policy, compiled for every local endpoint. New entries first.
	peps := make([]policy.Endpoint, 0, len(eps))
	for _, ep := range eps {
		peps = append(peps, policy.Endpoint{ID: ep.ID, Namespace: ep.Namespace, Identity: ep.Identity, Labels: desired.IdentityLabels(a.cfg.ClusterName, ep.Namespace, ep.Labels)})
	}
	compiled := policy.Compile(pols, peps, ids, a.cfg.ClusterName)
	havePol, err := a.dp.PolicyList()
	if err != nil {
		return oneline.Join(append(errs, err)...)
	}
	wantPol := make(map[bpf.PolicyKey]bool, len(compiled.Keys))
	for _, k := range compiled.Keys {
		wantPol[k] = true
	}
	havePolSet := make(map[bpf.PolicyKey]bool, len(havePol))
	union := slices.Clone(havePol)
	for _, k := range havePol {
		havePolSet[k] = true
	}
	for _, k := range compiled.Keys {
		if !havePolSet[k] {
			union = append(union, k)
			stats.policy++
		}
	}
	if len(union) > len(havePol) {
		if err := a.dp.PolicySync(union); err != nil {
			// Without the new entries, switching enforcement on would drop
			// allowed traffic: stop here and retry.
			return oneline.Join(append(errs, fmt.Errorf("add policy entries: %w", err))...)
		}
	}

	// 3. Endpoints map, with the enforcement flags.
	wantEP := map[netip.Addr]bpf.EndpointInfo{}
	for _, ep := range eps {
		hostMAC, err1 := net.ParseMAC(ep.HostMAC)
		podMAC, err2 := net.ParseMAC(ep.PodMAC)
		if err := errors.Join(err1, err2); err != nil {
			errs = append(errs, fmt.Errorf("endpoint %s: bad MAC in state: %w", ep.Key(), err))
			continue
		}
		for _, ip := range ep.IPs {
			wantEP[ip] = bpf.EndpointInfo{
				ID: ep.ID, IfIndex: uint32(ep.IfIndex), Identity: ep.Identity,
				PodMAC: podMAC, HostMAC: hostMAC,
				PolicyIngress: compiled.Ingress[ep.ID], PolicyEgress: compiled.Egress[ep.ID],
			}
		}
	}
	haveEP, err := a.dp.EndpointList()
	if err != nil {
		return oneline.Join(append(errs, err)...)
	}
	epErrs := len(errs)
	for ip, e := range wantEP {
		if h, ok := haveEP[ip]; !ok || !sameEndpointInfo(h, e) {
			errs = appendErr(errs, a.dp.EndpointUpsert(ip, e), &stats.endpoints)
		}
	}
	for ip := range haveEP {
		if _, ok := wantEP[ip]; !ok {
			errs = appendErr(errs, a.dp.EndpointDelete(ip), &stats.endpoints)
		}
	}

	// 4. Stale policy entries, once no endpoint relies on them.
	stale := 0
	for _, k := range havePol {
		if !wantPol[k] {
			stale++
		}
	}
	if stale > 0 && len(errs) == epErrs && mesh.Ready {
		if err := a.dp.PolicySync(compiled.Keys); err != nil {
			errs = append(errs, fmt.Errorf("remove policy entries: %w", err))
		} else {
			stats.policy += stale
		}
	}

	// 5. Services.
	seps := make([]service.Endpoint, 0, len(eps))
	for _, ep := range eps {
		seps = append(seps, service.Endpoint{Namespace: ep.Namespace, Labels: desired.IdentityLabels(a.cfg.ClusterName, ep.Namespace, ep.Labels), IPs: ep.IPs})
	}
	seps = append(seps, mesh.ClusterEndpoints(a.ids)...) // the own cluster's other nodes
	wantSvc := service.Resolve(svcs, seps)
	if a.mesh != nil {
		wantSvc = service.Merge(wantSvc, svcs, mesh.View.RemoteServices)
	}
	haveSvc, err := a.dp.ServiceList()
	if err != nil {
		return oneline.Join(append(errs, err)...)
	}
	for f, bes := range wantSvc {
		h, ok := haveSvc[f]
		if ok {
			bes = mesh.KeepUnknown(h, bes)
		}
		if !ok || !slices.Equal(h, bes) {
			errs = appendErr(errs, a.dp.ServiceUpsert(f, bes), &stats.services)
		}
	}
	for f := range haveSvc {
		if _, ok := wantSvc[f]; !ok && mesh.Ready {
			errs = appendErr(errs, a.dp.ServiceDelete(f), &stats.services)
		}
	}

	// 6. Routes to the pod CIDRs of other nodes. A route that cannot be
	// made concerns traffic to that node only: it is reported in the
	// status and retried with the next run, and does not fail this one
	// (which would roll back unrelated API calls).
	if a.routes != nil {
		n, err := a.routes.SyncRoutes(mesh.PodRoutes(), mesh.Ready)
		stats.routes += n
		a.mesh.setRouteErr(err)
		if err != nil {
			a.rec.SoftFail()
		}
	}

	// 7. WireGuard peers and the tunnel routes. Like routes, a failure
	// concerns traffic to some nodes only: reported in the status and
	// retried with the next run.
	if a.enc != nil {
		n, err := a.syncEncryption(mesh)
		stats.routes += n
		if err != nil {
			a.rec.SoftFail()
			a.log.Warn("wireguard: peers or tunnel routes incomplete; retrying", "err", err)
		}
	}

	if stats.any() {
		a.log.Info("datapath reconciled", "ipcacheChanges", stats.ipcache, "endpointChanges", stats.endpoints,
			"policyChanges", stats.policy, "serviceChanges", stats.services, "routeChanges", stats.routes, "errors", len(errs))
	}
	return oneline.Join(errs...)
}

type reconcileStats struct{ ipcache, endpoints, policy, services, routes int }

func (s reconcileStats) any() bool { return s.ipcache+s.endpoints+s.policy+s.services+s.routes > 0 }

// appendErr counts a change and keeps its error, if any.
func appendErr(errs []error, err error, count *int) []error {
	*count++
	if err != nil {
		return append(errs, err)
	}
	return errs
}

func sameEndpointInfo(a, b bpf.EndpointInfo) bool {
	return a.ID == b.ID && a.IfIndex == b.IfIndex && a.Identity == b.Identity &&
		a.PolicyIngress == b.PolicyIngress && a.PolicyEgress == b.PolicyEgress &&
		bytes.Equal(a.PodMAC, b.PodMAC) && bytes.Equal(a.HostMAC, b.HostMAC)
}
