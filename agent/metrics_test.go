package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
)

// droppingDP is the fake datapath with a policy-drop counter that the test
// raises, like a denied connection does.
type droppingDP struct {
	*agenttest.FakeDatapath
	drops atomic.Uint64
}

func (d *droppingDP) Metrics() (map[bpf.Reason]bpf.Counter, error) {
	m, err := d.FakeDatapath.Metrics()
	n := d.drops.Load()
	m[bpf.ReasonDropPolicyIngr] = bpf.Counter{Packets: n, Bytes: 60 * n}
	return m, err
}

// runAgent runs an agent on dp (any datapath) until the test ends.
func runAgent(t *testing.T, cfg Config, dp datapath.Datapath) *Agent {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.plumb = agenttest.NewFakePlumber()
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	a.nodeAddrs = func() ([]netip.Addr, error) { return []netip.Addr{nodeIP}, nil }
	a.newRouter = func() (routes.Router, error) { return agenttest.NewFakeRouter(), nil }
	launch(t, a)
	return a
}

// socketClient talks HTTP to the agent's API socket.
func socketClient(path string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

// /metrics on the API socket: the datapath counters by reason, map sizes,
// desired state and the reconciler, every family with HELP; the drop
// counter follows the datapath's; /readyz is 200 once reconciled.
func TestMetricsStandalone(t *testing.T) {
	dp := &droppingDP{FakeDatapath: agenttest.NewFakeDatapath()}
	cfg := testConfig(t)
	runAgent(t, cfg, dp)
	hc := socketClient(cfg.SocketPath)
	ctx := context.Background()
	if _, err := api.NewClient(cfg.SocketPath).AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := api.NewClient(cfg.SocketPath).Apply(ctx, []byte(webService+"---\n"+serverPolicy)); err != nil {
		t.Fatal(err)
	}

	fams, err := promtest.Get(hc, "http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for name := range fams {
		if strings.HasPrefix(name, "isthmus_") && fams.Help(name) == "" {
			t.Errorf("%s has no HELP text", name)
		}
	}
	ipc, _ := dp.IPCacheList()
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"isthmus_datapath_forward_packets_total", []string{"reason", "forward_local"}, 5},
		{"isthmus_datapath_forward_bytes_total", []string{"reason", "forward_local"}, 500},
		{"isthmus_datapath_drop_packets_total", []string{"reason", "drop_policy_egress"}, 2},
		{"isthmus_datapath_drop_packets_total", []string{"reason", "drop_policy_ingress"}, 0},
		{"isthmus_datapath_conntrack_entries", nil, 3},
		{"isthmus_datapath_ipcache_entries", nil, float64(len(ipc))},
		{"isthmus_datapath_service_frontends", nil, 2},
		{"isthmus_agent_info", []string{"node", "node1", "cluster", "c1", "cluster_id", "1", "mode", "standalone"}, 1},
		{"isthmus_agent_ready", nil, 1},
		{"isthmus_agent_endpoints", nil, 1},
		{"isthmus_agent_identities", nil, 1},
		{"isthmus_agent_services", nil, 1},
		{"isthmus_agent_network_policies", nil, 1},
		{"isthmus_agent_reconcile_errors_total", nil, 0},
		{"isthmus_agent_reconcile_failing", nil, 0},
		{"isthmus_agent_reconcile_pending", nil, 0},
		{"isthmus_endpoint_add_seconds", nil, 1}, // the count of adds
	} {
		if got := fams.Must(t, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if runs := fams.Must(t, "isthmus_agent_reconcile_runs_total"); runs < 3 {
		t.Errorf("reconcile runs = %v after start, add and apply", runs)
	}
	if n := fams.Must(t, "isthmus_agent_reconcile_duration_seconds"); n != fams.Must(t, "isthmus_agent_reconcile_runs_total") {
		t.Errorf("reconcile duration count %v != runs", n)
	}
	// The follow-up loop runs after every reconcile run (at start too).
	if runs := fams.Must(t, "isthmus_agent_followup_runs_total"); runs < 1 {
		t.Errorf("follow-up runs = %v after start", runs)
	}
	if n := fams.Must(t, "isthmus_agent_followup_duration_seconds"); n != fams.Must(t, "isthmus_agent_followup_runs_total") {
		t.Errorf("follow-up duration count %v != runs", n)
	}
	if ts := fams.Must(t, "isthmus_agent_reconcile_last_success_timestamp_seconds"); time.Since(time.Unix(int64(ts), 0)) > time.Minute {
		t.Errorf("last success at %v", ts)
	}
	if _, ok := fams.Value("isthmus_datapath_forward_packets_total", "reason", "drop_policy_egress"); ok {
		t.Error("a drop reason is exported as a forward")
	}
	for _, name := range []string{"isthmus_agent_kvstore_connected", "isthmus_kvstore_operations_total", "isthmus_agent_wireguard_peers"} {
		if _, ok := fams[name]; ok {
			t.Errorf("standalone agent without encryption exports %s", name)
		}
	}
	if _, ok := fams["go_goroutines"]; !ok {
		t.Error("no Go runtime metrics")
	}

	dp.drops.Add(7)
	fams, err = promtest.Get(hc, "http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if got := fams.Must(t, "isthmus_datapath_drop_packets_total", "reason", "drop_policy_ingress"); got != 7 {
		t.Errorf("policy drops after 7 denied packets = %v", got)
	}

	if code, body := agenttest.Get(t, hc, "http://agent/readyz"); code != http.StatusOK || !strings.Contains(body, `"ready"`) {
		t.Errorf("GET /readyz = %d %s", code, body)
	}
	if code, body := agenttest.Get(t, hc, "http://agent/healthz"); code != http.StatusOK {
		t.Errorf("GET /healthz = %d %s", code, body)
	}
	resp, err := hc.Post("http://agent/metrics", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics = %s, want 405", resp.Status)
	}
}

// A bound metrics port fails the start with an error naming the flag.
func TestMetricsPortTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := testConfig(t)
	cfg.MetricsAddr = ln.Addr().String()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.openDatapath = func(Config) (datapath.Datapath, error) { return agenttest.NewFakeDatapath(), nil }
	a.plumb = agenttest.NewFakePlumber()
	err = a.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "--metrics-addr "+cfg.MetricsAddr) {
		t.Errorf("Run with the metrics port taken = %v, want an error naming --metrics-addr", err)
	}
}

// Cluster mode adds the kvstore client's metrics and the mesh's per-cluster
// state; /readyz waits for etcd.
func TestMetricsClusterMode(t *testing.T) {
	// First without etcd: not ready, saying why.
	cfg := testConfig(t)
	cfg.KVStoreEndpoints = []string{"http://" + etcdtest.FreeAddr(t)}
	cfg.NodeIPs = []netip.Addr{netip.MustParseAddr("192.0.2.11")}
	runAgent(t, cfg, agenttest.NewFakeDatapath())
	hc := socketClient(cfg.SocketPath)
	code, body := agenttest.Get(t, hc, "http://agent/readyz")
	var e struct{ Error string }
	if err := json.Unmarshal([]byte(body), &e); err != nil || code != http.StatusServiceUnavailable ||
		!strings.Contains(e.Error, "not connected to the cluster's kvstore") {
		t.Errorf("GET /readyz without etcd = %d %s", code, body)
	}
	fams, err := promtest.Get(hc, "http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if fams.Must(t, "isthmus_agent_kvstore_connected") != 0 || fams.Must(t, "isthmus_agent_ready") != 0 {
		t.Error("connected or ready without etcd")
	}

	// Then with etcd.
	e2 := etcdtest.Start(t)
	kv := kvClient(t, e2)
	writeClusterConfig(t, kv, "c1", 1, "10.1.0.0/16", "fd00:1::/48")
	n := startMesh(t, meshConfig(t, e2, "n1", "192.0.2.11", "10.1.1.0/24", "fd00:1:0:1::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n.meshSynced(t)
	if _, err := n.client.AddEndpoint(context.Background(), api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}}); err != nil {
		t.Fatal(err)
	}
	hc = socketClient(n.cfg.SocketPath)
	waitFor(t, "the endpoint in the mesh metrics", func() (bool, string) {
		fams, err = promtest.Get(hc, "http://agent/metrics")
		if err != nil {
			return false, err.Error()
		}
		// The node and ipcache records come through separate watches:
		// wait for both.
		v, _ := fams.Value("isthmus_agent_mesh_cluster_endpoints", "cluster", "c1")
		nodes, _ := fams.Value("isthmus_agent_mesh_cluster_nodes", "cluster", "c1")
		p, _ := fams.Value("isthmus_agent_kvstore_published")
		return v == 2 && nodes == 1 && p == 1, fmt.Sprintf("endpoints %v, nodes %v, published %v", v, nodes, p)
	})
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"isthmus_agent_kvstore_connected", nil, 1},
		{"isthmus_agent_ready", nil, 1},
		{"isthmus_agent_info", []string{"mode", "cluster"}, 1},
		{"isthmus_agent_mesh_cluster_synced", []string{"cluster", "c1"}, 1},
		{"isthmus_agent_mesh_cluster_nodes", []string{"cluster", "c1"}, 1},
		{"isthmus_agent_mesh_cluster_identities", []string{"cluster", "c1"}, 1},
		{"isthmus_agent_mesh_cluster_invalid_records_total", []string{"cluster", "c1"}, 0},
		{"isthmus_agent_mesh_route_error", nil, 0},
		{"isthmus_kvstore_operation_errors_total", []string{"operation", "put"}, 0},
	} {
		if got := fams.Must(t, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if got := fams.Must(t, "isthmus_kvstore_operations_total", "operation", "get_prefix"); got < 1 {
		t.Errorf("the agent's watches' lists were not counted: get_prefix = %v", got)
	}
	if got := fams.Must(t, "isthmus_kvstore_watches"); got < 1 {
		t.Errorf("kvstore watches = %v", got)
	}
	if code, body := agenttest.Get(t, hc, "http://agent/readyz"); code != http.StatusOK {
		t.Errorf("GET /readyz connected and synced = %d %s", code, body)
	}
}
