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
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/ipam"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

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
	// plain HTTP (metrics.go); "" turns that listener off. The API socket
	// serves the same paths regardless.
	MetricsAddr string

	// Cluster mode: on when KVStoreEndpoints is set (see clustermesh.go).
	KVStoreEndpoints []string      // etcd client URLs of the cluster's server
	KVStoreBundle    string        // directory with ca.crt, client.crt, client.key
	NodeIPs          []netip.Addr  // underlay; default: the default route's interface's
	LeaseTTL         time.Duration // of the node's records; default 60s
	// MaxRemoteIPCache caps the ipcache entries accepted of each remote
	// cluster (0: 65536, -1: no cap). Issue 10.
	MaxRemoteIPCache int

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
	if !dnsLabel(c.NodeName) {
		errs = append(errs, fmt.Errorf("node name %q must be a DNS label (lower-case letters, digits and '-', at most 63)", c.NodeName))
	}
	if !dnsLabel(c.ClusterName) || len(c.ClusterName) > records.MaxClusterNameLen {
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
	errs = append(errs, c.validateEncryption()...)
	if c.ClusterMode() {
		errs = append(errs, c.validateClusterMode()...)
	} else if c.KVStoreBundle != "" || len(c.NodeIPs) > 0 {
		errs = append(errs, errors.New("--kvstore-bundle and --node-ip need --kvstore-endpoints (cluster mode)"))
	}
	return errors.Join(errs...)
}

// datapath is what the agent uses of *bpf.Datapath; tests substitute a fake.
type datapath interface {
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

var _ datapath = (*bpf.Datapath)(nil)

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
	objSet atomic.Pointer[objectSet] // decoded applied objects, see objects.go

	dp datapath // set in Run, before the API serves

	// Kernel-facing steps, replaceable in tests.
	plumb         plumber
	openDatapath  func(Config) (datapath, error)
	nodeAddrs     func() ([]netip.Addr, error)
	newRouter     func() (router, error)
	detectNodeIPs func() ([]netip.Addr, error)

	// Cluster mode only (nil in standalone mode): the etcd source of
	// desired state (clustermesh.go), and the routes to other nodes.
	mesh   *clusterMesh
	routes router
	// enc is the WireGuard device (nil without encryption), set in Run
	// before the first reconcile.
	enc *encryption

	rec reconciler
	// softFailed: the last reconcile could not finish routes or tunnels
	// (which fail no API call); the loop retries with backoff.
	softFailed atomic.Bool
	metrics    *agentMetrics // set at the start of Run

	// ipcShadow is what the reconciler last wrote to the BPF ipcache, so a
	// reconcile diffs against memory instead of walking a map of up to
	// hundreds of thousands of entries (two syscalls each). The map itself
	// is listed again every resyncInterval, and after any write error, to
	// catch drift. Only the reconciler touches it.
	ipcShadow   map[netip.Prefix]bpf.IPCacheEntry
	ipcListedAt time.Time
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
		cfg:           cfg,
		log:           log,
		store:         store,
		ipam:          pool,
		plumb:         netlinkPlumber{},
		openDatapath:  openBPF,
		nodeAddrs:     nodeAddrs,
		newRouter:     newNetlinkRouter,
		detectNodeIPs: defaultRouteAddrs,
		rec:           newReconciler(),
	}
	if cfg.ClusterMode() {
		// Identities are global: allocated in the cluster's etcd.
		a.mesh = newClusterMesh(cfg, log, func() { a.rec.request() })
		a.ids = meshIdentities{a.mesh}
	} else {
		ids, err := identity.NewLocal(filepath.Join(cfg.StateDir, "identities.json"), cfg.ClusterID)
		if err != nil {
			return nil, err
		}
		a.ids = ids
	}
	if err := a.loadObjects(); err != nil {
		return nil, err
	}
	return a, nil
}

func openBPF(cfg Config) (datapath, error) {
	// The agent owns the bpffs mount its pins live on.
	if err := bpf.EnsureBPFFS(cfg.BPFFSRoot); err != nil {
		return nil, err
	}
	if cfg.ResetDatapath {
		if err := bpf.RemovePins(cfg.PinDir()); err != nil {
			return nil, fmt.Errorf("reset datapath: %w", err)
		}
	}
	return bpf.Open(cfg.PinDir())
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
	a.metrics = newAgentMetrics(a)
	ms, err := a.listenMetrics()
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
	a.dp = dp
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
	defer a.enc.close()
	a.restoreEndpoints(ctx)
	a.collectGarbage(ctx)
	gen := a.rec.start()
	err = a.reconcile(ctx)
	a.rec.finish(gen, err)
	if err != nil {
		// Keep going: the loop retries, and the API can still report why.
		a.log.Error("initial reconcile failed", "err", err)
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	wg.Go(func() { a.reconcileLoop(ctx) })
	wg.Go(func() { a.watchNodeAddrs(ctx) })
	wg.Go(func() { ms.Serve(ctx, a.log) })
	if a.mesh != nil {
		// etcd is one more source of desired state; the datapath already
		// serves from local state while it connects.
		wg.Go(func() {
			if err := a.runClusterMesh(ctx); err != nil {
				cancel(fmt.Errorf("cluster mode: %w", err))
			}
		})
	}

	a.log.Info("agent ready", "socket", a.cfg.SocketPath, "cluster", a.cfg.ClusterName, "podCIDRs", a.cfg.PodCIDRs,
		"endpoints", len(a.store.Endpoints()), "attachMode", dp.AttachMode(), "clusterMode", a.cfg.ClusterMode())
	err = api.NewServer(a, a.log).WithHealth(a.metrics.handler, a.notReady).Serve(ctx, ln)
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

// Ensure the agent serves the whole API.
var _ api.Backend = (*Agent)(nil)

// ownerOf is the IPAM owner of an endpoint.
func ownerOf(namespace, name string) string { return state.EndpointKey(namespace, name) }

func dnsLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1:
		default:
			return false
		}
	}
	return true
}
