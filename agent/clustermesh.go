package agent

// Cluster mode (--kvstore-endpoints): the agent works with its cluster's
// etcd. The etcd side lives in agent/meshsync; this file wires it in:
//
//	connect (background, backoff) ─▶ check isthmus/cluster-config/<cluster>
//	   ─▶ lease ─▶ identity.NewEtcd (global IDs) ─▶ re-reference the local
//	   endpoints' identities ─▶ Publisher (node + ipcache records, leased)
//	meshsync.Watch ─▶ meshsync.Tables ─▶ reconcile (ipcache, policy,
//	   services with remote backends, routes to other nodes' pod CIDRs)
//
// The datapath starts from local state before any of this: the pinned maps
// keep serving, and until every watched prefix has been listed once the
// reconciler only adds (see meshState.ready). Losing etcd later changes
// nothing in the tables; the watchers' re-list after a reconnect converges
// them.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/agent/service"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/backoff"
)

// DefaultLeaseTTL is the default TTL of a node's records in etcd.
const DefaultLeaseTTL = 60 * time.Second

const (
	// healthInterval is how often the etcd connection is probed for status.
	healthInterval = 5 * time.Second
	// persistInterval bounds how often the applied objects read from etcd
	// are written to the state dir (for a restart while etcd is away).
	persistInterval = 2 * time.Second
	// retryInterval is how often identity references that could not be
	// taken are tried again.
	retryInterval = 5 * time.Second
	// allocateTimeout bounds an identity allocation in etcd, so that an
	// unreachable etcd fails an endpoint add instead of hanging it.
	allocateTimeout = 15 * time.Second
)

func (c Config) validateClusterMode() []error {
	var errs []error
	for _, ep := range c.KVStoreEndpoints {
		if !strings.HasPrefix(ep, "https://") && !strings.HasPrefix(ep, "http://") {
			errs = append(errs, fmt.Errorf("kvstore endpoint %q: want https://host:port", ep))
		}
		if strings.HasPrefix(ep, "https://") && c.KVStoreBundle == "" {
			errs = append(errs, fmt.Errorf("kvstore endpoint %s uses TLS: --kvstore-bundle is required", ep))
		}
	}
	for _, ip := range c.NodeIPs {
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() || ip.IsLoopback() || ip.Is4In6() || ip.Zone() != "" {
			errs = append(errs, fmt.Errorf("node IP %s: want a unicast underlay address", ip))
		}
	}
	if c.LeaseTTL < 0 || (c.LeaseTTL > 0 && c.LeaseTTL < 2*time.Second) {
		errs = append(errs, fmt.Errorf("lease TTL %s: at least 2s", c.LeaseTTL))
	}
	return errs
}

// clusterMesh is the agent's cluster-mode state; nil in standalone mode.
type clusterMesh struct {
	log    *slog.Logger
	tables *meshsync.Tables

	mu        sync.Mutex
	nodeIPs   []netip.Addr
	client    *kvstore.Client
	alloc     *identity.Etcd
	pub       *meshsync.Publisher
	connected bool
	lastErr   error
	routeErr  string // of the last route sync, "" when it worked
	// referenced holds the endpoints (by key) whose identity this process
	// holds a reference to in etcd.
	referenced map[string]bool
	// persisted is the objects-table version last written to the state dir.
	persisted map[string]objects.Object
}

func newClusterMesh(cfg Config, log *slog.Logger, onChange func()) *clusterMesh {
	m := &clusterMesh{
		log: log,
		tables: meshsync.NewTables(meshsync.Local{Cluster: cfg.ClusterName, ClusterID: cfg.ClusterID, Node: cfg.NodeName},
			log, onChange),
		nodeIPs:    slices.Clone(cfg.NodeIPs),
		referenced: map[string]bool{},
		lastErr:    fmt.Errorf("connecting to %s", strings.Join(cfg.KVStoreEndpoints, ",")),
	}
	m.tables.SetMaxIPCachePerRemote(cfg.MaxRemoteIPCache) // issue 10
	return m
}

func (m *clusterMesh) setErr(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lastErr = err
	if err != nil {
		m.connected = false
	}
}

func (m *clusterMesh) setRouteErr(err error) {
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

func (m *clusterMesh) allocator() *identity.Etcd {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.alloc
}

func (m *clusterMesh) kv() (*kvstore.Client, error) {
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

func (m *clusterMesh) getNodeIPs() []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.nodeIPs)
}

// runClusterMesh connects to etcd and runs everything that rides on it
// until ctx ends. It returns an error only for a configuration that
// retrying cannot fix (the cluster-config does not match this node).
func (a *Agent) runClusterMesh(ctx context.Context) error {
	m := a.mesh
	kcfg := kvstore.Config{Endpoints: a.cfg.KVStoreEndpoints, Logger: a.log, Metrics: a.kvMetrics()}
	if a.cfg.KVStoreBundle != "" {
		tlsCfg, err := meshsync.LoadBundle(a.cfg.KVStoreBundle, a.cfg.ClusterName)
		if err != nil {
			return err
		}
		kcfg.TLS = tlsCfg
	}
	ttl := a.cfg.LeaseTTL
	if ttl == 0 {
		ttl = DefaultLeaseTTL
	}
	local := meshsync.Local{Cluster: a.cfg.ClusterName, ClusterID: a.cfg.ClusterID, Node: a.cfg.NodeName}

	// Each step is retried with backoff until it works; only a
	// cluster-config that contradicts this node's flags is final.
	if len(m.getNodeIPs()) == 0 {
		ips, err := retry(ctx, m, "determine the node's underlay address (pass --node-ip)", func() ([]netip.Addr, error) {
			ips, err := a.detectNodeIPs()
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
		a.log.Info("clustermesh: node IPs from the default route's interface", "ips", ips)
	}
	client, err := retry(ctx, m, "connect to the kvstore", func() (*kvstore.Client, error) {
		return kvstore.Connect(ctx, kcfg) // re-dials by itself afterwards
	})
	if err != nil {
		return nil
	}
	defer client.Close()
	cfg, err := retry(ctx, m, "read the cluster-config", func() (records.ClusterConfig, error) {
		cfg, found, err := meshsync.CheckClusterConfig(ctx, client, local, a.cfg.PodCIDRs)
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
	a.log.Info("clustermesh: cluster-config matches", "cluster", cfg.Name, "id", cfg.ID, "podCIDRs", cfg.PodCIDRs)
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
		identity.WithLease(lease), identity.WithLogger(a.log))
	if err != nil {
		return err
	}
	pub := meshsync.NewPublisher(client, lease, a.log)
	if err := pub.AdoptStale(ctx, local.Cluster, m.getNodeIPs()); err != nil {
		a.log.Warn("clustermesh: cannot look for records of an earlier run; they expire with their lease", "err", err)
	}
	m.mu.Lock()
	m.client, m.alloc, m.pub = client, alloc, pub
	m.connected, m.lastErr = true, nil
	m.mu.Unlock()
	a.log.Info("clustermesh: connected", "endpoints", a.cfg.KVStoreEndpoints, "leaseTTL", ttl)

	var wg sync.WaitGroup
	wg.Go(func() { meshsync.Watch(ctx, client, m.tables) })
	wg.Go(func() { pub.Run(ctx) })
	wg.Go(func() { a.meshMaintenance(ctx) })
	wg.Wait()
	return nil
}

// meshMaintenance takes identity references that are still missing,
// publishes, persists the applied objects and probes the connection.
func (a *Agent) meshMaintenance(ctx context.Context) {
	a.referenceIdentities(ctx)
	health := time.NewTicker(healthInterval)
	defer health.Stop()
	persist := time.NewTicker(persistInterval)
	defer persist.Stop()
	refs := time.NewTicker(retryInterval)
	defer refs.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-health.C:
			a.probeKVStore(ctx)
		case <-persist.C:
			a.persistMeshObjects()
		case <-refs.C:
			a.referenceIdentities(ctx)
		}
	}
}

func (a *Agent) probeKVStore(ctx context.Context) {
	m := a.mesh
	c, err := m.kv()
	if err != nil {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, healthInterval-time.Second)
	defer cancel()
	_, _, err = c.Get(pctx, records.ClusterConfigKey(a.cfg.ClusterName))
	if ctx.Err() != nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		if m.connected {
			a.log.Warn("clustermesh: lost the kvstore; the datapath keeps its state", "err", err)
		}
		m.connected, m.lastErr = false, err
		return
	}
	if !m.connected {
		a.log.Info("clustermesh: kvstore reachable again")
	}
	m.connected, m.lastErr = true, nil
}

// referenceIdentities takes this process's etcd reference on the identity
// of every local endpoint that has none yet (after a restart, the
// references of the previous run die with its lease). If the labels now
// have another ID (the old one was collected meanwhile), the endpoint
// moves to it. Then the node's records are published. etcd is called
// without the API lock, so a slow etcd does not stall the local API.
func (a *Agent) referenceIdentities(ctx context.Context) {
	m := a.mesh
	alloc := m.allocator()
	if alloc == nil {
		return
	}
	changed := false
	for _, e := range a.store.Endpoints() {
		if m.isReferenced(e.Key()) {
			continue
		}
		actx, cancel := context.WithTimeout(ctx, allocateTimeout)
		id, err := alloc.Allocate(actx, a.identityLabels(e.Namespace, e.Labels))
		cancel()
		if err != nil {
			a.log.Warn("clustermesh: cannot reference the endpoint's identity; retrying", "endpoint", e.Key(), "err", err)
			continue
		}
		a.mu.Lock()
		cur, ok := a.store.Endpoint(e.Namespace, e.Name)
		switch {
		case !ok || cur.ID != e.ID || m.isReferenced(e.Key()):
			// Deleted (or replaced) meanwhile: the reference is not needed.
			a.logErr("release identity", alloc.Release(ctx, id))
		case id != cur.Identity:
			a.log.Warn("clustermesh: endpoint's identity changed in etcd", "endpoint", e.Key(), "old", cur.Identity, "new", id)
			cur.Identity = id
			if err := a.store.PutEndpoint(cur); err != nil {
				a.log.Error("clustermesh: update endpoint", "endpoint", e.Key(), "err", err)
				a.logErr("release identity", alloc.Release(ctx, id))
				break
			}
			m.setReferenced(e.Key(), true)
			changed = true
		default:
			m.setReferenced(e.Key(), true)
		}
		a.mu.Unlock()
	}
	if changed {
		a.rec.request()
	}
	a.mu.Lock()
	a.publishLocked()
	a.mu.Unlock()
}

func (m *clusterMesh) isReferenced(key string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.referenced[key]
}

func (m *clusterMesh) setReferenced(key string, on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if on {
		m.referenced[key] = true
	} else {
		delete(m.referenced, key)
	}
}

// meshEndpointAdded runs after an endpoint was added (its identity was
// allocated through etcd in this process).
func (a *Agent) meshEndpointAdded(e state.Endpoint) {
	if a.mesh == nil {
		return
	}
	a.mesh.setReferenced(e.Key(), true)
	a.publishLocked()
}

// meshEndpointDeleted runs after an endpoint was deleted.
func (a *Agent) meshEndpointDeleted(key string) {
	if a.mesh == nil {
		return
	}
	a.mesh.setReferenced(key, false)
	a.publishLocked()
}

// publishLocked hands the node's records to the publisher; callers hold
// a.mu, so the endpoints read are the ones the API settled.
func (a *Agent) publishLocked() {
	m := a.mesh
	m.mu.Lock()
	pub := m.pub
	m.mu.Unlock()
	if pub == nil {
		return
	}
	var eps []meshsync.Endpoint
	for _, e := range a.store.Endpoints() {
		eps = append(eps, meshsync.Endpoint{Name: e.Name, Namespace: e.Namespace, IPs: e.IPs, Identity: e.Identity})
	}
	wgKey, wgPort := a.wireguardPublication()
	recs, err := meshsync.Records(meshsync.NodeInfo{
		Local:              meshsync.Local{Cluster: a.cfg.ClusterName, ClusterID: a.cfg.ClusterID, Node: a.cfg.NodeName},
		IPs:                m.getNodeIPs(),
		PodCIDRs:           a.cfg.PodCIDRs,
		BootID:             bootID(),
		WireGuardPublicKey: wgKey,
		WireGuardPort:      wgPort,
	}, eps)
	if err != nil {
		a.log.Error("clustermesh: cannot build the node's records", "err", err)
		return
	}
	pub.Set(recs)
}

// persistMeshObjects writes the applied objects read from etcd to the
// state dir, so that an agent restarted while etcd is unreachable starts
// with the same services and policies.
func (a *Agent) persistMeshObjects() {
	m := a.mesh
	if !m.tables.ObjectsListed() {
		return
	}
	cur := m.tables.Objects()
	m.mu.Lock()
	prev := m.persisted
	m.mu.Unlock()
	if prev != nil && maps.Equal(prev, cur) {
		return
	}
	stored := a.store.Objects()
	put := map[string][]byte{}
	for k, o := range cur {
		raw, err := jsonOf(o)
		if err != nil {
			continue
		}
		if old, ok := stored[k]; !ok || !jsonEqual(old, raw) {
			put[k] = raw
		}
	}
	var del []string
	for k := range stored {
		if _, ok := cur[k]; !ok {
			del = append(del, k)
		}
	}
	if prev == nil && len(del) > 0 {
		slices.Sort(del)
		a.log.Warn("clustermesh: objects applied on this node before are not in the cluster's etcd and no longer apply; apply them again to the cluster", "objects", del)
	}
	if len(put) > 0 || len(del) > 0 {
		if err := a.store.UpdateObjects(put, del); err != nil {
			a.log.Warn("clustermesh: cannot persist the applied objects", "err", err)
			return
		}
	}
	m.mu.Lock()
	m.persisted = cur
	m.mu.Unlock()
}

// bootID identifies this boot of the node; peers reset state tied to it.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// defaultRouteAddrs returns the global addresses of the interfaces that
// hold a default route (IPv4 and IPv6), the node's underlay addresses when
// none are configured.
func defaultRouteAddrs() ([]netip.Addr, error) { return defaultRouteAddrsOf(&netlink.Handle{}) }

// defaultRouteAddrsOf is defaultRouteAddrs in the netns of h.
func defaultRouteAddrsOf(h *netlink.Handle) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := h.RouteListFiltered(family, &netlink.Route{}, 0)
		if err != nil {
			return nil, err
		}
		links := map[int]bool{}
		for _, rt := range routes {
			if ones, _ := maskOf(rt); rt.LinkIndex > 0 && ones == 0 && (rt.Table == 0 || rt.Table == 254) {
				links[rt.LinkIndex] = true
			}
		}
		for _, idx := range slices.Sorted(maps.Keys(links)) {
			link, err := h.LinkByIndex(idx)
			if err != nil {
				continue
			}
			addrs, err := h.AddrList(link, family)
			if err != nil {
				continue
			}
			for _, ad := range addrs {
				ip, ok := netip.AddrFromSlice(ad.IP)
				if !ok {
					continue
				}
				ip = ip.Unmap()
				if ip.IsGlobalUnicast() && !slices.Contains(out, ip) {
					out = append(out, ip)
				}
			}
		}
	}
	return out, nil
}

// maskOf returns the prefix length of a route's destination (0 for a
// default route, which has none).
func maskOf(rt netlink.Route) (int, bool) {
	if rt.Dst == nil {
		return 0, true
	}
	ones, _ := rt.Dst.Mask.Size()
	return ones, true
}

// retry calls f until it succeeds, waiting longer after each failure (up
// to 15 s) and recording the failure as the cluster-mode status. It gives
// up when ctx ends (with ctx's error) or when f fails with
// meshsync.ErrClusterConfig, which retrying cannot fix.
func retry[T any](ctx context.Context, m *clusterMesh, what string, f func() (T, error)) (T, error) {
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

// meshIdentities is the identity.Allocator of cluster mode: allocations go
// to etcd once connected; lookups see every cluster's identities.
type meshIdentities struct{ m *clusterMesh }

var _ identity.Allocator = meshIdentities{}

func (i meshIdentities) Allocate(ctx context.Context, l identity.Labels) (uint32, error) {
	alloc := i.m.allocator()
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
	if alloc := i.m.allocator(); alloc != nil {
		return alloc.Get(id)
	}
	return nil, false
}

// List returns the identities of every cluster in the mesh, plus this
// node's own allocations the watch has not delivered yet.
func (i meshIdentities) List() []identity.Identity {
	ids := i.m.tables.Identities()
	if alloc := i.m.allocator(); alloc != nil {
		known := map[uint32]bool{}
		for _, id := range ids {
			known[id.ID] = true
		}
		for _, id := range alloc.List() {
			if !known[id.ID] {
				ids = append(ids, id)
			}
		}
		slices.SortFunc(ids, func(a, b identity.Identity) int { return int(a.ID) - int(b.ID) })
	}
	return ids
}

// clusterMeshStatus is the "clustermesh" section of the status.
func (a *Agent) clusterMeshStatus() *api.ClusterMeshStatus {
	m := a.mesh
	if m == nil {
		return nil
	}
	m.mu.Lock()
	st := &api.ClusterMeshStatus{
		KVStoreEndpoints: slices.Clone(a.cfg.KVStoreEndpoints),
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
			InvalidRecords: c.Invalid,
		})
	}
	return st
}

// meshState is the mesh's part of one reconcile run's desired state. In
// standalone mode it is empty and ready.
type meshState struct {
	// ready: every watched prefix was listed, so what the mesh lacks may
	// be removed from the datapath. Until then the reconciler removes only
	// what the node itself is the complete source of: its pods' addresses.
	ready    bool
	cluster  string
	node     string
	nodeIPs  []netip.Addr
	podCIDRs []netip.Prefix
	view     meshsync.View
}

func (a *Agent) meshState() meshState {
	if a.mesh == nil {
		return meshState{ready: true}
	}
	v := a.mesh.tables.View()
	return meshState{ready: v.Ready, cluster: a.cfg.ClusterName, node: a.cfg.NodeName,
		nodeIPs: a.mesh.getNodeIPs(), podCIDRs: a.cfg.PodCIDRs, view: v}
}

// local reports whether addr is one of this node's pod addresses.
func (m meshState) local(addr netip.Addr) bool {
	return slices.ContainsFunc(m.podCIDRs, func(p netip.Prefix) bool { return p.Contains(addr) })
}

// mayRemove reports whether an ipcache entry that is not desired may go.
func (m meshState) mayRemove(p netip.Prefix) bool {
	return m.ready || (p.IsSingleIP() && m.local(p.Addr()))
}

// keepUnknown returns the backends to write for a frontend that has have
// and should have want. Until the mesh is listed, backends that did not
// come from this node (other nodes', other clusters') stay: etcd may just
// not have told us about them yet.
func (m meshState) keepUnknown(have, want []bpf.Backend) []bpf.Backend {
	if m.ready {
		return want
	}
	out := slices.Clone(want)
	for _, b := range have {
		if !m.local(b.Addr) && !slices.Contains(out, b) {
			out = append(out, b)
		}
	}
	if len(out) == len(want) {
		return want
	}
	slices.SortFunc(out, func(a, b bpf.Backend) int {
		return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.ClusterID, b.ClusterID))
	})
	return out
}

// addIPCache adds every endpoint of the mesh (with the node that hosts it)
// and the own cluster's other nodes (remote-node). Other clusters' nodes
// stay "world": reserved identities mean the local cluster's. This node's
// own records are left out: its endpoints come from the local store.
func (m meshState) addIPCache(want map[netip.Prefix]bpf.IPCacheEntry) {
	for _, e := range m.view.IPCache {
		if e.Cluster == m.cluster && slices.Contains(m.nodeIPs, e.HostIP) {
			continue
		}
		want[e.Prefix] = bpf.IPCacheEntry{Identity: e.Identity, HostIP: e.HostIP}
	}
	for _, n := range m.view.Nodes {
		if n.Cluster != m.cluster || n.Name == m.node {
			continue
		}
		for _, ip := range n.IPs {
			want[netip.PrefixFrom(ip, ip.BitLen())] = bpf.IPCacheEntry{Identity: bpf.IdentityRemote}
		}
	}
}

// clusterEndpoints returns the endpoints of the own cluster's other nodes
// as services select them: by the labels of their identity.
func (m meshState) clusterEndpoints(ids identity.Allocator) []service.Endpoint {
	labels := map[uint32]identity.Labels{}
	var out []service.Endpoint
	for _, e := range m.view.IPCache {
		if e.Cluster != m.cluster || slices.Contains(m.nodeIPs, e.HostIP) || !e.Prefix.IsSingleIP() {
			continue
		}
		l, ok := labels[e.Identity]
		if !ok {
			l, _ = ids.Get(e.Identity)
			labels[e.Identity] = l
		}
		ns := l[identity.LabelNamespace]
		if ns == "" || l[identity.LabelCluster] != m.cluster {
			continue // unknown identity (yet): selectable by nothing
		}
		out = append(out, service.Endpoint{Namespace: ns, Labels: l, IPs: []netip.Addr{e.Prefix.Addr()}})
	}
	return out
}

// podRoutes routes every other node's pod CIDRs to its address of the
// same family.
func (m meshState) podRoutes() []podRoute {
	var out []podRoute
	for _, n := range m.view.Nodes {
		if n.Cluster == m.cluster && n.Name == m.node {
			continue
		}
		for _, p := range n.PodCIDRs {
			for _, ip := range n.IPs {
				if ip.Is4() == p.Addr().Is4() {
					out = append(out, podRoute{Dst: p, Via: ip})
					break
				}
			}
		}
	}
	sortRoutes(out)
	return out
}
