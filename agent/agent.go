// Package agent is the Isthmus node agent: it turns what users ask for on the
// local API (endpoints, Services, NetworkPolicies) into veths, routes and
// eBPF map entries on one node.
//
// Data flows one way:
//
//	local API (agent/api)                      cluster's etcd (cluster mode only)
//	   │  validate, allocate (ipam,               │  meshsync.Watch: nodes, ipcache,
//	   │  identity), plumb the pod                │  identities, services, applied
//	   │  (agent/endpoint)                        │  objects; remote clusters once synced
//	   ▼                                          ▼
//	desired state (agent/state, on disk       meshsync.Tables (typed, validated)
//	before anything else changes)                 │
//	   │  trigger (coalescing)  ◀─────────────────┘
//	   ▼
//	reconciler (reconcile.go), the only writer of the maps:
//	   identities ─▶ ipcache   every endpoint IP (of the mesh), nodes, the world
//	   policy.Compile ─▶ endpoints map (enforcement flags) and policy map
//	   service.Resolve (+ service.Merge) ─▶ services and backends maps
//	   routes to other nodes' pod CIDRs (cluster mode)
//
// In cluster mode (clustermesh.go) the node also publishes its node record
// and endpoints to etcd (meshsync.Publisher), allocates identities there
// (identity.NewEtcd), and apply/get/delete act on the cluster's etcd.
//
// Reconcile compares the desired state with what the pinned maps hold and
// writes only the difference, so a restarted agent, which finds its maps and
// program links pinned in bpffs, changes nothing that is already right: no
// flush, no gap in traffic.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/encryption"
	"github.com/isthmus-mesh/isthmus/agent/ipam"
	"github.com/isthmus-mesh/isthmus/agent/localapi"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/metrics"
	"github.com/isthmus-mesh/isthmus/agent/node"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// RouteProtocol marks the routes the agent installs ("proto 73").
const RouteProtocol = routes.Protocol

// DefaultMetricsAddr is where isthmus-agent serves /metrics, /healthz and
// /readyz over TCP unless told otherwise.
const DefaultMetricsAddr = metrics.DefaultAddr

// DefaultLeaseTTL is the default TTL of a node's records in etcd.
const DefaultLeaseTTL = clustermode.DefaultLeaseTTL

// Config is the node's configuration.
type Config struct {
	NodeName    string
	ClusterName string
	ClusterID   uint32
	PodCIDRs    []netip.Prefix // at most one IPv4 and one IPv6
	StateDir    string         // endpoints, objects, IPAM and identity state
	SocketPath  string         // local API
	BPFFSRoot   string         // maps and links are pinned in <BPFFSRoot>/isthmus/<NodeName>
	MTU         int            // of pod veths; 0: the underlay's, minus WireGuard's overhead when encrypting
	// ResetDatapath removes this node's pinned maps and links before loading
	// the datapath: every flow and every program attachment starts over.
	ResetDatapath bool
	// MetricsAddr is host:port for GET /metrics, /healthz and /readyz over
	// plain HTTP (agent/metrics); "" turns that listener off. The API socket
	// serves the same paths regardless.
	MetricsAddr string

	// Cluster mode: on when KVStoreEndpoints is set (see clustermesh.go).
	KVStoreEndpoints []string      // etcd client URLs of the cluster's server
	KVStoreBundle    string        // directory with ca.crt, client.crt, client.key
	NodeIPs          []netip.Addr  // underlay; default: the default route's interface's
	LeaseTTL         time.Duration // of the node's records; default 60s

	// Transparent encryption (wireguard.go), cluster mode only.
	Encryption      string // EncryptionNone ("" too) or EncryptionWireGuard
	NodeEncryption  bool   // encrypt node-to-node traffic too
	WireGuardPort   int    // UDP port; 0 means 51871
	WireGuardDevice string // device name, unique on the host; "" derives one
}

// ClusterMode reports whether the agent works with its cluster's etcd.
func (c Config) ClusterMode() bool { return len(c.KVStoreEndpoints) > 0 }

// PinDir is where the node's datapath is pinned.
func (c Config) PinDir() string {
	return filepath.Join(c.BPFFSRoot, "isthmus", c.NodeName)
}

func (c Config) validate() error {
	var errs []error
	if !desired.DNSLabel(c.NodeName) {
		errs = append(errs, fmt.Errorf("node name %q must be a DNS label (lower-case letters, digits and '-', at most 63)", c.NodeName))
	}
	if !desired.DNSLabel(c.ClusterName) || len(c.ClusterName) > records.MaxClusterNameLen {
		errs = append(errs, fmt.Errorf("cluster name %q must be a DNS label of at most %d characters (lower-case letters, digits and '-')", c.ClusterName, records.MaxClusterNameLen))
	}
	if c.ClusterID < 1 || c.ClusterID > identity.MaxClusterID {
		errs = append(errs, fmt.Errorf("cluster ID %d out of range 1-%d", c.ClusterID, identity.MaxClusterID))
	}
	if len(c.PodCIDRs) == 0 {
		errs = append(errs, errors.New("no pod CIDR configured (one IPv4 and/or one IPv6 CIDR)"))
	}
	if c.StateDir == "" || c.SocketPath == "" || c.BPFFSRoot == "" {
		errs = append(errs, errors.New("state dir, socket path and bpffs root are required"))
	}
	if c.MTU != 0 && (c.MTU < 1280 || c.MTU > 65535) {
		errs = append(errs, fmt.Errorf("MTU %d out of range 1280-65535 (IPv6 needs at least 1280)", c.MTU))
	}
	errs = append(errs, encryption.Validate(c.Encryption, c.NodeEncryption, c.ClusterMode(), c.WireGuardPort)...)
	if c.ClusterMode() {
		errs = append(errs, clustermode.Validate(c.KVStoreEndpoints, c.KVStoreBundle, c.NodeIPs, c.LeaseTTL)...)
	} else if c.KVStoreBundle != "" || len(c.NodeIPs) > 0 {
		errs = append(errs, errors.New("--kvstore-bundle and --node-ip need --kvstore-endpoints (cluster mode)"))
	}
	return errors.Join(errs...)
}

// Agent runs one node.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	started time.Time

	// Desired state and the allocators behind it.
	store *state.Store
	ipam  *ipam.IPAM
	ids   identity.Allocator

	// mu serialises API mutations (endpoint add/delete, apply, delete): each
	// sees the state the previous one left and waits for the datapath to
	// take it before the next one starts. The reconciler never takes it.
	mu     sync.Mutex
	objSet desired.ObjectTable // decoded applied objects, see objects.go

	dp   datapath.Datapath    // set in Run, before the API serves
	maps *datapath.Reconciler // of dp's maps

	// Kernel-facing steps, replaceable in tests.
	plumb         localapi.Plumber
	openDatapath  func(Config) (datapath.Datapath, error)
	nodeAddrs     func() ([]netip.Addr, error)
	newRouter     func() (routes.Router, error)
	detectNodeIPs func() ([]netip.Addr, error)

	// Cluster mode only (nil in standalone mode): the etcd source of
	// desired state (clustermesh.go), and the routes to other nodes.
	mesh   *clustermode.Mesh
	routes routes.Router
	// enc is the WireGuard device (nil without encryption), set in Run
	// before the first reconcile.
	enc *encryption.WireGuard

	rec     *reconcile.Trigger
	metrics *metrics.Registry // set at the start of Run
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
		cfg:   cfg,
		log:   log,
		store: store,
		ipam:  pool,
		plumb: localapi.NetlinkPlumber{},
		openDatapath: func(c Config) (datapath.Datapath, error) {
			return datapath.Open(c.BPFFSRoot, c.PinDir(), c.ResetDatapath)
		},
		nodeAddrs:     node.Addrs,
		newRouter:     routes.NewNetlink,
		detectNodeIPs: node.DefaultRouteAddrs,
		rec:           reconcile.New(),
	}
	if cfg.ClusterMode() {
		// Identities are global: allocated in the cluster's etcd.
		a.mesh = clustermode.New(clustermode.Config{
			Local:     meshsync.Local{Cluster: cfg.ClusterName, ClusterID: cfg.ClusterID, Node: cfg.NodeName},
			Endpoints: cfg.KVStoreEndpoints, Bundle: cfg.KVStoreBundle, NodeIPs: cfg.NodeIPs, PodCIDRs: cfg.PodCIDRs,
			LeaseTTL: cfg.LeaseTTL, Log: log, Store: store, Lock: &a.mu,
			Request:       func() { a.rec.Request() },
			Converge:      func(ctx context.Context) error { return a.rec.Converge(ctx) },
			Objects:       a.objects,
			WireGuard:     func() (string, int) { return a.enc.Publication() },
			DetectNodeIPs: func() ([]netip.Addr, error) { return a.detectNodeIPs() },
		})
		a.ids = a.mesh.Identities()
	} else {
		ids, err := identity.NewLocal(filepath.Join(cfg.StateDir, "identities.json"), cfg.ClusterID)
		if err != nil {
			return nil, err
		}
		a.ids = ids
	}
	objs, err := desired.LoadObjects(store)
	if err != nil {
		return nil, err
	}
	a.objSet.Set(objs)
	return a, nil
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

	if err := a.plumb.PrepareNode(); err != nil {
		return err
	}
	dp, err := a.openDatapath(a.cfg)
	if err != nil {
		return err
	}
	defer dp.Close()
	a.dp, a.maps = dp, datapath.NewReconciler(dp)
	a.log.Info("datapath loaded", "pinDir", a.cfg.PinDir())

	if a.mesh != nil {
		r, err := a.newRouter()
		if err != nil {
			return err
		}
		a.routes = r
	}
	if err := a.setUpEncryption(); err != nil {
		return err
	}
	defer a.enc.Close()
	local := localapi.New(localapi.Config{
		Node: a.cfg.NodeName, Cluster: a.cfg.ClusterName, ClusterID: a.cfg.ClusterID, MTU: a.cfg.MTU, Started: a.started, Log: a.log,
		Lock: &a.mu, Store: a.store, IPAM: a.ipam, Identities: a.ids, LocalObjects: &a.objSet, Objects: a.objects,
		Datapath: dp, Plumb: a.plumb, Reconcile: a.rec, Mesh: a.mesh, WireGuard: a.enc,
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

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	wg.Go(func() { a.rec.Loop(ctx, a.log, a.reconcile) })
	wg.Go(func() { node.WatchAddrs(ctx, a.log, func() { a.rec.Request() }) })
	wg.Go(func() { ms.Serve(ctx, a.log) })
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
	if stopErr != nil && !errors.Is(stopErr, context.Canceled) {
		// A failure, not a stop: the datapath stays, the agent does not.
		return stopErr
	}
	a.log.Info("agent stopped; datapath stays pinned and attached")
	return err
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
		Reconcile:      a.rec.Stats,
		IPCacheEntries: func() int { return a.maps.IPCacheEntries() },
		ClusterMesh:    a.mesh.Status,
		WireGuard:      func() *api.WireGuardStatus { return a.enc.Status() },
	}
}
