package server

// Prometheus metrics and probes of isthmus-clustermesh (docs/metrics.md).
//
// The process has its own registry: the server's etcd client
// (isthmus_kvstore_*), and, read at scrape time, the mirror's status per
// remote cluster, the service syncer's counters and the server itself
// (isthmus_clustermesh_*). With the embedded etcd, the metrics etcd
// registers in the global Prometheus registry (etcd_*, grpc_*, go_*,
// process_*) are served alongside; with an external etcd, those belong to
// the external etcd's own /metrics, and only go_* and process_* are added.

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/promutil"
)

// DefaultMetricsListen is where isthmus-clustermesh serves /metrics,
// /healthz and /readyz unless told otherwise.
const DefaultMetricsListen = ":9963"

// etcdProbeTimeout bounds the etcd read behind /readyz and
// isthmus_clustermesh_etcd_up.
const etcdProbeTimeout = 2 * time.Second

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descInfo   = desc("isthmus_clustermesh_info", "Always 1; the cluster this server runs and its etcd (embedded or external).", "cluster", "cluster_id", "etcd")
	descEtcdUp = desc("isthmus_clustermesh_etcd_up", "1 when the cluster's etcd answered a read at scrape time.")
	descRemote = desc("isthmus_clustermesh_remotes", "Remote clusters with a record (connected with `isthmus clustermesh connect`).")

	descRState     = desc("isthmus_clustermesh_remote_state", "1 for the remote's current mirror state (connecting, connected, unreachable, dropped, refused, invalid), 0 for the others.", "cluster", "state")
	descRConnected = desc("isthmus_clustermesh_remote_connected", "1 when the remote cluster's etcd answers now.", "cluster")
	descRReady     = desc("isthmus_clustermesh_remote_ready", "1 when every kind of the remote is synced (its canary written).", "cluster")
	descRSynced    = desc("isthmus_clustermesh_remote_synced", "1 when the kind's canary of the remote is written.", "cluster", "kind")
	descRRecords   = desc("isthmus_clustermesh_remote_records", "Valid records of the remote mirrored, by kind (nodes, endpoints, identities, services).", "cluster", "kind")
	descRInvalid   = desc("isthmus_clustermesh_remote_invalid_records", "Records of the remote currently skipped as invalid.", "cluster")
	descRSkipped   = desc("isthmus_clustermesh_remote_skipped_records_total", "Invalid records of the remote seen since this server started.", "cluster")
	descRRefused   = desc("isthmus_clustermesh_remote_refused_records", "Records of the remote refused now because the remote does not own what they claim, by reason.", "cluster", "reason")
	descRRefusals  = desc("isthmus_clustermesh_remote_refused_records_total", "Refusals of records of the remote not owned by it since this server started (once per key and reason), by reason.", "cluster", "reason")
	descRError     = desc("isthmus_clustermesh_remote_error", "1 while the remote has an error of its current connection (or is not connected and had one).", "cluster")
	descRErrorTime = desc("isthmus_clustermesh_remote_last_error_timestamp_seconds", "Unix time of the remote's last error (0: none).", "cluster")
	descRContact   = desc("isthmus_clustermesh_remote_last_contact_timestamp_seconds", "Unix time the remote last answered (0: never).", "cluster")

	descSvcRecords = desc("isthmus_clustermesh_service_records", "Service records the service syncer wrote for other clusters in its last sync.")
	descSvcSyncs   = desc("isthmus_clustermesh_service_syncs_total", "Syncs of the service syncer.")
	descSvcPuts    = desc("isthmus_clustermesh_service_puts_total", "Service records written.")
	descSvcDeletes = desc("isthmus_clustermesh_service_deletes_total", "Service records deleted.")
	descSvcInvalid = desc("isthmus_clustermesh_service_invalid_total", "Inputs of the service syncer skipped as invalid.")
	descSvcError   = desc("isthmus_clustermesh_service_sync_error", "1 while the last sync of the service syncer failed.")
	descSvcLast    = desc("isthmus_clustermesh_service_last_sync_timestamp_seconds", "Unix time of the service syncer's last sync (0: none).")

	descLBUsed     = desc("isthmus_clustermesh_lbipam_pool_used_addresses", "Addresses LB-IPAM assigned from the pool (kept ones included).", "pool")
	descLBTotal    = desc("isthmus_clustermesh_lbipam_pool_total_addresses", "Addresses in the pool's blocks.", "pool")
	descLBKept     = desc("isthmus_clustermesh_lbipam_pool_kept_addresses", "Assigned addresses the pool no longer covers (kept: an address in use never moves).", "pool")
	descLBServices = desc("isthmus_clustermesh_lbipam_services", "LoadBalancer services with an assignment record.")
	descLBRefused  = desc("isthmus_clustermesh_lbipam_refused_services", "LoadBalancer services LB-IPAM refused (a requested address not honoured, or no room).")
	descLBInvalid  = desc("isthmus_clustermesh_lbipam_invalid_total", "Objects and assignment records LB-IPAM skipped as invalid (records are rewritten).")
	descLBError    = desc("isthmus_clustermesh_lbipam_sync_error", "1 while LB-IPAM's last write failed.")

	serverDescs = []*prometheus.Desc{descLBUsed, descLBTotal, descLBKept, descLBServices, descLBRefused, descLBInvalid, descLBError,
		descInfo, descEtcdUp, descRemote,
		descRState, descRConnected, descRReady, descRSynced, descRRecords, descRInvalid, descRSkipped, descRRefused, descRRefusals, descRError, descRErrorTime, descRContact,
		descSvcRecords, descSvcSyncs, descSvcPuts, descSvcDeletes, descSvcInvalid, descSvcError, descSvcLast}

	mirrorStates = []mirror.State{mirror.StateConnecting, mirror.StateConnected, mirror.StateUnreachable,
		mirror.StateDropped, mirror.StateRefused, mirror.StateInvalid}
)

// newMetrics returns the registry's handler and the kvstore metrics for the
// server's etcd client. a's parts are read only at scrape time.
func newMetrics(a *APIServer, embedded bool, log *slog.Logger) (http.Handler, *kvstore.Metrics) {
	reg := prometheus.NewRegistry()
	kv := kvstore.NewMetrics()
	reg.MustRegister(kv, serverCollector{a})
	var g prometheus.Gatherer = reg
	if embedded {
		// The embedded etcd registered its metrics (and the Go and process
		// collectors) globally.
		g = prometheus.Gatherers{reg, prometheus.DefaultGatherer}
	} else {
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, ErrorLog: promutil.ErrorLog(log)}), kv
}

type serverCollector struct{ a *APIServer }

func (c serverCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range serverDescs {
		ch <- d
	}
}

func (c serverCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	if a.Server == nil || a.Mirror == nil || a.Services == nil || a.LBIPAM == nil {
		return // still starting
	}
	gauge, counter := promutil.Gauge(ch), promutil.Counter(ch)
	info := a.Server.Info()
	etcd := "external"
	if info.Embedded {
		etcd = "embedded"
	}
	gauge(descInfo, 1, info.Cluster, strconv.FormatUint(uint64(info.ClusterID), 10), etcd)
	gauge(descEtcdUp, promutil.Bool(a.etcdAnswers(context.Background()) == nil))

	remotes := a.Mirror.Status()
	gauge(descRemote, float64(len(remotes)))
	for _, r := range remotes {
		name := r.Cluster
		for _, st := range mirrorStates {
			gauge(descRState, promutil.Bool(r.State == st), name, string(st))
		}
		gauge(descRConnected, promutil.Bool(r.Connected), name)
		gauge(descRReady, promutil.Bool(r.Ready), name)
		for kind, v := range map[string]struct {
			synced bool
			n      int
		}{
			"nodes": {r.Synced.Nodes, r.Nodes}, "endpoints": {r.Synced.Endpoints, r.Endpoints},
			"identities": {r.Synced.Identities, r.Identities}, "services": {r.Synced.Services, r.Services},
		} {
			gauge(descRSynced, promutil.Bool(v.synced), name, kind)
			gauge(descRRecords, float64(v.n), name, kind)
		}
		gauge(descRInvalid, float64(r.Invalid), name)
		counter(descRSkipped, float64(r.Skipped), name)
		for _, reason := range records.Reasons {
			gauge(descRRefused, float64(r.Refused[reason]), name, reason)
			counter(descRRefusals, float64(r.RefusedTotal[reason]), name, reason)
		}
		gauge(descRError, promutil.Bool(r.CurrentError() != ""), name)
		gauge(descRErrorTime, promutil.UnixSeconds(r.LastErrorTime), name)
		gauge(descRContact, promutil.UnixSeconds(r.LastContact), name)
	}

	s := a.Services.Stats()
	gauge(descSvcRecords, float64(s.Services))
	counter(descSvcSyncs, float64(s.Syncs))
	counter(descSvcPuts, float64(s.Puts))
	counter(descSvcDeletes, float64(s.Deletes))
	counter(descSvcInvalid, float64(s.Invalid))
	gauge(descSvcError, promutil.Bool(s.LastErr != ""))
	gauge(descSvcLast, promutil.UnixSeconds(s.LastSync))

	lb := a.LBIPAM.Stats()
	for _, p := range lb.Pools {
		gauge(descLBUsed, float64(p.Used), p.Name)
		gauge(descLBTotal, p.Total, p.Name)
		gauge(descLBKept, float64(p.Kept), p.Name)
	}
	gauge(descLBServices, float64(lb.Services))
	gauge(descLBRefused, float64(lb.Refused))
	counter(descLBInvalid, float64(lb.Invalid))
	gauge(descLBError, promutil.Bool(lb.LastErr != ""))
}

// etcdAnswers reads the server's info key: etcd is up, serving, and lets
// the server in.
func (a *APIServer) etcdAnswers(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, etcdProbeTimeout)
	defer cancel()
	_, _, err := a.Server.Client().Get(ctx, etcdserver.InfoKey)
	return err
}

// probeMux serves /metrics, /healthz and /readyz.
func (a *APIServer) probeMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", a.metrics)
	// Liveness: the process serves. etcd trouble is readiness, not a
	// reason to restart the server.
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := a.etcdAnswers(r.Context()); err != nil {
			http.Error(w, "not ready:\netcd: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}
