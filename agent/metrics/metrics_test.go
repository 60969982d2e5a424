package metrics

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
)

// The TCP listener serves the same metrics and plain-text probes (a bound
// port failing the agent's start is tested in package agent).
func TestTCPListener(t *testing.T) {
	rec := reconcile.New()
	dp := agenttest.NewFakeDatapath()
	m := New(Sources{
		Node: "node1", Cluster: "c1", ClusterID: 1, Log: slog.Default(),
		Datapath:       func() datapath.Datapath { return dp },
		Desired:        func() Counts { return Counts{} },
		Reconcile:      rec.Stats,
		IPCacheEntries: func() int { return 0 },
		ClusterMesh:    func() *api.ClusterMeshStatus { return nil },
		WireGuard:      func() *api.WireGuardStatus { return nil },
	})
	ms, err := m.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ms.Serve(ctx, slog.Default()); close(done) }()
	defer func() { cancel(); <-done }()
	base := "http://" + ms.Addr()

	if code, body := agenttest.Get(t, http.DefaultClient, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "no successful reconcile") {
		t.Errorf("GET /readyz before any reconcile = %d %q, want 503 naming the reconcile", code, body)
	}
	rec.Finish(rec.Start(), nil)
	if code, body := agenttest.Get(t, http.DefaultClient, base+"/readyz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("GET /readyz = %d %q", code, body)
	}
	if code, body := agenttest.Get(t, http.DefaultClient, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("GET /healthz = %d %q", code, body)
	}
	fams, err := promtest.Get(nil, base+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if got := fams.Must(t, "isthmus_agent_reconcile_runs_total"); got != 1 {
		t.Errorf("runs = %v", got)
	}
}

// BIG TCP: a gauge per path and family, the devices left at 65536 by role
// (zero too), the external devices' sizes.
func TestBigTCPMetrics(t *testing.T) {
	dp := agenttest.NewFakeDatapath()
	st := &api.BigTCPStatus{
		Paths: []api.BigTCPPath{{Path: api.BigTCPPathSameNode, Family: "ipv6", On: true}, {Path: api.BigTCPPathOutside, Family: "ipv6", Reason: "tun0 (...)"}},
		Devices: []api.BigTCPDevice{
			{Name: "eth0", Role: "underlay,outside", GSO: 196608, GSOIPv4: 196608},
			{Name: "tun0", Role: "outside", GSO: 65536, GSOIPv4: 65536, Reason: "ipv6: tso_max_size 65536"},
			{Name: "isthabc", Role: "pod-host", Endpoint: "default/a", GSO: 196608},
		},
	}
	m := New(Sources{
		Node: "node1", Cluster: "c1", ClusterID: 1, Log: slog.Default(),
		Datapath:       func() datapath.Datapath { return dp },
		Desired:        func() Counts { return Counts{} },
		Reconcile:      reconcile.New().Stats,
		IPCacheEntries: func() int { return 0 },
		ClusterMesh:    func() *api.ClusterMeshStatus { return nil },
		WireGuard:      func() *api.WireGuardStatus { return nil },
		BigTCP:         func() *api.BigTCPStatus { return st },
	})
	fams := promtest.Scrape(t, m.Handler())
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"isthmus_agent_bigtcp_path_enabled", []string{"path", "same-node", "family", "ipv6"}, 1},
		{"isthmus_agent_bigtcp_path_enabled", []string{"path", "outside", "family", "ipv6"}, 0},
		{"isthmus_agent_bigtcp_devices_at_legacy_size", []string{"role", "outside"}, 1},
		{"isthmus_agent_bigtcp_devices_at_legacy_size", []string{"role", "underlay"}, 0},
		{"isthmus_agent_bigtcp_devices_at_legacy_size", []string{"role", "pod-host"}, 0},
		{"isthmus_agent_bigtcp_device_gso_max_size_bytes", []string{"device", "eth0", "family", "ipv4"}, 196608},
		{"isthmus_agent_bigtcp_device_gso_max_size_bytes", []string{"device", "tun0", "family", "ipv6"}, 65536},
	} {
		if got := fams.Must(t, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if _, ok := fams.Value("isthmus_agent_bigtcp_device_gso_max_size_bytes", "device", "isthabc"); ok {
		t.Error("a pod veth has a series of its own")
	}
}
