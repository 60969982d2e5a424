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
