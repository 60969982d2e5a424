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
	"slices"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
	"github.com/isthmus-mesh/isthmus/agent/policy"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
)

// Datapath is what the agent uses of *bpf.Datapath; tests substitute a fake.
type Datapath interface {
	AttachEndpoint(ifname string, ifindex int) error
	ClsactForNewEndpoints() bool
	AttachNewEndpoint(ifname string, ifindex int) error
	ReleaseEndpoint(ifname string) error
	AttachMode() string
	IPCacheUpsert(p netip.Prefix, e bpf.IPCacheEntry) error
	IPCacheUpsertBatch(ps []netip.Prefix, es []bpf.IPCacheEntry) (int, error)
	IPCacheDelete(p netip.Prefix) error
	IPCacheList() (map[netip.Prefix]bpf.IPCacheEntry, error)
	EndpointUpsert(ip netip.Addr, e bpf.EndpointInfo) error
	EndpointDelete(ip netip.Addr) error
	EndpointList() (map[netip.Addr]bpf.EndpointInfo, error)
	ServiceUpsert(f bpf.Frontend, backends []bpf.Backend) error
	ServiceDelete(f bpf.Frontend) error
	ServiceList() (map[bpf.Frontend][]bpf.Backend, error)
	ExternalUpsert(f bpf.Frontend, e bpf.External) error
	ExternalDelete(f bpf.Frontend) error
	ExternalList() (map[bpf.Frontend]bpf.External, error)
	AttachExternal(ifname string, ifindex int) error
	DetachExternal(ifname string) error
	ExternalAttached() ([]string, error)
	AttachHost(ifname string, ifindex int) error
	PolicySync(want []bpf.PolicyKey) error
	PolicyUpdate(add, del []bpf.PolicyKey) error
	PolicyList() ([]bpf.PolicyKey, error)
	Metrics() (map[bpf.Reason]bpf.Counter, error)
	ConntrackCount() (int, error)
	Close() error
}

var _ Datapath = (*bpf.Datapath)(nil)

// Open loads the node's datapath, pinned in pinDir on the bpffs mounted at
// bpffsRoot (mounting it when needed). With reset, the pinned maps and
// links are removed first: every flow and every program attachment starts
// over. endpointAttach is how the pod programs are attached (bpf.AttachTC
// or bpf.AttachTCX; "" is tc).
func Open(bpffsRoot, pinDir string, reset bool, endpointAttach string) (Datapath, error) {
	// The agent owns the bpffs mount its pins live on.
	if err := bpf.EnsureBPFFS(bpffsRoot); err != nil {
		return nil, err
	}
	if reset {
		if err := bpf.RemovePins(pinDir); err != nil {
			return nil, fmt.Errorf("reset datapath: %w", err)
		}
	}
	mode, err := bpf.ParseEndpointAttach(endpointAttach)
	if err != nil {
		return nil, err
	}
	dp, err := bpf.Open(pinDir)
	if err != nil {
		return nil, err
	}
	dp.SetEndpointAttach(mode)
	return dp, nil
}

// Reconciler converges the maps of one Datapath. Only one Sync runs at a
// time (the reconcile loop's).
//
// It costs per change, not per mesh: it keeps a shadow of what it last
// wrote to each map and diffs against it (the maps are listed again every
// reconcile.ResyncInterval, and after a failed write, to catch drift); the
// ipcache takes only the prefixes that changed (desired.Mesh.TakeIPChanges
// and the node's own entries); policy, endpoints and services are derived
// again only when their inputs' generations moved, and for the endpoints
// that changed only when nothing else did (desired.State.
// EndpointsChangedSince).
type Reconciler struct {
	dp Datapath

	listedAt time.Time // of the shadows below
	// ipcShadow is the BPF ipcache as last written; ipcLocal the node's own
	// part of the desired ipcache at the last run (its base is diffed, its
	// pods' part follows the endpoints that changed; nil: a full pass);
	// ipcReady and ipcNodeIPs what the mesh part was read with (a change of
	// either makes a full pass).
	ipcShadow  ipShadow
	ipcLocal   *localIPs
	ipcReady   bool
	ipcNodeIPs []netip.Addr
	ipcEntries atomic.Int64 // after the last Sync, for /metrics
	// ipcMeshLimit caps the map's entries that mesh entries may fill
	// (the capacity less IPCacheReserve): the node's own entries always
	// fit. ipcOverflow counts the mesh entries left out for it at the last
	// Sync; they are tried again at the next full pass.
	ipcMeshLimit int
	ipcOverflow  atomic.Int64
	// ipcListing delivers the background listing of the drift check (nil:
	// none in flight); requestRun asks for a run when it is in.
	ipcListing chan ipcList
	ipcEpoch   uint16 // counts the listings started (ipVal.epoch)
	requestRun func()
	ipcDrift   atomic.Int64 // entries the drift checks found wrong and fixed

	epShadow  map[netip.Addr]bpf.EndpointInfo // nil: list the map
	polShadow map[bpf.PolicyKey]struct{}      // nil: list the map
	svcShadow map[bpf.Frontend][]bpf.Backend  // nil: list the map
	lbShadow  map[bpf.Frontend]bpf.External   // isth_lb as last written; nil: list the map
	lbWant    map[bpf.Frontend]bpf.External   // the external frontends wanted at the last run
	lbEPGen   uint64                          // the EndpointsGen lbWant was computed with
	// Kept with lbWant (setLBWant, delLBWant), so that a run writes what
	// changed without going over every frontend: the frontends changed
	// since the last write, the frontends of lbWant per address, and the
	// counts by policy.
	lbDirty   map[bpf.Frontend]struct{}
	lbAddrRef map[netip.Addr]int
	lbCounts0 ExternalCounts
	// The node ports: each services-map node-port frontend (at the
	// unspecified address) becomes one isth_lb frontend per node address
	// of its family. lbNode holds what each became at the last run,
	// lbNodeOf the reverse, lbNodeAddrs the node addresses they were
	// made for.
	lbNode      map[bpf.Frontend][]bpf.Frontend
	lbNodeOf    map[bpf.Frontend]bpf.Frontend
	lbNodeAddrs []netip.Addr
	lbCounts    atomic.Value // ExternalCounts after the last Sync

	// The inputs the policy (with the endpoints map) was last applied
	// for; the zero value never matches. polCompiler compiles the
	// policies of those inputs for one endpoint; epEntries is what each
	// endpoint (by key; the workload under workloadKey) made of the maps:
	// a run in which only endpoints changed compiles and writes theirs.
	polApplied  policyInputs
	polCompiler *policy.Compiler
	epEntries   map[string]epEntries

	// The services: resolved incrementally; svcEPIn and svcEPGen identify
	// the endpoints last given to the resolver; svcReady the mesh's
	// readiness the shadow was last diffed with.
	resolver *service.Resolver
	svcEPIn  svcEndpointInputs
	svcEPGen uint64
	svcReady bool
}

// policyInputs identifies what policy and the endpoints map derive from.
type policyInputs struct {
	endpoints, objects, identities, listed uint64
	localIDs                               uint64 // desired.State.IdentitiesGen
	ready                                  bool
	cluster                                string
	workload                               uint32 // the external workload's identity (0: none)
}

// onlyEndpointsMoved reports whether in differs from applied in the
// endpoints only, with every generation known: then the endpoints that
// changed are all that changed for policy.
func (in policyInputs) onlyEndpointsMoved(applied policyInputs) bool {
	if in.endpoints == 0 || applied.endpoints == 0 || in.objects == 0 || in.localIDs == 0 {
		return false
	}
	applied.endpoints = in.endpoints
	return in == applied
}

// OnBackgroundWork sets what the Reconciler calls when work it did in the
// background (the ipcache drift check's listing) waits for a run.
func (r *Reconciler) OnBackgroundWork(request func()) { r.requestRun = request }

// IPCacheDrift is the number of BPF ipcache entries the drift checks found
// different from what the reconciler had written, and wrote again.
func (r *Reconciler) IPCacheDrift() int { return int(r.ipcDrift.Load()) }

// IPCacheReserve is how many BPF ipcache entries mesh entries never take:
// room for the node's own (its pods, its addresses, its cluster's nodes).
const IPCacheReserve = 16 * 1024

// NewReconciler returns the reconciler of dp's maps.
func NewReconciler(dp Datapath) *Reconciler {
	return &Reconciler{dp: dp, ipcMeshLimit: bpf.IPCacheMaxEntries - IPCacheReserve}
}

// IPCacheEntries is the number of BPF ipcache entries after the last Sync,
// known without walking the map.
func (r *Reconciler) IPCacheEntries() int { return int(r.ipcEntries.Load()) }

// IPCacheOverflow is the number of mesh entries the last Sync left out of
// the BPF ipcache because it was full (but for IPCacheReserve).
func (r *Reconciler) IPCacheOverflow() int { return int(r.ipcOverflow.Load()) }

// Result counts what a Sync changed, and keeps the errors of the writes
// that failed (the others went through).
type Result struct {
	IPCache, Endpoints, Policy, Services int
	External                             int // isth_lb entries
	Errs                                 []error
	// Overflow is set (to the count) when mesh entries started to be
	// left out of a full ipcache in this Sync.
	Overflow int
}

// Changes is the number of entries written or removed.
func (r Result) Changes() int { return r.IPCache + r.Endpoints + r.Policy + r.Services + r.External }

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
	if time.Since(r.listedAt) >= reconcile.ResyncInterval {
		// Drift check: the small maps' shadows are listed again and every
		// step runs; the ipcache (up to 512k entries) is listed in the
		// background and compared when the listing is in (driftIPCache),
		// so that no run stalls for it.
		r.epShadow, r.polShadow, r.svcShadow, r.lbShadow, r.lbWant = nil, nil, nil, nil, nil
		r.listedAt = time.Now()
		r.listIPCacheInBackground()
		if r.ipcOverflow.Load() > 0 {
			r.ipcLocal = nil // a full pass: the mesh entries left out of a full map try again
		}
	}
	// 1. ipcache: who owns which address.
	if err := r.syncIPCache(s, &res); err != nil {
		return res, err
	}
	// 2.-4. Policy, endpoints: they depend on the objects, the endpoints
	// and the identities (unknown generations, 0: always applied). When
	// only endpoints changed, only theirs are compiled and written.
	polIn := policyInputs{endpoints: s.EndpointsGen, objects: s.ObjectsGen, identities: s.Mesh.View.Versions.Identities,
		listed: s.Mesh.View.Versions.Listed, localIDs: s.IdentitiesGen, ready: s.Mesh.Ready, cluster: s.Cluster}
	if s.Workload != nil {
		polIn.workload = s.Workload.Identity
	}
	if s.EndpointsGen == 0 || s.ObjectsGen == 0 || polIn != r.polApplied || r.epShadow == nil || r.polShadow == nil {
		var changed []string
		known := false
		if polIn.onlyEndpointsMoved(r.polApplied) && r.epShadow != nil && r.polShadow != nil && s.EndpointsChangedSince != nil {
			changed, known = s.EndpointsChangedSince(r.polApplied.endpoints)
		}
		r.polApplied = policyInputs{}
		before := len(res.Errs)
		var err error
		if known {
			err = r.syncPolicyOf(s, changed, &res)
		} else {
			err = r.syncPolicy(s, &res)
		}
		if err != nil {
			return res, oneline.Join(append(res.Errs, err)...)
		}
		if len(res.Errs) == before {
			r.polApplied = polIn
		}
	}
	// 5. Services: the Resolver takes only what changed, and the
	// frontends it touched are written.
	if err := r.syncServices(s, &res); err != nil {
		return res, oneline.Join(append(res.Errs, err)...)
	}
	return res, nil
}

// syncPolicy compiles the policy for every local endpoint and writes the
// policy map and the endpoints map with their enforcement flags, in the
// order that keeps allowed flows flowing.
// An error means it stopped early; failed writes are in res.Errs.
func (r *Reconciler) syncPolicy(s desired.State, res *Result) error {
	r.polCompiler = newCompiler(s)
	r.epEntries = make(map[string]epEntries, len(s.Endpoints)+1)
	var keys []bpf.PolicyKey
	wantKeys := map[bpf.PolicyKey]struct{}{}
	infos := map[netip.Addr]bpf.EndpointInfo{}
	add := func(key string, e epEntries) {
		r.epEntries[key] = e
		keys = append(keys, e.keys...)
		for _, k := range e.keys {
			wantKeys[k] = struct{}{}
		}
		for _, i := range e.infos {
			infos[i.ip] = i.info
		}
	}
	for _, ep := range s.Endpoints {
		add(ep.Key(), r.entriesOf(s, ep, res))
	}
	if w := s.Workload; w != nil {
		add(workloadKey, workloadEntries(r.polCompiler, s.Cluster, w))
	}
	// New policy entries first.
	if err := r.addPolicy(keys, res); err != nil {
		return err
	}
	// Endpoints map, with the enforcement flags.
	clean, err := r.syncEndpoints(infos, nil, true, res)
	if err != nil {
		return err
	}
	// Stale policy entries, once no endpoint relies on them.
	if clean && s.Mesh.Ready {
		r.prunePolicy(wantKeys, res)
	}
	return nil
}

// syncPolicyOf is syncPolicy for the endpoints of keys (changed since the
// last run, which applied every other input of s): it compiles theirs
// and writes what differs from what they made of the maps before.
func (r *Reconciler) syncPolicyOf(s desired.State, keys []string, res *Result) error {
	next := make(map[string]epEntries, len(keys))
	for _, k := range keys {
		if i, ok := state.SearchEndpoints(s.Endpoints, k); ok {
			next[k] = r.entriesOf(s, s.Endpoints[i], res)
		} else {
			next[k] = epEntries{} // gone
		}
	}
	var add, stale []bpf.PolicyKey
	var consider []netip.Addr
	infos := map[netip.Addr]bpf.EndpointInfo{}
	for k, e := range next {
		old := r.epEntries[k]
		add = append(add, e.keys...)
		for _, key := range old.keys {
			if _, kept := slices.BinarySearchFunc(e.keys, key, policy.CompareKeys); !kept {
				stale = append(stale, key)
			}
		}
		for _, i := range old.infos {
			consider = append(consider, i.ip)
		}
		for _, i := range e.infos {
			infos[i.ip] = i.info
			consider = append(consider, i.ip)
		}
	}
	if err := r.addPolicy(add, res); err != nil {
		return err
	}
	clean, err := r.syncEndpoints(infos, consider, false, res)
	if err != nil {
		return err
	}
	for k, e := range next {
		if len(e.keys) == 0 && len(e.infos) == 0 {
			delete(r.epEntries, k)
		} else {
			r.epEntries[k] = e
		}
	}
	// Stale policy entries, once no endpoint relies on them; otherwise
	// the full run that follows a failed write, or the mesh being
	// listed, prunes them.
	if clean && s.Mesh.Ready {
		r.removePolicy(stale, res)
	}
	return nil
}

// entriesOf is endpointEntries with the run's compiler; a bad MAC is
// reported in res.
func (r *Reconciler) entriesOf(s desired.State, ep state.Endpoint, res *Result) epEntries {
	e, err := endpointEntries(r.polCompiler, s.Cluster, ep)
	if err != nil {
		res.Errs = append(res.Errs, err)
	}
	return e
}
