package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/bpf"
)

const (
	// resyncInterval bounds how long drift (a map entry removed by hand, a
	// node address that changed without a netlink event) can last.
	resyncInterval = time.Minute
	maxBackoff     = 10 * time.Second
	// convergeTimeout bounds how long an API call waits for the datapath.
	convergeTimeout = 30 * time.Second
)

// reconciler coalesces requests for a reconcile and lets callers wait until
// the datapath reflects the desired state they wrote.
type reconciler struct {
	trigger chan struct{} // capacity 1: any number of requests, one pending run

	mu          sync.Mutex
	want        uint64 // generation of the desired state, bumped per request
	done        uint64 // highest generation a successful run covered
	failed      uint64 // highest generation a failed run covered
	lastErr     error
	runs        uint64
	lastSuccess time.Time
	finished    chan struct{} // closed and replaced after every run

	// For /metrics.
	errors    uint64        // runs that failed
	covered   uint64        // highest generation any finished run covered
	startedAt time.Time     // of the run in progress
	busy      time.Duration // time spent in runs
	ipcache   int           // BPF ipcache entries after the last run
}

func newReconciler() reconciler {
	return reconciler{trigger: make(chan struct{}, 1), finished: make(chan struct{})}
}

// request asks for a run and returns the generation it will cover.
func (r *reconciler) request() uint64 {
	r.mu.Lock()
	r.want++
	gen := r.want
	r.mu.Unlock()
	select {
	case r.trigger <- struct{}{}:
	default: // a run is already pending and will see this generation
	}
	return gen
}

// start returns the generation a run starting now covers.
func (r *reconciler) start() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.startedAt = time.Now()
	return r.want
}

func (r *reconciler) finish(gen uint64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.runs++
	r.covered = max(r.covered, gen)
	r.busy += time.Since(r.startedAt)
	if err == nil {
		r.done = max(r.done, gen)
		r.lastErr = nil
		r.lastSuccess = time.Now()
	} else {
		r.failed = max(r.failed, gen)
		r.lastErr = err
		r.errors++
	}
	close(r.finished)
	r.finished = make(chan struct{})
}

// wait returns once a run covering gen succeeded, or with the error of the
// first run covering gen that failed.
func (r *reconciler) wait(ctx context.Context, gen uint64) error {
	for {
		r.mu.Lock()
		done, failed, err, ch := r.done, r.failed, r.lastErr, r.finished
		r.mu.Unlock()
		switch {
		case done >= gen:
			return nil
		case failed >= gen && err != nil:
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("datapath not updated within %s: %w", convergeTimeout, ctx.Err())
		case <-ch:
		}
	}
}

// reconcilerMetrics is what /metrics shows of the reconciler.
type reconcilerMetrics struct {
	runs, errors uint64
	pending      uint64 // requests no finished run covers yet
	failing      bool   // the last run failed
	lastSuccess  time.Time
	busy         time.Duration
	ipcache      int
}

func (r *reconciler) metrics() reconcilerMetrics {
	r.mu.Lock()
	defer r.mu.Unlock()
	return reconcilerMetrics{runs: r.runs, errors: r.errors, pending: r.want - r.covered,
		failing: r.lastErr != nil, lastSuccess: r.lastSuccess, busy: r.busy, ipcache: r.ipcache}
}

func (r *reconciler) setIPCacheEntries(n int) {
	r.mu.Lock()
	r.ipcache = n
	r.mu.Unlock()
}

func (r *reconciler) status() (runs uint64, lastSuccess time.Time, lastErr error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.runs, r.lastSuccess, r.lastErr
}

// converge requests a reconcile and waits for the datapath to reflect the
// desired state as it is now.
func (a *Agent) converge(ctx context.Context) error {
	gen := a.rec.request()
	ctx, cancel := context.WithTimeout(ctx, convergeTimeout)
	defer cancel()
	return a.rec.wait(ctx, gen)
}

// reconcileLoop is the only caller of reconcile once Run has started: one
// run at a time, on request, retried with backoff, and periodically.
func (a *Agent) reconcileLoop(ctx context.Context) {
	var backoff time.Duration
	timer := time.NewTimer(resyncInterval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.rec.trigger:
		case <-timer.C:
		}
		gen := a.rec.start()
		err := a.reconcile(ctx)
		a.rec.finish(gen, err)
		if err != nil {
			backoff = min(max(2*backoff, 100*time.Millisecond), maxBackoff)
			a.log.Error("reconcile failed; retrying", "in", backoff, "err", err)
			timer.Reset(backoff)
			continue
		}
		if a.softFailed.Swap(false) {
			// Routes or tunnels are incomplete: retry soon, without
			// failing the run (API calls it serves succeeded).
			backoff = min(max(2*backoff, time.Second), maxBackoff)
			timer.Reset(backoff)
			continue
		}
		backoff = 0
		timer.Reset(resyncInterval)
	}
}

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
	if a.ipcShadow == nil || time.Since(a.ipcListedAt) >= resyncInterval {
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
	a.rec.setIPCacheEntries(len(haveIPC)) // for /metrics, without walking the map

	// 2. Policy, compiled for every local endpoint. New entries first.
	peps := make([]policy.Endpoint, 0, len(eps))
	for _, ep := range eps {
		peps = append(peps, policy.Endpoint{ID: ep.ID, Namespace: ep.Namespace, Identity: ep.Identity, Labels: desired.IdentityLabels(a.cfg.ClusterName, ep.Namespace, ep.Labels)})
	}
	compiled := policy.Compile(pols, peps, ids, a.cfg.ClusterName)
	havePol, err := a.dp.PolicyList()
	if err != nil {
		return joinErrs(append(errs, err)...)
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
			return joinErrs(append(errs, fmt.Errorf("add policy entries: %w", err))...)
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
		return joinErrs(append(errs, err)...)
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
		return joinErrs(append(errs, err)...)
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
			a.softFailed.Store(true)
		}
	}

	// 7. WireGuard peers and the tunnel routes. Like routes, a failure
	// concerns traffic to some nodes only: reported in the status and
	// retried with the next run.
	if a.enc != nil {
		n, err := a.syncEncryption(mesh)
		stats.routes += n
		if err != nil {
			a.softFailed.Store(true)
			a.log.Warn("wireguard: peers or tunnel routes incomplete; retrying", "err", err)
		}
	}

	if stats.any() {
		a.log.Info("datapath reconciled", "ipcacheChanges", stats.ipcache, "endpointChanges", stats.endpoints,
			"policyChanges", stats.policy, "serviceChanges", stats.services, "routeChanges", stats.routes, "errors", len(errs))
	}
	return joinErrs(errs...)
}

// joinErrs joins errors on one line (API error messages are one line).
func joinErrs(errs ...error) error {
	var kept []error
	seen := map[string]bool{}
	for _, err := range errs {
		if err != nil && !seen[err.Error()] {
			seen[err.Error()] = true
			kept = append(kept, err)
		}
	}
	if len(kept) == 0 {
		return nil
	}
	return multiErr(kept)
}

type multiErr []error

func (m multiErr) Error() string {
	s := make([]string, len(m))
	for i, err := range m {
		s[i] = err.Error()
	}
	return strings.Join(s, "; ")
}

func (m multiErr) Unwrap() []error { return m }

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

// nodeAddrs lists the node's own addresses (they map to the host identity).
// Link-local addresses are left out: they are not unique to the node.
func nodeAddrs() ([]netip.Addr, error) {
	list, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() {
			continue
		}
		out = append(out, ip)
	}
	return out, nil
}

// watchNodeAddrs requests a reconcile whenever a node address comes or goes,
// so the host identity follows the node's addresses.
func (a *Agent) watchNodeAddrs(ctx context.Context) {
	ch := make(chan netlink.AddrUpdate, 64)
	err := netlink.AddrSubscribeWithOptions(ch, ctx.Done(), netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) {
			if ctx.Err() == nil {
				a.log.Warn("node address watch", "err", err)
			}
		},
	})
	if err != nil {
		a.log.Warn("cannot watch node addresses; relying on periodic resync", "err", err)
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				return
			}
			a.rec.request()
		}
	}
}
