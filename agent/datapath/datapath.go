// Package datapath is the reconciler of the node's BPF maps: it makes the
// ipcache, the policy map, the endpoints map and the services maps equal to
// the desired state, writing only what differs, one function per map
// (ipcache.go, policy.go, endpoints.go, services.go). It is the only writer
// of those maps.
//
// Ordering keeps every allowed flow flowing: additions go before removals,
// policy entries exist before an endpoint's enforcement is switched on (and
// outlive it when it is switched off), and until the mesh is listed only
// what the node itself is the complete source of is removed.
package datapath

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// Datapath is what the agent uses of *bpf.Datapath; tests substitute a fake.
type Datapath interface {
	AttachEndpoint(ifname string, ifindex int) error
	DetachEndpoint(ifname string) error
	AttachMode() string
	IPCacheUpsert(p netip.Prefix, e bpf.IPCacheEntry) error
	IPCacheDelete(p netip.Prefix) error
	IPCacheList() (map[netip.Prefix]bpf.IPCacheEntry, error)
	EndpointUpsert(ip netip.Addr, e bpf.EndpointInfo) error
	EndpointDelete(ip netip.Addr) error
	EndpointList() (map[netip.Addr]bpf.EndpointInfo, error)
	ServiceUpsert(f bpf.Frontend, backends []bpf.Backend) error
	ServiceDelete(f bpf.Frontend) error
	ServiceList() (map[bpf.Frontend][]bpf.Backend, error)
	PolicySync(want []bpf.PolicyKey) error
	PolicyList() ([]bpf.PolicyKey, error)
	Metrics() (map[bpf.Reason]bpf.Counter, error)
	ConntrackCount() (int, error)
	Close() error
}

var _ Datapath = (*bpf.Datapath)(nil)

// Open loads the node's datapath, pinned in pinDir on the bpffs mounted at
// bpffsRoot (mounting it when needed). With reset, the pinned maps and
// links are removed first: every flow and every program attachment starts
// over.
func Open(bpffsRoot, pinDir string, reset bool) (Datapath, error) {
	// The agent owns the bpffs mount its pins live on.
	if err := bpf.EnsureBPFFS(bpffsRoot); err != nil {
		return nil, err
	}
	if reset {
		if err := bpf.RemovePins(pinDir); err != nil {
			return nil, fmt.Errorf("reset datapath: %w", err)
		}
	}
	return bpf.Open(pinDir)
}

// Reconciler converges the maps of one Datapath. Only one Sync runs at a
// time (the reconcile loop's).
type Reconciler struct {
	dp Datapath

	// ipcShadow is what the reconciler last wrote to the BPF ipcache, so a
	// reconcile diffs against memory instead of walking a map of up to
	// hundreds of thousands of entries (two syscalls each). The map itself
	// is listed again every reconcile.ResyncInterval, and after any write
	// error, to catch drift.
	ipcShadow   map[netip.Prefix]bpf.IPCacheEntry
	ipcListedAt time.Time
	ipcEntries  atomic.Int64 // after the last Sync, for /metrics
}

// NewReconciler returns the reconciler of dp's maps.
func NewReconciler(dp Datapath) *Reconciler { return &Reconciler{dp: dp} }

// IPCacheEntries is the number of BPF ipcache entries after the last Sync,
// known without walking the map.
func (r *Reconciler) IPCacheEntries() int { return int(r.ipcEntries.Load()) }

// Result counts what a Sync changed, and keeps the errors of the writes
// that failed (the others went through).
type Result struct {
	IPCache, Endpoints, Policy, Services int
	Errs                                 []error
}

// Changes is the number of entries written or removed.
func (r Result) Changes() int { return r.IPCache + r.Endpoints + r.Policy + r.Services }

// note counts a change and keeps its error, if any.
func (r *Result) note(count *int, err error) {
	*count++
	if err != nil {
		r.Errs = append(r.Errs, err)
	}
}

// Sync makes the maps equal to s. An error means it stopped early (a map
// could not be read, or policy entries could not be added); the writes
// that failed along a complete run are in Result.Errs instead.
func (r *Reconciler) Sync(s desired.State) (Result, error) {
	var res Result
	// 1. ipcache: who owns which address.
	if err := r.syncIPCache(s, &res); err != nil {
		return res, err
	}
	// 2. Policy, compiled for every local endpoint. New entries first.
	compiled := compilePolicy(s)
	havePol, err := r.addPolicy(compiled, &res)
	if err != nil {
		return res, oneline.Join(append(res.Errs, err)...)
	}
	// 3. Endpoints map, with the enforcement flags.
	clean, err := r.syncEndpoints(s, compiled, &res)
	if err != nil {
		return res, oneline.Join(append(res.Errs, err)...)
	}
	// 4. Stale policy entries, once no endpoint relies on them.
	if clean && s.Mesh.Ready {
		r.prunePolicy(havePol, compiled, &res)
	}
	// 5. Services.
	if err := r.syncServices(s, &res); err != nil {
		return res, oneline.Join(append(res.Errs, err)...)
	}
	return res, nil
}

// compilePolicy compiles the policies for every local endpoint.
func compilePolicy(s desired.State) policy.Result {
	peps := make([]policy.Endpoint, 0, len(s.Endpoints))
	for _, ep := range s.Endpoints {
		peps = append(peps, policy.Endpoint{ID: ep.ID, Namespace: ep.Namespace, Identity: ep.Identity, Labels: desired.IdentityLabels(s.Cluster, ep.Namespace, ep.Labels)})
	}
	return policy.Compile(s.Policies, peps, s.Identities.List(), s.Cluster)
}
