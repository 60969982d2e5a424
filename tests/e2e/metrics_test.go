package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// inNetns is an HTTP client whose connections are dialled inside ns, as a
// Prometheus running in the node's network would scrape.
func inNetns(ns *lab.Netns) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := ns.Do(func() (err error) {
				var d net.Dialer
				c, err = d.DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
}

// overSocket is an HTTP client of an agent's API socket.
func overSocket(path string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

// getText returns the status and body of a GET.
func getText(c *http.Client, url string) (int, string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// localURL is the loopback URL of a listen address like ":9962".
func localURL(listen, path string) string {
	_, port, _ := net.SplitHostPort(listen)
	return "http://127.0.0.1:" + port + path
}

// A real agent serves /metrics on its default TCP address inside the node's
// network namespace and on its API socket, both parsed with the Prometheus
// text parser; a connection the policy denies raises the policy-drop
// counter; /readyz and /healthz answer 200.
func TestMetricsCountPolicyDrops(t *testing.T) {
	n := startNode(t)
	client := n.addPod("client", map[string]string{"app": "client"})
	server := n.addPod("server", map[string]string{"app": "server"})
	other := n.addPod("other", map[string]string{"app": "other"})
	serveTCP(t, server.Netns, 8080, echo)
	to := netip.AddrPortFrom(server.IPv4, 8080)
	tcpClient := inNetns(n.node.Netns)
	metricsURL := localURL(agent.DefaultMetricsAddr, "/metrics")

	step(t, "the agent is ready and healthy on %s inside the node's namespace", agent.DefaultMetricsAddr)
	for _, path := range []string{"/readyz", "/healthz"} {
		code, body, err := getText(tcpClient, localURL(agent.DefaultMetricsAddr, path))
		if err != nil || code != http.StatusOK || body != "ok\n" {
			t.Fatalf("GET %s: %d %q %v; want 200 ok", path, code, body, err)
		}
	}
	sock := overSocket(n.agent.Socket)
	if code, body, err := getText(sock, "http://agent/readyz"); err != nil || code != http.StatusOK {
		t.Fatalf("GET /readyz on the API socket: %d %q %v", code, body, err)
	}

	step(t, "apply NetworkPolicy server-from-client: only app=client reaches app=server on tcp/8080")
	n.apply(serverPolicy)
	if err := eventually(enforceWithin, func() error { return connectTimesOut(other.Netns, to, 500*time.Millisecond) }); err != nil {
		t.Fatalf("other -> server:8080 is not dropped after the apply: %v", err)
	}
	if err := eventually(enforceWithin, func() error { return tcpEcho(client.Netns, to) }); err != nil {
		t.Fatalf("client -> server:8080 is allowed but failed: %v", err)
	}

	step(t, "scrape /metrics over TCP and over the API socket")
	before, err := promtest.Get(tcpClient, metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	viaSocket, err := promtest.Get(sock, "http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	cliOut, err := n.agent.CLI(n.ctx, "metrics")
	if err != nil {
		t.Fatal(err)
	}
	viaCLI, err := promtest.Parse(bytes.NewReader(cliOut))
	if err != nil {
		t.Fatalf("isthmus metrics: %v", err)
	}
	for _, fams := range []promtest.Families{before, viaSocket, viaCLI} {
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"isthmus_agent_endpoints", nil, 3},
			{"isthmus_agent_network_policies", nil, 1},
			{"isthmus_agent_ready", nil, 1},
			{"isthmus_agent_reconcile_failing", nil, 0},
			{"isthmus_agent_info", []string{"node", n.node.NodeName(), "mode", "standalone"}, 1},
		} {
			if got := fams.Must(t, c.name, c.labels...); got != c.want {
				t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
			}
		}
	}
	if v := before.Must(t, "isthmus_datapath_forward_packets_total", "reason", "forward_local"); v == 0 {
		t.Error("no packet counted as forward_local after the client's echo to a pod of the same node")
	}
	if v := before.Must(t, "isthmus_datapath_policy_entries"); v == 0 {
		t.Error("policy map empty with a policy applied")
	}
	drops := before.Must(t, "isthmus_datapath_drop_packets_total", "reason", "drop_policy_ingress")

	step(t, "a denied connection (other -> server:8080) raises isthmus_datapath_drop_packets_total{reason=drop_policy_ingress}")
	if err := connectTimesOut(other.Netns, to, deniedDial); err != nil {
		t.Fatal(err)
	}
	after, err := promtest.Get(tcpClient, metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Must(t, "isthmus_datapath_drop_packets_total", "reason", "drop_policy_ingress"); got <= drops {
		t.Errorf("drop_policy_ingress did not rise over a denied connection: %v before, %v after", drops, got)
	} else {
		t.Logf("isthmus_datapath_drop_packets_total{reason=drop_policy_ingress}: %v -> %v", drops, got)
	}
	if got, want := after.Must(t, "isthmus_datapath_drop_packets_total", "reason", "drop_policy_ingress"), float64(n.counter("drop_policy_ingress")); got > want {
		t.Errorf("metrics count %v policy drops, the status (read later) %v", got, want)
	}
}

// In a cluster, the agent's metrics show the kvstore, the mesh and the
// WireGuard peers (with a handshake after pod traffic across nodes), and
// the cluster's isthmus-clustermesh serves its own /metrics on its default
// address inside the router's namespace.
func TestMetricsCluster(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	step(t, "building cluster c1 with two nodes (WireGuard) and its server")
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 2, Encryption: "wireguard"})
	if err != nil {
		t.Fatal(err)
	}
	srv := inNetns(c.Router.Netns)

	step(t, "the server is ready, and its /metrics parses")
	if code, body, err := getText(srv, localURL(server.DefaultMetricsListen, "/readyz")); err != nil || code != http.StatusOK {
		t.Fatalf("server GET /readyz: %d %q %v", code, body, err)
	}
	fams, err := promtest.Get(srv, localURL(server.DefaultMetricsListen, "/metrics"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"isthmus_clustermesh_info", []string{"cluster", "c1", "etcd", "embedded"}, 1},
		{"isthmus_clustermesh_etcd_up", nil, 1},
		{"isthmus_clustermesh_remotes", nil, 0},
	} {
		if got := fams.Must(t, c.name, c.labels...); got != c.want {
			t.Errorf("server %s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if v := fams.Must(t, "isthmus_kvstore_operations_total", "operation", "put"); v == 0 {
		t.Error("server: no kvstore puts counted (the heartbeat writes)")
	}
	if _, ok := fams["etcd_server_has_leader"]; !ok {
		t.Error("server: the embedded etcd's metrics are missing")
	}

	step(t, "the agent is connected, its own cluster synced and both nodes known, in its metrics")
	a := c.Agents[0]
	node := inNetns(c.Nodes[0].Netns)
	if err := eventually(30*time.Second, func() error {
		fams, err = promtest.Get(node, localURL(agent.DefaultMetricsAddr, "/metrics"))
		if err != nil {
			return err
		}
		for _, m := range []string{"isthmus_agent_kvstore_connected", "isthmus_agent_kvstore_published", "isthmus_agent_ready"} {
			if v, _ := fams.Value(m); v != 1 {
				return fmt.Errorf("%s = %v", m, v)
			}
		}
		if v, _ := fams.Value("isthmus_agent_mesh_cluster_synced", "cluster", "c1"); v != 1 {
			return fmt.Errorf("isthmus_agent_mesh_cluster_synced{cluster=c1} = %v", v)
		}
		// The other node publishes on its own schedule.
		if v, _ := fams.Value("isthmus_agent_mesh_cluster_nodes", "cluster", "c1"); v != 2 {
			return fmt.Errorf("isthmus_agent_mesh_cluster_nodes{cluster=c1} = %v, want 2", v)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if v := fams.Must(t, "isthmus_kvstore_operations_total", "operation", "get_prefix"); v == 0 {
		t.Error("agent: no kvstore lists counted")
	}
	code, body, err := getText(overSocket(a.Socket), "http://agent/readyz")
	if err != nil || code != http.StatusOK || !strings.Contains(body, "ready") {
		t.Errorf("agent GET /readyz on the socket: %d %q %v", code, body, err)
	}

	step(t, "pod traffic to the other node: a WireGuard handshake and bytes, per peer")
	peer := "c1/" + c.Nodes[1].NodeName()
	client, err := a.AddPod(ctx, "client", "default", map[string]string{"app": "client"})
	if err != nil {
		t.Fatal(err)
	}
	server, err := c.Agents[1].AddPod(ctx, "server", "default", map[string]string{"app": "server"})
	if err != nil {
		t.Fatal(err)
	}
	serveTCP(t, server.Netns, 8080, echo)
	if err := eventually(20*time.Second, func() error { return tcpEcho(client.Netns, netip.AddrPortFrom(server.IPv4, 8080)) }); err != nil {
		t.Fatalf("client on %s -> server on %s: %v", c.Nodes[0].Name(), c.Nodes[1].Name(), err)
	}
	if fams, err = promtest.Get(node, localURL(agent.DefaultMetricsAddr, "/metrics")); err != nil {
		t.Fatal(err)
	}
	if v := fams.Must(t, "isthmus_agent_wireguard_peers"); v != 1 {
		t.Errorf("WireGuard peers = %v, want 1", v)
	}
	if v := fams.Must(t, "isthmus_agent_wireguard_peer_last_handshake_timestamp_seconds", "node", peer); time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("last handshake with %s at %v", peer, v)
	}
	for _, m := range []string{"isthmus_agent_wireguard_peer_tx_bytes_total", "isthmus_agent_wireguard_peer_rx_bytes_total"} {
		if v := fams.Must(t, m, "node", peer); v < 3000 {
			t.Errorf("%s{node=%s} = %v after a 3000-byte echo", m, peer, v)
		}
	}
}
