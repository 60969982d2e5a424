// Package clustermode is the agent's cluster mode (--kvstore-endpoints): the
// cluster's etcd as a source of desired state. The etcd side (publisher,
// watchers, tables) lives in agent/meshsync; this package runs it for one
// node:
//
//	connect (background, backoff) ─▶ check isthmus/cluster-config/<cluster>
//	   ─▶ lease ─▶ identity.NewEtcd (global IDs) ─▶ re-reference the local
//	   endpoints' identities ─▶ Publisher (node + ipcache records, leased)
//	meshsync.Watch ─▶ meshsync.Tables ─▶ Desired, Objects, Identities
//	   ─▶ the reconcilers (ipcache, policy, services with remote
//	   backends, routes to other nodes' pod CIDRs, WireGuard peers)
//
// The datapath starts from local state before any of this: the pinned maps
// keep serving, and until every watched prefix has been listed once the
// reconciler only adds (see desired.Mesh.Ready). Losing etcd later changes
// nothing in the tables; the watchers' re-list after a reconnect converges
// them.
//
// Identities survive partitions: a partition shorter than the server's
// identity GC grace keeps every ID (the allocator restores this node's
// references under the re-granted lease). After a longer one, an
// identity may have been collected and its labels allocated anew; the
// allocator reports the references it could not restore (WithOnLost),
// and referenceIdentities allocates again for the endpoints that used
// them and moves them to the labels' current ID: the store, then a
// reconcile (endpoints map, ipcache, policy) and the published records.
package clustermode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/node"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/backoff"
)

// DefaultLeaseTTL is the default TTL of a node's records in etcd.
const DefaultLeaseTTL = 60 * time.Second

const (
	// healthInterval is how often the etcd connection is probed for status.
	healthInterval = 5 * time.Second
	// PersistInterval bounds how often the applied objects read from etcd
	// are written to the state dir (for a restart while etcd is away).
	PersistInterval = 2 * time.Second
	// retryInterval is how often identity references that could not be
	// taken are tried again.
	retryInterval = 5 * time.Second
	// allocateTimeout bounds an identity allocation in etcd, so that an
	// unreachable etcd fails an endpoint add instead of hanging it.
	allocateTimeout = 15 * time.Second
	// connectWait is how long an identity allocation that arrives before
	// the first connection to etcd waits for it: a pod created as its
	// node's agent starts (or a restarted agent's first add) should not
	// fail for being a moment early, while an etcd that is away still
	// fails adds soon. It outlasts a first connection attempt that times
	// out (the kvstore's 5 s dial timeout) and its retry, so that one lost
	// attempt does not fail the add, and an add that fails says why the
	// attempts failed rather than only that they are under way.
	connectWait = 12 * time.Second
)

// Validate checks the cluster-mode flags.
func Validate(endpoints []string, bundle string, nodeIPs []netip.Addr, leaseTTL time.Duration) []error {
	var errs []error
	for _, ep := range endpoints {
		if !strings.HasPrefix(ep, "https://") && !strings.HasPrefix(ep, "http://") {
			errs = append(errs, fmt.Errorf("kvstore endpoint %q: want https://host:port", ep))
		}
		if strings.HasPrefix(ep, "https://") && bundle == "" {
			errs = append(errs, fmt.Errorf("kvstore endpoint %s uses TLS: --kvstore-bundle is required", ep))
		}
	}
	for _, ip := range nodeIPs {
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() || ip.IsLoopback() || ip.Is4In6() || ip.Zone() != "" {
			errs = append(errs, fmt.Errorf("node IP %s: want a unicast underlay address", ip))
		}
	}
	if leaseTTL < 0 || (leaseTTL > 0 && leaseTTL < 2*time.Second) {
		errs = append(errs, fmt.Errorf("lease TTL %s: at least 2s", leaseTTL))
	}
	return errs
}

// Config is what cluster mode needs: the node, the flags, and hooks into
// the rest of the agent.
type Config struct {
	Local     meshsync.Local
	Endpoints []string       // etcd client URLs of the cluster's server
	Bundle    string         // directory with ca.crt, client.crt, client.key
	NodeIPs   []netip.Addr   // underlay; none: DetectNodeIPs
	PodCIDRs  []netip.Prefix // this node's
	LeaseTTL  time.Duration  // of the node's records; 0: DefaultLeaseTTL
	// MaxRemoteIPCache caps the ipcache entries accepted of each remote
	// cluster (0: records.DefaultMaxIPCacheEntries, -1: no cap).
	MaxRemoteIPCache int
	Log              *slog.Logger

	Store *state.Store // the local endpoints (and the persisted objects)
	// Lock is the local API's lock: endpoint changes made here take it,
	// and callers of the *Locked methods hold it.
	Lock sync.Locker

	Request       func()                      // ask for a reconcile
	Converge      func(context.Context) error // request one and wait for it
	Objects       func() desired.Objects      // the applied objects the reconciler reads
	WireGuard     func() (key string, port int)
	DetectNodeIPs func() ([]netip.Addr, error)
	// Workload is set on an external workload's agent (workload.go).
	Workload *Workload
}

// Mesh is the agent's cluster-mode state; nil in standalone mode.
type Mesh struct {
	cfg    Config
	log    *slog.Logger
	tables *meshsync.Tables

	mu        sync.Mutex
	nodeIPs   []netip.Addr
	client    *kvstore.Client
	alloc     *identity.Etcd
	pub       *meshsync.Publisher
	connected bool
	// allocReady is closed once alloc is set (the first connection).
	allocReady chan struct{}
	lastErr    error
	routeErr   string // of the last route sync, "" when it worked
	// referenced holds the endpoints (by key) whose identity this process
	// holds a reference to in etcd.
	referenced map[string]bool
	// persisted is the objects-table version last written to the state
	// dir, persistedGen its generation.
	persisted    map[string]objects.Object
	persistedGen uint64
	// persistedLBVer is the generation of LB-IPAM's assignments last
	// written to the state dir (or found there), once persistedLBOnce.
	persistedLBVer  uint64
	persistedLBOnce bool
	// rereference asks maintain to take missing identity references now
	// (after a lease loss dropped some).
	rereference chan struct{}
	// workloadID is the identity of Config.Workload (0: none yet).
	workloadID uint32
	// configs keeps what applies and deletes decoded of the applied
	// objects, so that each decodes only what changed since.
	configs meshsync.ConfigCache
	// frontends keeps the frontends of the applied services for the
	// conflict check of the next apply (the cache gives the same objects).
	frontends desired.FrontendMemo
}

// New returns the cluster mode of one node; Run connects it.
func New(cfg Config) *Mesh {
	m := &Mesh{
		cfg:         cfg,
		log:         cfg.Log,
		tables:      meshsync.NewTables(cfg.Local, cfg.Log, cfg.Request),
		nodeIPs:     slices.Clone(cfg.NodeIPs),
		referenced:  map[string]bool{},
		rereference: make(chan struct{}, 1),
		allocReady:  make(chan struct{}),
		lastErr:     fmt.Errorf("connecting to %s", strings.Join(cfg.Endpoints, ",")),
	}
	m.tables.SetMaxIPCachePerRemote(cfg.MaxRemoteIPCache)
	// What the watch decoded is not decoded again by an apply's read.
	m.configs.Known = m.tables.DecodedObject
	return m
}

func (m *Mesh) setErr(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lastErr = err
	if err != nil {
		m.connected = false
	}
}

// SetRouteErr records the result of the last route sync for the status
// (nil: the routes are in place).
func (m *Mesh) SetRouteErr(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	m.mu.Lock()
	changed := msg != m.routeErr
	m.routeErr = msg
	m.mu.Unlock()
	if changed && msg != "" {
		m.log.Warn("clustermesh: routes to other nodes' pods", "err", msg)
	}
}

func (m *Mesh) allocator() *identity.Etcd {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.alloc
}

func (m *Mesh) kv() (*kvstore.Client, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.client == nil {
		msg := "not connected to the cluster's kvstore yet"
		if m.lastErr != nil {
			msg += ": " + m.lastErr.Error()
		}
		return nil, api.Errorf(http.StatusServiceUnavailable, "%s", msg)
	}
	return m.client, nil
}

// KV returns the etcd client once connected (for agent/l2's lease and
// records), else an error saying why not.
func (m *Mesh) KV() (*kvstore.Client, error) { return m.kv() }

// NodeIPs returns the node's underlay addresses as published.
func (m *Mesh) NodeIPs() []netip.Addr { return m.getNodeIPs() }

func (m *Mesh) getNodeIPs() []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.nodeIPs)
}

// Run connects to etcd and runs everything that rides on it until ctx
// ends, counting the etcd client's calls into kvMetrics (may be nil). It
// returns an error only for a configuration that retrying cannot fix (the
// cluster-config does not match this node).
func (m *Mesh) Run(ctx context.Context, kvMetrics *kvstore.Metrics) error {
	kcfg := kvstore.Config{Endpoints: m.cfg.Endpoints, Logger: m.log, Metrics: kvMetrics}
	if m.cfg.Bundle != "" {
		tlsCfg, err := meshsync.LoadBundle(m.cfg.Bundle, m.cfg.Local.Cluster)
		if err != nil {
			return err
		}
		user, err := meshsync.BundleUser(tlsCfg)
		if err != nil {
			return err
		}
		warning, err := meshsync.CheckBundleUser(user, m.cfg.Local.Node)
		if err != nil {
			return err
		}
		if warning != "" {
			m.log.Warn(warning)
		}
		kcfg.TLS = tlsCfg
	}
	ttl := m.cfg.LeaseTTL
	if ttl == 0 {
		ttl = DefaultLeaseTTL
	}
	local := m.cfg.Local

	// Each step is retried with backoff until it works; only a
	// cluster-config that contradicts this node's flags is final.
	if len(m.getNodeIPs()) == 0 {
		ips, err := retry(ctx, m, "determine the node's underlay address (pass --node-ip)", func() ([]netip.Addr, error) {
			ips, err := m.cfg.DetectNodeIPs()
			if err == nil && len(ips) == 0 {
				err = errors.New("the interface of the default route has no global address")
			}
			return ips, err
		})
		if err != nil {
			return nil
		}
		m.mu.Lock()
		m.nodeIPs = ips
		m.mu.Unlock()
		m.log.Info("clustermesh: node IPs from the default route's interface", "ips", ips)
	}
	client, err := retry(ctx, m, "connect to the kvstore", func() (*kvstore.Client, error) {
		return kvstore.Connect(ctx, kcfg) // re-dials by itself afterwards
	})
	if err != nil {
		return nil
	}
	defer client.Close()
	cfg, err := retry(ctx, m, "read the cluster-config", func() (records.ClusterConfig, error) {
		cfg, found, err := meshsync.CheckClusterConfig(ctx, client, local, m.cfg.PodCIDRs)
		if err == nil && !found {
			err = fmt.Errorf("%s does not exist yet (is the cluster's isthmus-clustermesh running?)", records.ClusterConfigKey(local.Cluster))
		}
		return cfg, err
	})
	if errors.Is(err, meshsync.ErrClusterConfig) {
		return err
	} else if err != nil {
		return nil
	}
	m.log.Info("clustermesh: cluster-config matches", "cluster", cfg.Name, "id", cfg.ID, "podCIDRs", cfg.PodCIDRs)
	lease, err := retry(ctx, m, "grant the node's lease", func() (*kvstore.Lease, error) {
		return client.GrantLease(ctx, ttl)
	})
	if err != nil {
		return nil
	}
	// A name held by another live node is retried (that node's record
	// expires with its lease if it is gone) but never overwritten.
	if _, err := retry(ctx, m, "claim the node name", func() (struct{}, error) {
		return struct{}{}, meshsync.ClaimNodeName(ctx, client, local, m.getNodeIPs(), lease.ID())
	}); err != nil {
		return nil
	}
	alloc, err := identity.NewEtcd(client, local.Cluster, local.ClusterID, local.Node,
		identity.WithLease(lease), identity.WithLogger(m.log), identity.WithOnLost(m.identitiesLost))
	if err != nil {
		return err
	}
	pub := meshsync.NewPublisher(client, lease, m.log)
	if err := pub.AdoptStale(ctx, local.Cluster, m.getNodeIPs()); err != nil {
		m.log.Warn("clustermesh: cannot look for records of an earlier run; they expire with their lease", "err", err)
	}
	m.mu.Lock()
	m.client, m.alloc, m.pub = client, alloc, pub
	m.connected, m.lastErr = true, nil
	select {
	case <-m.allocReady:
	default:
		close(m.allocReady)
	}
	m.mu.Unlock()
	m.log.Info("clustermesh: connected", "endpoints", m.cfg.Endpoints, "leaseTTL", ttl)

	var wg sync.WaitGroup
	wg.Go(func() { meshsync.Watch(ctx, client, m.tables) })
	wg.Go(func() { pub.Run(ctx) })
	wg.Go(func() { m.maintain(ctx) })
	wg.Wait()
	return nil
}

// maintain takes identity references that are still missing, publishes,
// persists the applied objects and probes the connection.
func (m *Mesh) maintain(ctx context.Context) {
	m.referenceIdentities(ctx)
	health := time.NewTicker(healthInterval)
	defer health.Stop()
	persist := time.NewTicker(PersistInterval)
	defer persist.Stop()
	refs := time.NewTicker(retryInterval)
	defer refs.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-health.C:
			m.probeKVStore(ctx)
		case <-persist.C:
			m.persistObjects()
		case <-refs.C:
			m.referenceIdentities(ctx)
		case <-m.rereference:
			m.referenceIdentities(ctx)
		}
	}
}

func (m *Mesh) probeKVStore(ctx context.Context) {
	c, err := m.kv()
	if err != nil {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, healthInterval-time.Second)
	defer cancel()
	_, _, err = c.Get(pctx, records.ClusterConfigKey(m.cfg.Local.Cluster))
	if ctx.Err() != nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		if m.connected {
			m.log.Warn("clustermesh: lost the kvstore; the datapath keeps its state", "err", err)
		}
		m.connected, m.lastErr = false, err
		return
	}
	if !m.connected {
		m.log.Info("clustermesh: kvstore reachable again")
	}
	m.connected, m.lastErr = true, nil
}

// identitiesLost is the allocator's report (on the lease's goroutine) of
// references a lease loss dropped: their endpoints allocate again.
func (m *Mesh) identitiesLost(lost []identity.Identity) {
	ids := make([]uint32, len(lost))
	for i, l := range lost {
		ids[i] = l.ID
	}
	m.log.Warn("clustermesh: identities lost while this node was cut off from the kvstore (collected and allocated anew); moving their endpoints", "identities", ids)
	select {
	case m.rereference <- struct{}{}:
	default:
	}
}

// referenceIdentities takes this process's etcd reference on the identity
// of every local endpoint that has none: after a restart (the references
// of the previous run die with its lease), and after a lease loss the
// allocator could not restore a reference from (identitiesLost, or found
// here: the allocator no longer holds the endpoint's ID). If the labels
// now have another ID (the old one was collected meanwhile), the endpoint
// moves to it: the store, a reconcile, the published records. etcd is
// called without the API lock, so a slow etcd does not stall the local
// API; the lock is held only to check and update the store.
func (m *Mesh) referenceIdentities(ctx context.Context) {
	store := m.cfg.Store
	alloc := m.allocator()
	if alloc == nil {
		return
	}
	changed := false
	for _, e := range store.Endpoints() {
		if m.IsReferenced(e.Key()) {
			if alloc.Holds(e.Identity) {
				continue
			}
			m.log.Warn("clustermesh: endpoint's identity reference was lost with the node's lease; allocating again", "endpoint", e.Key(), "identity", e.Identity)
			m.setReferenced(e.Key(), false)
		}
		actx, cancel := context.WithTimeout(ctx, allocateTimeout)
		id, err := alloc.Allocate(actx, desired.IdentityLabels(m.cfg.Local.Cluster, e.Namespace, e.Labels))
		cancel()
		if err != nil {
			m.log.Warn("clustermesh: cannot reference the endpoint's identity; retrying", "endpoint", e.Key(), "err", err)
			continue
		}
		release := false
		m.cfg.Lock.Lock()
		cur, ok := store.Endpoint(e.Namespace, e.Name)
		switch {
		case !ok || cur.ID != e.ID || m.IsReferenced(e.Key()):
			// Deleted (or replaced) meanwhile: the reference is not needed.
			release = true
		case id != cur.Identity:
			m.log.Warn("clustermesh: endpoint moves to its labels' current identity", "endpoint", e.Key(), "old", cur.Identity, "new", id)
			cur.Identity = id
			if err := store.PutEndpoint(cur); err != nil {
				m.log.Error("clustermesh: update endpoint", "endpoint", e.Key(), "err", err)
				release = true
				break
			}
			m.setReferenced(e.Key(), true)
			changed = true
		default:
			m.setReferenced(e.Key(), true)
		}
		m.cfg.Lock.Unlock()
		if release {
			m.logErr("release identity", alloc.Release(ctx, id))
		}
	}
	if m.referenceWorkload(ctx, alloc) {
		changed = true
	}
	if changed {
		m.cfg.Request()
	}
	m.cfg.Lock.Lock()
	m.PublishLocked()
	m.cfg.Lock.Unlock()
}

// IsReferenced reports whether this process holds a reference in etcd on
// the identity of the endpoint with key.
func (m *Mesh) IsReferenced(key string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.referenced[key]
}

func (m *Mesh) setReferenced(key string, on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if on {
		m.referenced[key] = true
	} else {
		delete(m.referenced, key)
	}
}

// EndpointAddedLocked runs after an endpoint was added (its identity was
// allocated through etcd in this process); nothing on a nil Mesh.
func (m *Mesh) EndpointAddedLocked(e state.Endpoint) {
	if m == nil {
		return
	}
	m.setReferenced(e.Key(), true)
	m.PublishLocked()
}

// EndpointDeletedLocked runs after an endpoint was deleted; nothing on a
// nil Mesh.
func (m *Mesh) EndpointDeletedLocked(key string) {
	if m == nil {
		return
	}
	m.setReferenced(key, false)
	m.PublishLocked()
}

// PublishLocked hands the node's records to the publisher; callers hold
// the API lock, so the endpoints read are the ones the API settled.
func (m *Mesh) PublishLocked() {
	if m == nil {
		return
	}
	m.mu.Lock()
	pub := m.pub
	m.mu.Unlock()
	if pub == nil {
		return
	}
	var eps []meshsync.Endpoint
	for _, e := range m.cfg.Store.Endpoints() {
		eps = append(eps, meshsync.Endpoint{Name: e.Name, Namespace: e.Namespace, IPs: e.IPs, Identity: e.Identity})
	}
	eps = append(eps, m.workloadEndpoint()...)
	wgKey, wgPort := m.cfg.WireGuard()
	recs, err := meshsync.Records(meshsync.NodeInfo{
		Local:              m.cfg.Local,
		IPs:                m.getNodeIPs(),
		PodCIDRs:           m.cfg.PodCIDRs,
		BootID:             node.BootID(),
		WireGuardPublicKey: wgKey,
		WireGuardPort:      wgPort,
		Labels:             m.workloadLabels(),
	}, eps)
	if err != nil {
		m.log.Error("clustermesh: cannot build the node's records", "err", err)
		return
	}
	pub.Set(recs)
}

// persistObjects writes the applied objects read from etcd to the state
// dir, so that an agent restarted while etcd is unreachable starts with the
// same services and policies.
func (m *Mesh) persistObjects() {
	if !m.tables.ObjectsListed() {
		return
	}
	cur, gen := m.tables.ObjectsGen()
	m.mu.Lock()
	prev, prevGen := m.persisted, m.persistedGen
	m.mu.Unlock()
	if prev != nil && gen == prevGen {
		return
	}
	// LB-IPAM's assignments go to their own file (objects.json keeps
	// objects as applied): a restart without etcd keeps the addresses.
	if err := m.persistLBAssignments(); err != nil {
		m.log.Warn("clustermesh: cannot persist LB-IPAM's assignments", "err", err)
		return
	}
	// The objects changed since the last write, when the tables know
	// them: then a tick costs what changed (and the write), not a pass
	// over every object and a copy of every stored one.
	var changed []string
	known := false
	if prev != nil {
		changed, known = m.tables.ObjectsChangedSince(prevGen, gen)
	}
	put := map[string][]byte{}
	var del []string
	note := func(k string, o objects.Object, stored func(string) ([]byte, bool)) {
		if prev != nil && prev[k] == o {
			// The same decoded object as at the last write: it is on
			// disk. Marshalling only what changed keeps a bulk apply
			// of thousands of services from costing O(all) per tick.
			return
		}
		raw, err := json.Marshal(objects.WithoutStatus(o))
		if err != nil {
			return
		}
		if old, ok := stored(k); !ok || !desired.JSONEqual(old, raw) {
			put[k] = raw
		}
	}
	if known {
		for _, k := range changed {
			if _, done := put[k]; done {
				continue
			}
			if o, ok := cur[k]; ok {
				note(k, o, m.cfg.Store.Object)
			} else if _, ok := m.cfg.Store.Object(k); ok && !slices.Contains(del, k) {
				del = append(del, k)
			}
		}
	} else {
		stored := m.cfg.Store.Objects()
		lookup := func(k string) ([]byte, bool) { v, ok := stored[k]; return v, ok }
		for k, o := range cur {
			note(k, o, lookup)
		}
		for k := range stored {
			if _, ok := cur[k]; !ok {
				del = append(del, k)
			}
		}
	}
	if prev == nil && len(del) > 0 {
		slices.Sort(del)
		m.log.Warn("clustermesh: objects applied on this node before are not in the cluster's etcd and no longer apply; apply them again to the cluster", "objects", del)
	}
	if len(put) > 0 || len(del) > 0 {
		if err := m.cfg.Store.UpdateObjects(put, del); err != nil {
			m.log.Warn("clustermesh: cannot persist the applied objects", "err", err)
			return
		}
	}
	m.mu.Lock()
	m.persisted, m.persistedGen = cur, gen
	m.mu.Unlock()
}

// persistLBAssignments writes the assignments read from etcd to the state
// dir when they changed since the last write (the tables' generation of
// them), or, the first time, when they differ from what is there: reading
// the file back every time cost as much as writing it, and comparing
// every assignment each 2 s of a bulk apply nearly as much.
func (m *Mesh) persistLBAssignments() error {
	m.mu.Lock()
	lastVer, written := m.persistedLBVer, m.persistedLBOnce
	m.mu.Unlock()
	if written && m.tables.LBAssignmentsVer() == lastVer {
		return nil
	}
	recs, ver := m.tables.LBAssignmentsGen()
	same := false
	if !written {
		if stored, err := m.cfg.Store.LBAssignments(); err == nil {
			same = lbipam.Equal(lbipam.FromRecords(recs), lbipam.FromRecords(stored))
		}
	}
	if !same {
		if err := m.cfg.Store.SaveLBAssignments(recs); err != nil {
			return err
		}
	}
	m.mu.Lock()
	m.persistedLBVer, m.persistedLBOnce = ver, true
	m.mu.Unlock()
	return nil
}

// retry calls f until it succeeds, waiting longer after each failure (up
// to 15 s) and recording the failure as the cluster-mode status. It gives
// up when ctx ends (with ctx's error) or when f fails with
// meshsync.ErrClusterConfig, which retrying cannot fix.
func retry[T any](ctx context.Context, m *Mesh, what string, f func() (T, error)) (T, error) {
	b := backoff.Backoff{Min: 200 * time.Millisecond, Max: 15 * time.Second}
	for {
		v, err := f()
		if err == nil {
			return v, nil
		}
		err = fmt.Errorf("%s: %w", what, err)
		m.setErr(err)
		if errors.Is(err, meshsync.ErrClusterConfig) {
			return v, err
		}
		m.log.Warn("clustermesh: retrying with backoff", "err", err)
		if err := b.Wait(ctx); err != nil {
			return v, err
		}
	}
}

// Identities is the identity.Allocator of cluster mode: allocations go to
// etcd once connected; lookups see every cluster's identities.
func (m *Mesh) Identities() identity.Allocator { return meshIdentities{m} }

type meshIdentities struct{ m *Mesh }

func (i meshIdentities) Allocate(ctx context.Context, l identity.Labels) (uint32, error) {
	alloc := i.m.allocator()
	if alloc == nil {
		wait, cancel := context.WithTimeout(ctx, connectWait)
		select {
		case <-i.m.allocReady:
		case <-wait.Done():
		}
		cancel()
		alloc = i.m.allocator()
	}
	if alloc == nil {
		_, err := i.m.kv()
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, allocateTimeout)
	defer cancel()
	id, err := alloc.Allocate(ctx, l)
	if err != nil && ctx.Err() != nil {
		return 0, api.WithStatus(http.StatusServiceUnavailable, err)
	}
	return id, err
}

func (i meshIdentities) Release(ctx context.Context, id uint32) error {
	alloc := i.m.allocator()
	if alloc == nil {
		// No reference was taken by this process; the previous run's
		// expires with its lease.
		return fmt.Errorf("release identity %d: not connected: %w", id, identity.ErrNotFound)
	}
	return alloc.Release(ctx, id)
}

func (i meshIdentities) Get(id uint32) (identity.Labels, bool) {
	if l, ok := i.m.tables.Identity(id); ok {
		return l, true
	}
	// Only the node's own references: the allocator's cache also holds
	// masters it listed once, which GC may have deleted since (and whose
	// ID may since mean other labels).
	if alloc := i.m.allocator(); alloc != nil && alloc.Holds(id) {
		return alloc.Get(id)
	}
	return nil, false
}

// List returns the identities of every cluster in the mesh, plus this
// node's own allocations the watch has not delivered yet.
func (i meshIdentities) List() []identity.Identity {
	ids := i.m.tables.Identities()
	if alloc := i.m.allocator(); alloc != nil {
		ids = slices.Clone(ids) // the tables' is shared
		known := map[uint32]bool{}
		for _, id := range ids {
			known[id.ID] = true
		}
		for _, id := range alloc.List() {
			if !known[id.ID] && alloc.Holds(id.ID) {
				ids = append(ids, id)
			}
		}
		slices.SortFunc(ids, func(a, b identity.Identity) int { return int(a.ID) - int(b.ID) })
	}
	return ids
}

// Status is the "clustermesh" section of the status; nil on a nil Mesh
// (standalone mode).
func (m *Mesh) Status() *api.ClusterMeshStatus {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	st := &api.ClusterMeshStatus{
		KVStoreEndpoints: slices.Clone(m.cfg.Endpoints),
		Connected:        m.connected,
		NodeIPs:          slices.Clone(m.nodeIPs),
	}
	if m.lastErr != nil {
		st.LastError = m.lastErr.Error()
	}
	st.RouteError = m.routeErr
	pub := m.pub
	m.mu.Unlock()
	if pub != nil {
		synced, n, err := pub.Status()
		st.Published, st.PublishedRecords = synced, n
		if err != nil && st.LastError == "" {
			st.LastError = err.Error()
		}
	}
	ts := m.tables.Status()
	st.InvalidRecords, st.LastInvalid = ts.InvalidRecords, ts.LastInvalid
	for _, c := range ts.Clusters {
		st.Clusters = append(st.Clusters, api.ClusterSummary{
			Name: c.Name, ID: c.ID, Local: c.Local, Synced: c.Synced, Error: c.Error,
			Nodes: c.Nodes, Endpoints: c.Endpoints, Identities: c.Identities, Services: c.Services,
			InvalidRecords: c.Invalid, Refused: c.Refused, RefusedTotal: c.RefusedTotal,
		})
	}
	return st
}

// Desired is the mesh's part of one reconcile run's desired state; empty
// and ready on a nil Mesh (standalone mode).
func (m *Mesh) Desired() desired.Mesh {
	if m == nil {
		return desired.Mesh{Ready: true}
	}
	v := m.tables.View()
	return desired.Mesh{Ready: v.Ready, Cluster: m.cfg.Local.Cluster, Node: m.cfg.Local.Node,
		NodeIPs: m.getNodeIPs(), PodCIDRs: m.cfg.PodCIDRs, View: v, IPs: m.tables}
}

// Objects returns the applied objects read from etcd, once they were
// listed (ok); until then the objects persisted by the last run keep the
// datapath as it was.
func (m *Mesh) Objects() (objs desired.Objects, ok bool) {
	objs, _, ok = m.ObjectsGen()
	return objs, ok
}

// ObjectsGen is Objects with the generation of the snapshot (equal
// generations, same objects).
func (m *Mesh) ObjectsGen() (objs desired.Objects, gen uint64, ok bool) {
	if m == nil || !m.tables.ObjectsListed() {
		return nil, 0, false
	}
	objs, gen = m.tables.ObjectsGen()
	return desired.Objects(objs), gen, true
}

// ObjectsChangedSince is the tables' ObjectsChangedSince: the keys of the
// objects changed between the snapshots of generations since and current
// (as ObjectsGen gave them).
func (m *Mesh) ObjectsChangedSince(since, current uint64) (keys []string, ok bool) {
	if m == nil {
		return nil, false
	}
	return m.tables.ObjectsChangedSince(since, current)
}

func (m *Mesh) logErr(what string, err error) {
	if err != nil {
		m.log.Error(what, "err", err)
	}
}
