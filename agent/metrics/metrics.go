// Package metrics is the agent's Prometheus metrics and health endpoints
// (docs/metrics.md).
//
// Each agent has its own registry (tests run several agents in one
// process). Everything but the kvstore client's counters is read at scrape
// time from the same sources as `isthmus status`: the datapath's metrics
// map, the reconciler, the mesh tables, the WireGuard device. So a metric
// never disagrees with the status, and nothing is counted twice.
//
// The same three paths are served on the API socket and, with the agent's
// --metrics-addr, on TCP (Listen) for Prometheus and kubelet-style probes:
//
//	GET /metrics   the registry, text format
//	GET /healthz   the process serves (200)
//	GET /readyz    200 once the datapath is loaded and reconciled (and, in
//	               cluster mode, etcd is connected and the own cluster's
//	               state listed); 503 naming what is missing otherwise
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/promutil"
)

// DefaultAddr is where isthmus-agent serves /metrics, /healthz and
// /readyz over TCP unless told otherwise.
const DefaultAddr = ":9962"

// Sources are what the metrics are read from at scrape time: the same
// sources as `isthmus status`.
type Sources struct {
	Node, Cluster string
	ClusterID     uint32
	ClusterMode   bool
	Log           *slog.Logger

	Datapath  func() datapath.Datapath // the loaded datapath's maps
	Desired   func() Counts
	Reconcile func() reconcile.Stats
	// FollowUp is the loop that runs after the datapath's (routes,
	// WireGuard, L2, BIG TCP, BGP, north-south; nil: not reported).
	FollowUp       func() reconcile.Stats
	IPCacheEntries func() int // after the last reconcile
	// IPCacheOverflow counts the mesh entries left out of a full ipcache
	// (nil: not reported).
	IPCacheOverflow func() int
	// IPCacheDrift counts the entries the drift checks rewrote (nil: not
	// reported).
	IPCacheDrift func() int
	ClusterMesh  func() *api.ClusterMeshStatus // nil in standalone mode
	WireGuard    func() *api.WireGuardStatus   // nil without encryption
	BigTCP       func() *api.BigTCPStatus      // nil before the datapath is loaded
	Kubernetes   func() *api.KubernetesStatus  // nil outside Kubernetes mode
	// BGP is the speaker's status (nil: not reported; it returns nil
	// while no BGPPeeringPolicy selects the node).
	BGP        func() *api.BGPStatus
	NorthSouth func() *api.NorthSouthStatus // nil before the datapath is loaded
	L2         func() *api.L2Status         // nil: not reported
}

// Counts are the sizes of the desired state.
type Counts struct{ Endpoints, Identities, Services, Policies int }

// Registry is the agent's registry.
type Registry struct {
	src     Sources
	reg     *prometheus.Registry
	kv      *kvstore.Metrics // cluster mode only: the etcd client's calls
	handler http.Handler
	// endpointAdd is the duration of the local API's endpoint adds.
	endpointAdd prometheus.Histogram
}

// New returns the registry of one agent (tests run several agents in one
// process, so none is global).
func New(src Sources) *Registry {
	m := &Registry{src: src, reg: prometheus.NewRegistry()}
	m.endpointAdd = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "isthmus_endpoint_add_seconds",
		Help: "Duration of the endpoint adds that created an endpoint (the CNI ADD, or isthmus endpoint add), as the local API handled them: from the request's arrival to the response, waiting for the pod's labels and the reconcile run that enforces the endpoint included.",
		// 5 ms to about 10 s.
		Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
	})
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collector{m},
		m.endpointAdd,
	)
	if src.ClusterMode {
		m.kv = kvstore.NewMetrics()
		m.reg.MustRegister(m.kv)
	}
	m.handler = promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		// A map that cannot be read costs its own metrics, not the scrape.
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      promutil.ErrorLog(src.Log),
	})
	return m
}

// ObserveEndpointAdd records the duration of an endpoint add
// (isthmus_endpoint_add_seconds).
func (m *Registry) ObserveEndpointAdd(d time.Duration) { m.endpointAdd.Observe(d.Seconds()) }

// Handler serves the registry, text format.
func (m *Registry) Handler() http.Handler { return m.handler }

// KV is what the cluster-mode etcd client counts into (nil in standalone
// mode).
func (m *Registry) KV() *kvstore.Metrics { return m.kv }

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	// Datapath: the metrics map, counted since the maps were created.
	descForwardPackets = desc("isthmus_datapath_forward_packets_total", "Packets the datapath forwarded, by reason (forward_stack, forward_local, service_nat, delivered_to_pod).", "reason")
	descForwardBytes   = desc("isthmus_datapath_forward_bytes_total", "Bytes the datapath forwarded, by reason.", "reason")
	descDropPackets    = desc("isthmus_datapath_drop_packets_total", "Packets the datapath dropped, by reason (drop_policy_ingress, drop_policy_egress, drop_no_backend, drop_invalid, drop_spoofed_source, ...).", "reason")
	descDropBytes      = desc("isthmus_datapath_drop_bytes_total", "Bytes the datapath dropped, by reason.", "reason")
	descK8sSynced      = desc("isthmus_kubernetes_synced", "1 once every informer on the API server has listed (Kubernetes mode); until then the agent serves the objects its previous run persisted.")
	descK8sObjects     = desc("isthmus_kubernetes_objects", "Services and NetworkPolicies from the API server translated for the datapath.")
	descK8sRefused     = desc("isthmus_kubernetes_refused_objects", "Objects from the API server left out of the datapath now because they cannot be enforced as written (logged once each).")
	descK8sRefusals    = desc("isthmus_kubernetes_refusals_total", "Translations of API server objects that were refused, since the agent started.")
	descConntrack      = desc("isthmus_datapath_conntrack_entries", "Entries in the conntrack map.")
	descIPCache        = desc("isthmus_datapath_ipcache_entries", "Entries in the ipcache map after the last reconcile.")
	descIPCacheDrift   = desc("isthmus_datapath_ipcache_drift_fixed_total", "ipcache entries the periodic drift check found different from what the agent wrote (removed or changed by hand), and wrote again.")
	descIPCacheOver    = desc("isthmus_datapath_ipcache_overflow_entries", "Mesh entries left out of the ipcache map because it is full (its capacity less the room kept for the node's own entries).")
	descPolicyEntries  = desc("isthmus_datapath_policy_entries", "Entries in the policy map.")
	descFrontends      = desc("isthmus_datapath_service_frontends", "Service frontends (VIP, port, protocol) in the services map.")

	// Desired state.
	descInfo       = desc("isthmus_agent_info", "Always 1; the node, its cluster and the mode (standalone or cluster).", "node", "cluster", "cluster_id", "mode")
	descReady      = desc("isthmus_agent_ready", "1 when GET /readyz answers 200.")
	descEndpoints  = desc("isthmus_agent_endpoints", "Endpoints (pods) on this node.")
	descIdentities = desc("isthmus_agent_identities", "Identities known to the node (in cluster mode: of every synced cluster), reserved ones excluded.")
	descServices   = desc("isthmus_agent_services", "Services applied (on this node, or in cluster mode in the cluster).")
	descPolicies   = desc("isthmus_agent_network_policies", "NetworkPolicies applied.")

	// The reconciler.
	descRecRuns        = desc("isthmus_agent_reconcile_runs_total", "Reconcile runs (the maps made equal to the desired state).")
	descRecErrors      = desc("isthmus_agent_reconcile_errors_total", "Reconcile runs that failed (they are retried with backoff).")
	descRecFailing     = desc("isthmus_agent_reconcile_failing", "1 while the last reconcile run failed.")
	descRecLastSuccess = desc("isthmus_agent_reconcile_last_success_timestamp_seconds", "Unix time of the last successful reconcile run (0: none yet).")
	descRecPending     = desc("isthmus_agent_reconcile_pending", "Changes to the desired state that no finished reconcile run covers yet (the reconcile queue's depth; requests coalesce into one run).")
	descRecDuration    = desc("isthmus_agent_reconcile_duration_seconds", "Time spent in reconcile runs.")
	descFollowRuns     = desc("isthmus_agent_followup_runs_total", "Runs of the follow-up loop (routes, WireGuard, L2, BIG TCP, BGP, north-south after each reconcile run; API calls do not wait for it).")
	descFollowPending  = desc("isthmus_agent_followup_pending", "Reconcile runs whose snapshot no finished follow-up run covers yet.")
	descFollowDuration = desc("isthmus_agent_followup_duration_seconds", "Time spent in follow-up runs.")

	// Cluster mode.
	descKVConnected  = desc("isthmus_agent_kvstore_connected", "1 when the cluster's etcd answered the last probe (every 5 s).")
	descPublished    = desc("isthmus_agent_kvstore_published", "1 when every record of this node (node, ipcache) is written to etcd.")
	descPublishedN   = desc("isthmus_agent_kvstore_published_records", "Records this node publishes to etcd.")
	descRouteError   = desc("isthmus_agent_mesh_route_error", "1 while routes to other nodes' pod CIDRs are not all in place.")
	descInvalidAll   = desc("isthmus_agent_mesh_invalid_records_total", "Records read from etcd that were skipped as invalid.")
	descClSynced     = desc("isthmus_agent_mesh_cluster_synced", "1 when the cluster's state is in use: the own cluster's listed, a remote's canaries present and the cluster accepted.", "cluster")
	descClError      = desc("isthmus_agent_mesh_cluster_error", "1 while the cluster is not used for a reason (see isthmus status).", "cluster")
	descClNodes      = desc("isthmus_agent_mesh_cluster_nodes", "Nodes of the cluster known to this node.", "cluster")
	descClEndpoints  = desc("isthmus_agent_mesh_cluster_endpoints", "Endpoint addresses (ipcache records) of the cluster known to this node.", "cluster")
	descClIdentities = desc("isthmus_agent_mesh_cluster_identities", "Identities of the cluster known to this node.", "cluster")
	descClServices   = desc("isthmus_agent_mesh_cluster_services", "Service records of the cluster known to this node.", "cluster")
	descClInvalid    = desc("isthmus_agent_mesh_cluster_invalid_records_total", "Records of the cluster skipped as invalid.", "cluster")
	descClRefused    = desc("isthmus_agent_mesh_cluster_refused_records", "Records of the cluster refused now as not owned by it, by reason (reserved-identity, prefix-not-owned, node-cidr-overlap, ...).", "cluster", "reason")
	descClRefusals   = desc("isthmus_agent_mesh_cluster_refused_records_total", "Refusals of the cluster's records as not owned by it since the agent started (each once per key and reason), by reason.", "cluster", "reason")

	// WireGuard, when encryption is on.
	descWGPeers       = desc("isthmus_agent_wireguard_peers", "WireGuard peers configured on the node's device.")
	descWGUnencrypted = desc("isthmus_agent_wireguard_unencrypted_nodes", "Mesh nodes without a WireGuard key: traffic to their pods is not sent.")
	descWGRefused     = desc("isthmus_agent_wireguard_refused_peers", "Peers left out (duplicate key, bad record).")
	descWGHandshake   = desc("isthmus_agent_wireguard_peer_last_handshake_timestamp_seconds", "Unix time of the peer's last handshake (0: none yet).", "node")
	descWGRx          = desc("isthmus_agent_wireguard_peer_rx_bytes_total", "Bytes received from the peer.", "node")
	descWGTx          = desc("isthmus_agent_wireguard_peer_tx_bytes_total", "Bytes sent to the peer.", "node")

	// BIG TCP (agent/bigtcp).
	descBigTCPPath    = desc("isthmus_agent_bigtcp_path_enabled", "1 while the path carries GSO/GRO packets beyond 64 KiB for the family (see isthmus status for why not).", "path", "family")
	descBigTCPRefused = desc("isthmus_agent_bigtcp_devices_at_legacy_size", "Devices left at 65536 while their family is on (a TSO limit, or a refused write rolled back), by role.", "role")
	descBigTCPSize    = desc("isthmus_agent_bigtcp_device_gso_max_size_bytes", "GSO maximum size of an external device (underlay, outside, wireguard), by family.", "device", "role", "family")

	// BGP (agent/bgp).
	descBGPUp         = desc("isthmus_agent_bgp_session_established", "1 while the BGP session with the neighbour is established.", "peer")
	descBGPAdvertised = desc("isthmus_agent_bgp_advertised_prefixes", "Prefixes announced to the neighbour (0 while its session is down).", "peer")
	descBGPReceived   = desc("isthmus_agent_bgp_received_prefixes", "Prefixes the neighbour sent (all rejected: export only).", "peer")
	descBGPFlaps      = desc("isthmus_agent_bgp_session_flaps_total", "Times the session went down after being established.", "peer")
	descBGPPaths      = desc("isthmus_agent_bgp_announced_prefixes", "Prefixes the node's speaker announces.")

	// The way in from outside (gateway/northsouth).
	descNSAttached  = desc("isthmus_agent_northsouth_device_attached", "1 while from_external and to_external are attached to the external device.", "device")
	descNSSNAT      = desc("isthmus_agent_northsouth_snat_table_present", "1 while the nftables table that masquerades flows under externalTrafficPolicy Cluster is in place (it exists only while such a frontend does).")
	descNSFrontends = desc("isthmus_agent_northsouth_frontends", "Frontends at load-balancer and external addresses in the datapath, by externalTrafficPolicy.", "policy")

	// L2 announcements (agent/l2, gateway/l2).
	descL2Leaderships = desc("isthmus_agent_l2_leaderships", "Service addresses this node leads (answers ARP/NDP for) now.")
	descL2Addresses   = desc("isthmus_agent_l2_addresses", "Service addresses the L2 announcement policies select.")
	descL2Members     = desc("isthmus_agent_l2_members", "Nodes this node counts as alive L2 candidates (itself included when it may lead).")
	descL2Lease       = desc("isthmus_agent_l2_lease_held", "1 while this node holds its L2 lease (cluster mode; always 1 standalone).")
	descL2Takeovers   = desc("isthmus_agent_l2_takeovers_total", "Addresses this node started to lead.")
	descL2Answers     = desc("isthmus_agent_l2_answers_sent_total", "ARP replies and neighbour advertisements sent in answer to requests.", "protocol")
	descL2Gratuitous  = desc("isthmus_agent_l2_announcements_sent_total", "Gratuitous ARPs and unsolicited neighbour advertisements sent (takeover bursts, refreshes).")

	allDescs = []*prometheus.Desc{
		descBGPUp, descBGPAdvertised, descBGPReceived, descBGPFlaps, descBGPPaths,
		descNSAttached, descNSSNAT, descNSFrontends,
		descL2Leaderships, descL2Addresses, descL2Members, descL2Lease, descL2Takeovers, descL2Answers, descL2Gratuitous,
		descForwardPackets, descForwardBytes, descDropPackets, descDropBytes, descConntrack, descIPCache, descIPCacheOver, descIPCacheDrift, descPolicyEntries, descFrontends,
		descBigTCPPath, descBigTCPRefused, descBigTCPSize,
		descInfo, descReady, descEndpoints, descIdentities, descServices, descPolicies,
		descRecRuns, descRecErrors, descRecFailing, descRecLastSuccess, descRecPending, descRecDuration,
		descFollowRuns, descFollowPending, descFollowDuration,
		descKVConnected, descPublished, descPublishedN, descRouteError, descInvalidAll,
		descClSynced, descClError, descClNodes, descClEndpoints, descClIdentities, descClServices, descClInvalid,
		descWGPeers, descWGUnencrypted, descWGRefused, descWGHandshake, descWGRx, descWGTx,
	}
)

// collector reads the agent's state at scrape time.
type collector struct{ m *Registry }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	src := c.m.src
	gauge, counter := promutil.Gauge(ch), promutil.Counter(ch)
	mode := "standalone"
	if src.ClusterMode {
		mode = "cluster"
	}
	gauge(descInfo, 1, src.Node, src.Cluster, strconv.FormatUint(uint64(src.ClusterID), 10), mode)
	gauge(descReady, promutil.Bool(len(c.m.NotReady()) == 0))
	dp := src.Datapath()

	// Datapath. A read that fails is reported (and logged by the handler)
	// as an invalid metric; the other metrics are still served.
	if m, err := dp.Metrics(); err != nil {
		ch <- prometheus.NewInvalidMetric(descDropPackets, err)
	} else {
		for r, v := range m {
			pk, by := descForwardPackets, descForwardBytes
			if r.IsDrop() {
				pk, by = descDropPackets, descDropBytes
			}
			counter(pk, float64(v.Packets), r.String())
			counter(by, float64(v.Bytes), r.String())
		}
	}
	if n, err := dp.ConntrackCount(); err != nil {
		ch <- prometheus.NewInvalidMetric(descConntrack, err)
	} else {
		gauge(descConntrack, float64(n))
	}
	if ps, err := dp.PolicyList(); err != nil {
		ch <- prometheus.NewInvalidMetric(descPolicyEntries, err)
	} else {
		gauge(descPolicyEntries, float64(len(ps)))
	}
	if fs, err := dp.ServiceList(); err != nil {
		ch <- prometheus.NewInvalidMetric(descFrontends, err)
	} else {
		gauge(descFrontends, float64(len(fs)))
	}

	n := src.Desired()
	gauge(descEndpoints, float64(n.Endpoints))
	gauge(descIdentities, float64(n.Identities))
	gauge(descServices, float64(n.Services))
	gauge(descPolicies, float64(n.Policies))

	rm := src.Reconcile()
	gauge(descIPCache, float64(src.IPCacheEntries()))
	if src.IPCacheDrift != nil {
		ch <- prometheus.MustNewConstMetric(descIPCacheDrift, prometheus.CounterValue, float64(src.IPCacheDrift()))
	}
	if src.IPCacheOverflow != nil {
		gauge(descIPCacheOver, float64(src.IPCacheOverflow()))
	}
	counter(descRecRuns, float64(rm.Runs))
	counter(descRecErrors, float64(rm.Errors))
	gauge(descRecFailing, promutil.Bool(rm.Failing))
	gauge(descRecLastSuccess, promutil.UnixSeconds(rm.LastSuccess))
	gauge(descRecPending, float64(rm.Pending))
	ch <- prometheus.MustNewConstSummary(descRecDuration, rm.Runs, rm.Busy.Seconds(), nil)
	if src.FollowUp != nil {
		fm := src.FollowUp()
		counter(descFollowRuns, float64(fm.Runs))
		gauge(descFollowPending, float64(fm.Pending))
		ch <- prometheus.MustNewConstSummary(descFollowDuration, fm.Runs, fm.Busy.Seconds(), nil)
	}

	if st := src.ClusterMesh(); st != nil {
		gauge(descKVConnected, promutil.Bool(st.Connected))
		gauge(descPublished, promutil.Bool(st.Published))
		gauge(descPublishedN, float64(st.PublishedRecords))
		gauge(descRouteError, promutil.Bool(st.RouteError != ""))
		counter(descInvalidAll, float64(st.InvalidRecords))
		for _, cl := range st.Clusters {
			gauge(descClSynced, promutil.Bool(cl.Synced), cl.Name)
			gauge(descClError, promutil.Bool(cl.Error != ""), cl.Name)
			gauge(descClNodes, float64(cl.Nodes), cl.Name)
			gauge(descClEndpoints, float64(cl.Endpoints), cl.Name)
			gauge(descClIdentities, float64(cl.Identities), cl.Name)
			gauge(descClServices, float64(cl.Services), cl.Name)
			counter(descClInvalid, float64(cl.InvalidRecords), cl.Name)
			for _, r := range records.Reasons {
				gauge(descClRefused, float64(cl.Refused[r]), cl.Name, r)
				counter(descClRefusals, float64(cl.RefusedTotal[r]), cl.Name, r)
			}
		}
	}

	if src.BigTCP != nil {
		collectBigTCP(gauge, src.BigTCP())
	}
	if src.BGP != nil {
		if b := src.BGP(); b != nil {
			gauge(descBGPPaths, float64(b.Advertised))
			for _, p := range b.Peers {
				peer := p.Address.String()
				gauge(descBGPUp, promutil.Bool(p.State == "established"), peer)
				gauge(descBGPAdvertised, float64(p.Advertised), peer)
				gauge(descBGPReceived, float64(p.Received), peer)
				counter(descBGPFlaps, float64(p.Flaps), peer)
			}
		}
	}
	if src.NorthSouth != nil {
		if ns := src.NorthSouth(); ns != nil {
			for _, d := range ns.Devices {
				gauge(descNSAttached, promutil.Bool(d.Attached), d.Name)
			}
			gauge(descNSSNAT, promutil.Bool(ns.SNATPresent))
			gauge(descNSFrontends, float64(ns.FrontendsCluster), "Cluster")
			gauge(descNSFrontends, float64(ns.FrontendsLocal), "Local")
		}
	}
	if src.L2 != nil {
		if st := src.L2(); st != nil {
			gauge(descL2Leaderships, float64(st.Leaderships))
			gauge(descL2Addresses, float64(len(st.Addresses)))
			gauge(descL2Members, float64(len(st.Members)))
			gauge(descL2Lease, promutil.Bool(st.LeaseHeld))
			counter(descL2Takeovers, float64(st.Takeovers))
			counter(descL2Answers, float64(st.ARPReplies), "arp")
			counter(descL2Answers, float64(st.NAReplies), "ndp")
			counter(descL2Gratuitous, float64(st.Gratuitous))
		}
	}

	if src.Kubernetes != nil {
		if k := src.Kubernetes(); k != nil {
			synced := 0.0
			if k.Synced {
				synced = 1
			}
			gauge(descK8sSynced, synced)
			gauge(descK8sObjects, float64(k.Objects))
			gauge(descK8sRefused, float64(k.Refused))
			counter(descK8sRefusals, float64(k.Refusals))
		}
	}

	if wg := src.WireGuard(); wg != nil {
		gauge(descWGPeers, float64(len(wg.Peers)))
		gauge(descWGUnencrypted, float64(len(wg.Unencrypted)))
		gauge(descWGRefused, float64(len(wg.Refused)))
		for _, p := range wg.Peers {
			node := p.Node
			if node == "" { // a peer the mesh does not name (yet): keep series apart
				node = "key:" + p.PublicKey
			}
			gauge(descWGHandshake, promutil.UnixSeconds(p.LastHandshake), node)
			counter(descWGRx, float64(p.RxBytes), node)
			counter(descWGTx, float64(p.TxBytes), node)
		}
	}
}

// collectBigTCP: the paths per family, the devices left at 65536, and the
// external devices' sizes (pod veths are too many to be series each).
func collectBigTCP(gauge func(*prometheus.Desc, float64, ...string), st *api.BigTCPStatus) {
	if st == nil {
		return
	}
	for _, p := range st.Paths {
		gauge(descBigTCPPath, promutil.Bool(p.On), p.Path, p.Family)
	}
	legacy := map[string]int{}
	for _, d := range st.Devices {
		role := d.Role
		if i := strings.IndexByte(role, ','); i >= 0 {
			role = role[:i]
		}
		legacy[role] += 0
		if d.Reason != "" {
			legacy[role]++
		}
		if d.Endpoint == "" {
			gauge(descBigTCPSize, float64(d.GSO), d.Name, d.Role, "ipv6")
			gauge(descBigTCPSize, float64(d.GSOIPv4), d.Name, d.Role, "ipv4")
		}
	}
	for role, n := range legacy {
		gauge(descBigTCPRefused, float64(n), role)
	}
}

// NotReady lists why the agent is not ready; empty when it is. The agent
// serves the API only after the datapath is loaded, so that is not checked
// here.
func (m *Registry) NotReady() []string {
	var out []string
	if rm := m.src.Reconcile(); rm.LastSuccess.IsZero() {
		msg := "no successful reconcile of the datapath yet"
		if rm.LastErr != nil {
			msg += ": " + rm.LastErr.Error()
		}
		out = append(out, msg)
	}
	if st := m.src.ClusterMesh(); st != nil {
		if !st.Connected {
			msg := "not connected to the cluster's kvstore"
			if st.LastError != "" {
				msg += ": " + st.LastError
			}
			out = append(out, msg)
		}
		for _, cl := range st.Clusters {
			if cl.Local && !cl.Synced {
				out = append(out, "the own cluster's state is not listed from the kvstore yet")
			}
		}
	}
	return out
}

// healthMux serves /metrics, /healthz and /readyz in plain text, for the
// TCP listener.
func (m *Registry) healthMux() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.handler)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if reasons := m.NotReady(); len(reasons) > 0 {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready:\n%s\n", strings.Join(reasons, "\n"))
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// Server is the TCP listener of --metrics-addr; a nil one (no address
// configured) does nothing.
type Server struct {
	ln  net.Listener
	srv *http.Server
}

// Listen binds addr ("" : nothing, a nil Server). The agent calls it at
// start, so a port in use stops it with a clear error instead of going
// unnoticed.
func (m *Registry) Listen(addr string) (*Server, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address (--metrics-addr %s): %w", addr, err)
	}
	return &Server{ln: ln, srv: &http.Server{Handler: m.healthMux(), ReadHeaderTimeout: 10 * time.Second}}, nil
}

// Addr is the bound address ("" when off).
func (s *Server) Addr() string {
	if s == nil {
		return ""
	}
	return s.ln.Addr().String()
}

// Serve answers until ctx ends.
func (s *Server) Serve(ctx context.Context, log *slog.Logger) {
	if s == nil {
		return
	}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(sctx)
	})
	defer stop()
	log.Info("serving /metrics, /healthz and /readyz", "addr", s.Addr())
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("metrics endpoint stopped", "addr", s.Addr(), "err", err)
	}
}

// Close releases the listener (when Serve never ran).
func (s *Server) Close() {
	if s != nil {
		s.ln.Close()
	}
}
