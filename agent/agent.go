// Package agent is the Isthmus node agent: it turns what users ask for on
// the local API (endpoints, Services, NetworkPolicies), and in cluster mode
// what the mesh holds in etcd, into veths, eBPF map entries, routes and
// WireGuard peers on one node. This file is the wiring; every concern is a
// package of its own.
//
// Data flows one way: sources → desired state → reconcilers → kernel.
//
//	sources                   desired state                reconcilers
//	───────                   ─────────────                ───────────
//	local API (localapi):     endpoints (state.Store,      datapath:   BPF maps
//	  validate, allocate,  ─┐   on disk first)           ┌▶  ipcache, policy,
//	  plumb (endpoint)      │ applied objects (desired)  │   endpoints, services
//	cluster's etcd          ├▶ identities (identity,     ├▶ routes:     other nodes'
//	  (clustermode over     │   local or in etcd)        │   pod CIDRs
//	  meshsync)            ─┤ the mesh (desired.Mesh)    └▶ encryption: WireGuard
//	node addresses (node)  ─┘ node addresses               peers, table 73
//	                                 │
//	              one desired.State per run (reconcile, below)
//
// Sources write desired state and ask reconcile.Trigger for a run; its
// loop runs the reconcilers one after the other, on request, with backoff
// after a failure and every minute. API calls that change desired state
// return once a run took it (Converge). Reconcilers diff against what the
// kernel holds and write only the difference, so a restarted agent, which
// finds its maps and program links pinned in bpffs, changes nothing that is
// already right: no flush, no gap in traffic. agent/metrics reads all of it
// at scrape time, like `isthmus status`.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/bgp"
	"github.com/isthmus-mesh/isthmus/agent/bigtcp"
	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/cniinstall"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/encryption"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
	"github.com/isthmus-mesh/isthmus/agent/ipam"
	"github.com/isthmus-mesh/isthmus/agent/kube"
	"github.com/isthmus-mesh/isthmus/agent/l2"
	"github.com/isthmus-mesh/isthmus/agent/localapi"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/metrics"
	"github.com/isthmus-mesh/isthmus/agent/node"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/gateway/northsouth"
)

// Agent runs one node.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	started time.Time

	// Desired state and the allocators behind it.
	store  *state.Store
	ipam   *ipam.IPAM
	ids    identity.Allocator
	objSet desired.ObjectTable // objects applied on this node, or persisted from etcd
	mu     sync.Mutex          // the local API's lock (localapi.Config.Lock)

	// Kernel-facing steps, replaceable in tests.
	plumb        localapi.Plumber
	openDatapath func(Config) (datapath.Datapath, error)
	nodeAddrs    func() ([]netip.Addr, error)
	hostAddrs    *node.AddrCache // over nodeAddrs
	// workloadDev and workloadIfIndex: an external workload's WireGuard
	// device, its datapath (set by plumbWorkload; 0 on a node).
	workloadDev     string
	workloadIfIndex int
	newRouter       func() (routes.Router, error)
	detectNodeIPs   func() ([]netip.Addr, error)
	// underlay caches detectNodeIPs for the runs (a dump of every route,
	// each pod's included, and of addresses), invalidated by the address
	// and default route watches.
	underlay *node.AddrCache

	mesh *clustermode.Mesh // the etcd source; nil in standalone mode
	kube *kube.Source      // the API server's source; nil outside Kubernetes mode

	// Reconcilers, set in Run before the first reconcile.
	dp     datapath.Datapath
	maps   *datapath.Reconciler
	routes routes.Router          // cluster mode only
	enc    *encryption.WireGuard  // nil without encryption
	bigtcp *bigtcp.Reconciler     // GSO/GRO sizes of the node's devices and pod veths
	bgp    *bgp.Reconciler        // the BGP speaker, from the BGPPeeringPolicy selecting the node
	ns     *northsouth.Reconciler // the way in from outside: external devices, SNAT
	l2     *l2.Manager            // ARP/NDP answers for the service addresses this node leads
	// The applied objects split by kind, at objects generation splitGen
	// (reconcile loop only); the services only when asked for
	// (splitServices): the datapath and BGP take the changed ones from
	// the objects.
	splitSvcs  []objects.Service
	splitSvcOK bool
	splitPols  []objects.NetworkPolicy
	splitL2    []objects.L2AnnouncementPolicy
	splitGen   uint64
	// rec is the datapath loop (reconcile), which API calls wait for;
	// follow the follow-up loop (followUp), requested after every
	// datapath run with the snapshot that run converged to (followIn):
	// later steps read those objects rather than the source again, which
	// may have moved on and would build another snapshot of every object.
	rec      *reconcile.Trigger
	follow   *reconcile.Trigger
	followMu sync.Mutex
	followIn *followUpInput
	// beforeFollowUp, when set (tests), runs at the start of every
	// follow-up run.
	beforeFollowUp func()
	metrics        *metrics.Registry // set at the start of Run
}

// New validates cfg and loads the desired state from cfg.StateDir. It
// touches nothing in the kernel; Run does.
func New(cfg Config) (*Agent, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	log := slog.Default().With("node", cfg.NodeName)
	store, err := state.Open(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	pool, err := ipam.New(filepath.Join(cfg.StateDir, "ipam.json"), cfg.PodCIDRs...)
	if errors.Is(err, ipam.ErrOutsideCIDRs) && pool != nil {
		// Endpoints keep their addresses until deleted; new ones come from
		// the new CIDRs.
		log.Warn("pod CIDRs changed: existing endpoints keep addresses outside them", "err", err)
	} else if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: log, store: store, ipam: pool,
		plumb: localapi.NetlinkPlumber{},
		openDatapath: func(c Config) (datapath.Datapath, error) {
			return datapath.Open(c.BPFFSRoot, c.PinDir(), c.ResetDatapath, c.EndpointAttach)
		},
		nodeAddrs:     node.Addrs,
		newRouter:     routes.NewNetlink,
		detectNodeIPs: node.DefaultRouteAddrs,
		rec:           reconcile.New(),
		follow:        reconcile.New(),
		bgp:           bgp.New(log),
	}
	a.hostAddrs = node.NewAddrCache(func() ([]netip.Addr, error) { return a.nodeAddrs() }, reconcile.ResyncInterval)
	a.underlay = node.NewAddrCache(func() ([]netip.Addr, error) { return a.detectNodeIPs() }, reconcile.ResyncInterval)
	if cfg.ClusterMode() {
		// Identities are global: allocated in the cluster's etcd.
		a.mesh = clustermode.New(clustermode.Config{
			Local:     meshsync.Local{Cluster: cfg.ClusterName, ClusterID: cfg.ClusterID, Node: cfg.NodeName},
			Endpoints: cfg.KVStoreEndpoints, Bundle: cfg.KVStoreBundle, NodeIPs: cfg.NodeIPs, PodCIDRs: cfg.PodCIDRs,
			MaxRemoteIPCache: cfg.MaxRemoteIPCache,
			LeaseTTL:         cfg.LeaseTTL, Log: log, Store: store, Lock: &a.mu,
			Request:       func() { a.rec.Request() },
			Converge:      func(ctx context.Context) error { return a.rec.Converge(ctx) },
			Objects:       a.objects,
			WireGuard:     func() (string, int) { return a.enc.Publication() },
			DetectNodeIPs: func() ([]netip.Addr, error) { return a.detectNodeIPs() },
			Workload:      cfg.workload(),
		})
		a.ids = a.mesh.Identities()
	} else {
		ids, err := identity.NewLocal(filepath.Join(cfg.StateDir, "identities.json"), cfg.ClusterID)
		if err != nil {
			return nil, err
		}
		a.ids = ids
	}
	if cfg.Kube != nil {
		a.kube = cfg.Kube
		if a.cfg.LabelsFor == nil {
			a.cfg.LabelsFor = a.kube.LabelsFor
		}
		a.kube.OnChange(func() { a.rec.Request() })
		if err := a.kube.Load(); err != nil {
			return nil, err
		}
	}
	objs, err := desired.LoadObjects(store)
	if err != nil {
		return nil, err
	}
	if objs, err = a.loadLBIPAM(objs); err != nil {
		return nil, err
	}
	a.objSet.Set(objs)
	return a, nil
}

// loadLBIPAM fills LB-IPAM's stored assignments into the loaded objects.
// Standalone, the agent is LB-IPAM: it allocates again from what it
// stored (the same addresses; new ones only for what the file lacks) and
// stores the result. In cluster mode the file is the copy of the last
// assignments read from etcd, used until etcd is read again.
func (a *Agent) loadLBIPAM(objs desired.Objects) (desired.Objects, error) {
	recs, err := a.store.LBAssignments()
	if err != nil {
		return nil, err
	}
	prev := lbipam.FromRecords(recs)
	if a.mesh != nil || a.kube != nil {
		return desired.WithLBStatus(objs, prev), nil
	}
	objs, next := desired.AllocateLB(objs, prev)
	if !lbipam.Equal(prev, next) {
		if err := a.store.SaveLBAssignments(lbipam.ToRecords(next)); err != nil {
			return nil, err
		}
	}
	return objs, nil
}

// Run brings the node to its desired state and serves the API until ctx
// ends. On return the programs stay attached and the maps stay pinned, so
// pods keep their traffic while no agent runs.
func (a *Agent) Run(ctx context.Context) error {
	a.started = time.Now()
	// Claim the socket first: a second agent for the same node must not
	// touch the datapath this one owns.
	ln, err := api.Listen(a.cfg.SocketPath)
	if err != nil {
		return err
	}
	defer ln.Close()
	a.metrics = metrics.New(a.metricsSources())
	ms, err := a.metrics.Listen(a.cfg.MetricsAddr)
	if err != nil {
		return err
	}
	defer ms.Close()

	// The reconcilers.
	if err := a.plumb.PrepareNode(); err != nil {
		return err
	}
	if a.cfg.ResetDatapath {
		// A deliberate start over: the SNAT table goes with the pins.
		if err := northsouth.RemoveTable(a.cfg.NodeName); err != nil {
			return err
		}
	}
	dp, err := a.openDatapath(a.cfg)
	if err != nil {
		return err
	}
	defer dp.Close()
	a.dp, a.maps = dp, datapath.NewReconciler(dp)
	a.ns = northsouth.New(northsouth.Config{Node: a.cfg.NodeName, Devices: a.cfg.ExternalDevices, Log: a.log}, dp)
	a.maps.OnBackgroundWork(func() { a.rec.Request() })
	a.log.Info("datapath loaded", "pinDir", a.cfg.PinDir())
	if a.mesh != nil {
		r, err := a.newRouter()
		if err != nil {
			return err
		}
		a.routes = routes.NewShadowed(r, reconcile.ResyncInterval)
	}
	a.enc, a.cfg.MTU, err = encryption.Setup(encryption.Config{
		Cluster: a.cfg.ClusterName, Node: a.cfg.NodeName, Device: a.cfg.WireGuardDevice, Port: a.cfg.WireGuardPort,
		NodeEncryption: a.cfg.NodeEncryption, StateDir: a.cfg.StateDir, Log: a.log, Daemon: a.cfg.WireGuardDaemon,
		// The mesh detects the node IPs later the same way; the MTU needs
		// them now (an IPv6-only underlay costs 20 bytes more).
		Underlay: func() (int, bool) { return node.UnderlayMTU(a.underlayIPs()) },
	}, a.cfg.encrypted(), a.mesh != nil, a.cfg.MTU)
	if err != nil {
		return err
	}
	defer a.enc.Close()
	if err := a.plumbWorkload(); err != nil {
		return err
	}
	if a.bigtcp, err = bigtcp.New(a.cfg.BigTCP, a.log); err != nil {
		return err
	}
	a.l2 = l2.New(a.l2Config())

	// The local source, which also repairs what a crash left.
	local := localapi.New(localapi.Config{
		Node: a.cfg.NodeName, Cluster: a.cfg.ClusterName, ClusterID: a.cfg.ClusterID, MTU: a.cfg.MTU, Started: a.started, Log: a.log,
		Lock: &a.mu, Store: a.store, IPAM: a.ipam, Identities: a.ids, LocalObjects: &a.objSet, Objects: a.objects,
		Datapath: dp, Plumb: a.plumb, Reconcile: a.rec, Mesh: a.mesh, WireGuard: a.enc, BigTCP: a.bigtcp,
		IPCache:   func() (int, int) { return a.maps.IPCacheEntries(), a.maps.IPCacheOverflow() },
		LabelsFor: a.cfg.LabelsFor, Kubernetes: a.kubeStatus(), BGP: a.bgp.Status, NorthSouth: a.northSouthStatus, L2: a.l2.Status,
		ObserveAdd: a.metrics.ObserveEndpointAdd,
	})
	local.RestoreEndpoints(ctx)
	local.CollectGarbage(ctx)
	gen := a.rec.Start()
	err = a.reconcile(ctx)
	a.rec.Finish(gen, err)
	if err != nil {
		// Keep going: the loop retries, and the API can still report why.
		a.log.Error("initial reconcile failed", "err", err)
	}
	gen = a.follow.Start()
	a.follow.Finish(gen, a.followUp(ctx))

	if a.cfg.CNI.Enabled() {
		// Once the node is restored and its datapath loaded: a runtime
		// that finds the conflist sends ADDs right away (they wait in the
		// socket's backlog for the server, which starts next).
		c := a.cfg.CNI
		c.MTU = a.cfg.MTU
		if c.Socket, err = filepath.Abs(a.cfg.SocketPath); err != nil { // the plugin runs elsewhere
			return err
		}
		wrote, err := cniinstall.Install(c)
		if err != nil {
			return err
		}
		a.log.Info("CNI plugin installed", "files", wrote)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	wg.Go(func() { a.rec.Loop(ctx, a.log, a.reconcile) })
	wg.Go(func() { a.follow.Loop(ctx, a.log, a.followUp) })
	wg.Go(func() {
		node.WatchAddrs(ctx, a.log, func() {
			a.hostAddrs.Invalidate()
			a.underlay.Invalidate()
			a.rec.Request()
		})
	})
	if len(a.cfg.NodeIPs) == 0 {
		wg.Go(func() {
			node.WatchDefaultRoutes(ctx, a.log, func() {
				a.underlay.Invalidate()
				a.rec.Request()
			})
		})
	}
	wg.Go(func() { ms.Serve(ctx, a.log) })
	wg.Go(func() { a.l2.Run(ctx) })
	if a.kube != nil {
		wg.Go(func() {
			if err := a.kube.Run(ctx); err != nil && ctx.Err() == nil {
				cancel(fmt.Errorf("kubernetes: %w", err))
			}
		})
		relabel := make(chan struct{}, 1)
		var pendingMu sync.Mutex
		pending := map[string]bool{}
		a.kube.OnPodLabels(func(namespace, name string) {
			pendingMu.Lock()
			pending[namespace+"/"+name] = true
			pendingMu.Unlock()
			select {
			case relabel <- struct{}{}:
			default:
			}
		})
		wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-relabel:
				}
				pendingMu.Lock()
				keys := slices.Sorted(maps.Keys(pending))
				clear(pending)
				pendingMu.Unlock()
				for _, k := range keys {
					if e, ok := a.store.Endpoint(splitKey(k)); ok {
						a.relabelFromPod(ctx, local, e)
					}
				}
			}
		})
		wg.Go(func() { a.collectGonePods(ctx, local) })
	}
	if w := a.cfg.ExternalWorkload; w != nil && w.Background != nil {
		wg.Go(func() { w.Background(ctx) })
	}
	if a.mesh != nil {
		// etcd is one more source of desired state; the datapath already
		// serves from local state while it connects.
		wg.Go(func() {
			if err := a.mesh.Run(ctx, a.metrics.KV()); err != nil {
				cancel(fmt.Errorf("cluster mode: %w", err))
			}
		})
	}

	a.log.Info("agent ready", "socket", a.cfg.SocketPath, "cluster", a.cfg.ClusterName, "podCIDRs", a.cfg.PodCIDRs,
		"endpoints", len(a.store.Endpoints()), "attachMode", dp.AttachMode(), "clusterMode", a.cfg.ClusterMode())
	err = api.NewServer(local, a.log).WithHealth(a.metrics.Handler(), a.metrics.NotReady).Serve(ctx, ln)
	stopErr := context.Cause(ctx)
	cancel(nil)
	wg.Wait()
	// Leaving is not withdrawing: the peers keep the node's routes for
	// their graceful restart time, as the datapath keeps forwarding.
	a.bgp.Detach(context.Background())
	if stopErr != nil && !errors.Is(stopErr, context.Canceled) {
		// A failure, not a stop: the datapath stays, the agent does not.
		return stopErr
	}
	a.log.Info("agent stopped; datapath stays pinned and attached")
	return err
}

// collectGonePods removes the endpoints of pods that no longer exist on
// this node once the pod informer has listed, and then every resync
// interval: a pod deleted while the agent was down got no CNI DEL. Only
// endpoints made through CNI (with a container ID) are candidates; a pod
// that exists under the same name with another UID was recreated, so its
// old endpoint goes too (the CNI ADD of the new one replaces it anyway).
func (a *Agent) collectGonePods(ctx context.Context, local *localapi.Handlers) {
	for !a.kube.Synced() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	for {
		pods := map[string]string{}
		for _, p := range a.kube.Pods() {
			pods[p.Namespace+"/"+p.Name] = p.UID
		}
		for _, e := range a.store.Endpoints() {
			if e.ContainerID == "" {
				continue
			}
			uid, ok := pods[e.Key()]
			if ok && (e.PodUID == "" || e.PodUID == uid) {
				// Labels changed while the agent was down, or an update
				// was missed: the resync catches them.
				a.relabelFromPod(ctx, local, e)
				continue
			}
			a.log.Info("removing the endpoint of a pod that is gone", "endpoint", e.Key(), "containerID", e.ContainerID)
			if err := local.DeleteEndpointOf(ctx, e.Namespace, e.Name, e.ContainerID); err != nil {
				a.log.Warn("cannot remove the endpoint of a gone pod; retrying later", "endpoint", e.Key(), "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(reconcile.ResyncInterval):
		}
	}
}

// kubeStatus is the Kubernetes source's status function, nil outside
// Kubernetes mode.
func (a *Agent) kubeStatus() func() *api.KubernetesStatus {
	if a.kube == nil {
		return nil
	}
	return a.kube.Status
}

// relabelFromPod gives a CNI endpoint the current identity labels of its
// pod (pod and namespace labels changed while it runs).
func (a *Agent) relabelFromPod(ctx context.Context, local *localapi.Handlers, e state.Endpoint) {
	if e.ContainerID == "" {
		return
	}
	lctx, cancel := context.WithTimeout(ctx, time.Second)
	labels, err := a.kube.LabelsFor(lctx, e.Namespace, e.Name, e.PodUID)
	cancel()
	if err != nil {
		return // gone: collectGonePods removes it
	}
	if err := local.RelabelEndpoint(ctx, e.Namespace, e.Name, labels); err != nil {
		a.log.Warn("cannot give an endpoint its pod's new labels; retrying at the next resync", "endpoint", e.Key(), "err", err)
	}
}

func splitKey(k string) (namespace, name string) {
	namespace, name, _ = strings.Cut(k, "/")
	return namespace, name
}

// reconcile is one run of the datapath loop: the BPF maps (ipcache,
// endpoints, policy, services) over one snapshot of the desired state.
// That is what enforces an endpoint's identity and policy, so API calls
// wait for it (Converge) and a failure here fails them. The steps that
// enforce nothing an API call waits for (routes, tunnels, L2, device
// sizes, BGP, north-south) run after it in their own loop (followUp), so
// that a slow one (device sizes enter every new pod's netns) never delays
// the next datapath run: adds of pods created together would queue behind
// it.
func (a *Agent) reconcile(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	want, objs, l2pols, err := a.desiredState()
	if err != nil {
		return err
	}
	res, err := a.maps.Sync(want)
	if err != nil {
		return err
	}
	if res.Overflow > 0 {
		a.log.Error("BPF ipcache full: mesh entries left out (their pods are \"world\" to this node); cap the remote clusters' entries (--max-remote-ipcache)",
			"leftOut", res.Overflow, "capacity", bpf.IPCacheMaxEntries, "reservedForNode", datapath.IPCacheReserve)
	}
	if res.Changes() > 0 {
		a.log.Info("datapath reconciled", "ipcacheChanges", res.IPCache, "endpointChanges", res.Endpoints,
			"policyChanges", res.Policy, "serviceChanges", res.Services, "errors", len(res.Errs))
	}
	// The follow-up steps converge to what the datapath now serves. The
	// services are split here (this loop owns the split) and only for
	// what needs them all: L2 policies to select from, an external
	// workload's routes to the service addresses. Splitting costs every
	// service.
	var svcs []objects.Service
	if len(l2pols) > 0 || a.cfg.ExternalWorkload != nil {
		svcs = a.splitServices(objs)
	}
	a.followMu.Lock()
	a.followIn = &followUpInput{want: want, objs: objs, l2: l2pols, services: svcs}
	a.followMu.Unlock()
	a.follow.Request()
	return oneline.Join(res.Errs...)
}

// followUpInput is what a datapath run hands the follow-up loop: the
// snapshot it converged the maps to.
type followUpInput struct {
	want     desired.State
	objs     desired.Objects
	l2       []objects.L2AnnouncementPolicy
	services []objects.Service // split only when l2 or an external workload needs them
}

// followUp is one run of the follow-up loop, over the snapshot of the
// latest datapath run. Routes and tunnels that cannot be made concern
// traffic to some nodes only: they are reported in the status and retried
// soon (SoftFail); nothing here fails an API call.
func (a *Agent) followUp(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	a.followMu.Lock()
	in := a.followIn
	a.followMu.Unlock()
	if in == nil {
		return nil // no datapath run yet
	}
	if a.beforeFollowUp != nil {
		a.beforeFollowUp()
	}
	want := in.want
	routeChanges := 0
	if a.routes != nil {
		n, err := a.routes.SyncRoutes(want.Mesh.PodRoutes(), want.Mesh.Ready)
		routeChanges += n
		a.mesh.SetRouteErr(err)
		if err != nil {
			a.follow.SoftFail()
		}
	}
	if a.enc != nil {
		if a.cfg.ExternalWorkload != nil {
			a.enc.SetServiceRoutes(serviceVIPs(in.services))
		}
		n, err := a.enc.Sync(want.Mesh)
		routeChanges += n
		if err != nil {
			a.follow.SoftFail()
			a.log.Warn("wireguard: peers or tunnel routes incomplete; retrying", "err", err)
		}
	}
	// L2 announcements elect and answer on their own clock (a dead peer
	// must be noticed within a second, not at the next run); a run only
	// hands them the policies, services and local backends.
	a.l2.SetInput(l2.Input{Policies: in.l2, Services: in.services, HasLocalBackend: localBackend(want.Endpoints)})
	// Device sizes: a device that refuses is rolled back and reported,
	// which fails nothing else. The reconciler does only what changed.
	if err := a.bigtcp.Sync(a.bigTCPInput(want)); err != nil {
		a.follow.SoftFail()
		a.log.Warn("big tcp: devices not all read; retrying", "err", err)
	}
	// BGP announces what the datapath now serves; a peer or path that
	// cannot be set up concerns BGP only.
	if err := a.bgp.Sync(ctx, a.bgpInput(want, in.objs), want.ObjectsGen, want.EndpointsGen); err != nil {
		a.follow.SoftFail()
		a.log.Warn("bgp: speaker not converged; retrying", "err", err)
	}
	// The way in from outside: programs on the external devices, and the
	// SNAT table while a frontend under Cluster needs it. A device that
	// refuses concerns traffic from outside only.
	if err := a.ns.Sync(a.northSouthInput(want)); err != nil {
		a.follow.SoftFail()
		a.log.Warn("north-south: external devices or SNAT table incomplete; retrying", "err", err)
	}
	if routeChanges > 0 {
		a.log.Info("routes reconciled", "routeChanges", routeChanges)
	}
	return nil
}

// desiredState is what one reconcile run converges to, with the objects
// it was built from and their L2 announcement policies.
func (a *Agent) desiredState() (desired.State, desired.Objects, []objects.L2AnnouncementPolicy, error) {
	objs, objGen := a.objectsGen()
	changed := a.objectsChangedSince(objGen)
	if objGen != a.splitGen || a.splitGen == 0 {
		// The policies are sorted out again when one changed, once per
		// generation; the services are not split at all (splitServices).
		var keys []string
		known := false
		if changed != nil && a.splitGen != 0 {
			keys, known = changed(a.splitGen)
		}
		if !known || slices.ContainsFunc(keys, func(k string) bool {
			return strings.HasPrefix(k, objects.KindNetworkPolicy+"/") || strings.HasPrefix(k, objects.KindL2AnnouncementPolicy+"/")
		}) {
			a.splitPols = objs.Policies()
			a.splitL2 = objs.L2Policies()
		}
		a.splitSvcs, a.splitSvcOK = nil, false
		a.splitGen = objGen
	}
	// The identities' version before the endpoints: an identity allocated
	// in between makes the next run look at every endpoint again, which
	// is safe; the other order could miss it.
	idGen := a.identitiesGen()
	eps, epGen := a.store.EndpointsGen()
	s := desired.State{Cluster: a.cfg.ClusterName, Endpoints: eps, Policies: a.splitPols,
		Objects: objs, ObjectsChangedSince: changed,
		Identities: a.ids, IdentitiesGen: idGen, Mesh: a.mesh.Desired(), EndpointsGen: epGen + 1, ObjectsGen: objGen,
		EndpointsChangedSince: a.endpointsChangedSince(epGen),
		AllowLocalHostIngress: a.cfg.Kubernetes}
	addrs, err := a.hostAddrs.Get()
	if err != nil {
		return s, objs, a.splitL2, fmt.Errorf("list node addresses: %w", err)
	}
	s.HostAddrs = addrs
	s.Workload = a.workloadEndpoint()
	return s, objs, a.splitL2, nil
}

// endpointsChangedSince is desired.State.EndpointsChangedSince for the
// store's endpoints at generation current (the state's generations are
// the store's plus one: 0 means unknown).
func (a *Agent) endpointsChangedSince(current uint64) func(since uint64) ([]string, bool) {
	return func(since uint64) ([]string, bool) {
		if since == 0 {
			return nil, false
		}
		return a.store.EndpointsChangedSince(since-1, current)
	}
}

// identitiesGen is desired.State.IdentitiesGen: the allocator's version
// where it has one (the node-local allocator's); 0 otherwise.
func (a *Agent) identitiesGen() uint64 {
	if v, ok := a.ids.(interface{ Version() uint64 }); ok {
		return v.Version()
	}
	return 0
}

// splitServices are the services of the run's objects, in key order,
// split once per generation when asked for (reconcile loop only).
func (a *Agent) splitServices(objs desired.Objects) []objects.Service {
	if !a.splitSvcOK {
		a.splitSvcs, _ = objs.Split()
		a.splitSvcOK = true
	}
	return a.splitSvcs
}

// objects are the applied objects: in cluster mode etcd's once it was
// listed; until then the objects persisted by the last run keep the
// datapath as it was.
func (a *Agent) objects() desired.Objects {
	objs, _ := a.objectsGen()
	return objs
}

// objectsGen is objects with a generation that tells the two sources
// apart (odd: etcd's, even: the local table's).
func (a *Agent) objectsGen() (desired.Objects, uint64) {
	if a.kube != nil {
		// Kubernetes mode: the API server's objects (the last synced
		// ones, persisted, until the informers have listed).
		objs, gen := a.kube.Objects()
		return objs, 2*gen + 1
	}
	if objs, gen, ok := a.mesh.ObjectsGen(); ok {
		return objs, 2*gen + 1
	}
	objs, gen := a.objSet.GetGen()
	return objs, 2*gen + 2
}

// l2Config configures L2 announcements: in cluster mode leadership comes
// from the cluster's etcd (a lease per node) and heartbeats between the
// nodes; standalone, this node leads what its policies select.
func (a *Agent) l2Config() l2.Config {
	c := l2.Config{Node: a.cfg.NodeName, Cluster: a.cfg.ClusterName, NodeLabels: a.cfg.NodeLabels, Log: a.log,
		HeartbeatPort: a.cfg.L2.HeartbeatPort, LeaseTTL: a.cfg.L2.LeaseTTL}
	c.Announce.Refresh = a.cfg.L2.Refresh
	if a.mesh != nil {
		c.KV = a.mesh.KV
		c.NodeIPs = a.mesh.NodeIPs
	}
	return c
}

// localBackend reports whether a service has a ready backend among this
// node's endpoints: one its selector picks in its namespace, or one whose
// address is an explicit backend (Kubernetes mode lists ready pods so).
func localBackend(eps []state.Endpoint) func(objects.Service) bool {
	return func(svc objects.Service) bool {
		explicit := map[string]bool{}
		for _, b := range svc.Spec.Backends {
			explicit[b.IP] = true
		}
		for _, e := range eps {
			if len(svc.Spec.Selector) > 0 && e.Namespace == svc.Metadata.Namespace && e.Labels.Has(svc.Spec.Selector) {
				return true
			}
			for _, ip := range e.IPs {
				if explicit[ip.String()] {
					return true
				}
			}
		}
		return false
	}
}

// bigTCPInput is what the BIG TCP reconciler converges in one run.
func (a *Agent) bigTCPInput(want desired.State) bigtcp.Input {
	in := bigtcp.Input{Endpoints: want.Endpoints, EndpointsGen: want.EndpointsGen, EndpointsChangedSince: want.EndpointsChangedSince, NodeAddrs: want.HostAddrs}
	if a.mesh != nil {
		in.NodeIPs = a.underlayIPs()
	}
	if a.enc != nil {
		in.WireGuard = a.cfg.WireGuardDevice
		if in.WireGuard == "" {
			in.WireGuard = DefaultWireGuardDevice(a.cfg.ClusterName, a.cfg.NodeName)
		}
	}
	return in
}

// bgpInput is what the BGP speaker's configuration is derived from.
func (a *Agent) bgpInput(want desired.State, objs desired.Objects) bgp.Input {
	ips := a.underlayIPs()
	if len(ips) == 0 {
		ips = want.HostAddrs
	}
	return bgp.Input{Objects: objs, Endpoints: want.Endpoints, NodeLabels: a.cfg.NodeLabels,
		PodCIDRs: a.cfg.PodCIDRs, NodeIPs: ips, ChangedSince: a.objectsChangedSince(want.ObjectsGen)}
}

// objectsChangedSince returns what tells the keys of the objects changed
// between an earlier generation (objectsGen's) and current, where the
// source knows (cluster mode: etcd's tables); nil otherwise.
func (a *Agent) objectsChangedSince(current uint64) func(since uint64) ([]string, bool) {
	if a.kube != nil || a.mesh == nil || current%2 == 0 {
		return nil
	}
	return func(since uint64) ([]string, bool) {
		if since%2 == 0 {
			return nil, false // the local table's generation
		}
		return a.mesh.ObjectsChangedSince((since-1)/2, (current-1)/2)
	}
}

// northSouthInput is what the north-south reconciler converges in one run.
func (a *Agent) northSouthInput(want desired.State) northsouth.Input {
	in := northsouth.Input{NodeAddrs: want.HostAddrs, SNAT: a.maps.ExternalCounts().Cluster > 0}
	if a.mesh != nil {
		in.NodeIPs = a.underlayIPs()
	}
	return in
}

// northSouthStatus is the north-south status with the datapath's counts.
func (a *Agent) northSouthStatus() *api.NorthSouthStatus {
	st := a.ns.Status()
	if st == nil {
		return nil
	}
	c := a.maps.ExternalCounts()
	st.FrontendsCluster, st.FrontendsLocal, st.Addresses = c.Cluster, c.Local, c.Addresses
	return st
}

// underlayIPs are the node's underlay addresses: --node-ip, or else those
// the mesh would detect (the default route's interface's).
func (a *Agent) underlayIPs() []netip.Addr {
	if len(a.cfg.NodeIPs) > 0 {
		return a.cfg.NodeIPs
	}
	ips, _ := a.underlay.Get()
	return ips
}

// metricsSources are what /metrics reads at scrape time.
func (a *Agent) metricsSources() metrics.Sources {
	return metrics.Sources{
		Node: a.cfg.NodeName, Cluster: a.cfg.ClusterName, ClusterID: a.cfg.ClusterID, ClusterMode: a.cfg.ClusterMode(), Log: a.log,
		Datapath: func() datapath.Datapath { return a.dp },
		Desired: func() metrics.Counts {
			svcs, pols := a.objects().Split()
			return metrics.Counts{Endpoints: len(a.store.Endpoints()), Identities: len(a.ids.List()), Services: len(svcs), Policies: len(pols)}
		},
		Reconcile:       a.rec.Stats,
		FollowUp:        a.follow.Stats,
		IPCacheEntries:  func() int { return a.maps.IPCacheEntries() },
		IPCacheOverflow: func() int { return a.maps.IPCacheOverflow() },
		IPCacheDrift:    func() int { return a.maps.IPCacheDrift() },
		ClusterMesh:     a.mesh.Status,
		WireGuard:       func() *api.WireGuardStatus { return a.enc.Status() },
		BigTCP:          func() *api.BigTCPStatus { return a.bigtcp.Status() },
		NorthSouth:      func() *api.NorthSouthStatus { return a.northSouthStatus() },
		Kubernetes:      a.kubeStatus(),
		BGP:             func() *api.BGPStatus { return a.bgp.Status(context.Background(), false) },
		L2:              func() *api.L2Status { return a.l2.Status() },
	}
}
