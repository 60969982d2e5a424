package server_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
)

// The server's /metrics: the mirror's view of each remote, the kvstore
// client's calls and the embedded etcd's own metrics, parsed as
// Prometheus does; the probes; a taken metrics port fails the start.
func TestMetrics(t *testing.T) {
	c1 := servertest.New(t, "c1", 1, "10.1.0.0/16")
	c1.Config.MetricsListen = "127.0.0.1:0"
	c1.Start(t)
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	base := "http://" + c1.API().MetricsAddr()

	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s = %s", path, resp.Status)
		}
	}

	servertest.Connect(t, c1, c2)
	var fams promtest.Families
	servertest.Eventually(t, 20*time.Second, "c2 ready in c1's metrics", func() error {
		var err error
		if fams, err = promtest.Get(nil, base+"/metrics"); err != nil {
			return err
		}
		if v, _ := fams.Value("isthmus_clustermesh_remote_ready", "cluster", "c2"); v != 1 {
			return fmt.Errorf("isthmus_clustermesh_remote_ready{cluster=c2} = %v", v)
		}
		return nil
	})
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"isthmus_clustermesh_info", []string{"cluster", "c1", "cluster_id", "1", "etcd", "embedded"}, 1},
		{"isthmus_clustermesh_etcd_up", nil, 1},
		{"isthmus_clustermesh_remotes", nil, 1},
		{"isthmus_clustermesh_remote_state", []string{"cluster", "c2", "state", "connected"}, 1},
		{"isthmus_clustermesh_remote_state", []string{"cluster", "c2", "state", "unreachable"}, 0},
		{"isthmus_clustermesh_remote_connected", []string{"cluster", "c2"}, 1},
		{"isthmus_clustermesh_remote_synced", []string{"cluster", "c2", "kind", "identities"}, 1},
		{"isthmus_clustermesh_remote_records", []string{"cluster", "c2", "kind", "nodes"}, 0},
		{"isthmus_clustermesh_remote_invalid_records", []string{"cluster", "c2"}, 0},
		{"isthmus_clustermesh_remote_refused_records", []string{"cluster", "c2", "reason", "prefix-not-owned"}, 0},
		{"isthmus_clustermesh_remote_refused_records_total", []string{"cluster", "c2", "reason", "over-cap"}, 0},
		{"isthmus_clustermesh_remote_error", []string{"cluster", "c2"}, 0},
		{"isthmus_clustermesh_service_sync_error", nil, 0},
	} {
		if got := fams.Must(t, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if v := fams.Must(t, "isthmus_clustermesh_remote_last_contact_timestamp_seconds", "cluster", "c2"); time.Since(time.Unix(int64(v), 0)) > time.Minute {
		t.Errorf("last contact %v", v)
	}
	if v := fams.Must(t, "isthmus_kvstore_operations_total", "operation", "put"); v < 1 {
		t.Errorf("the server's etcd writes were not counted: %v", v)
	}
	if _, ok := fams["etcd_server_has_leader"]; !ok {
		t.Error("the embedded etcd's metrics are missing")
	}
	for name := range fams {
		if strings.HasPrefix(name, "isthmus_") && fams.Help(name) == "" {
			t.Errorf("%s has no HELP text", name)
		}
	}

	// A second server on the same metrics address does not start.
	c3 := servertest.New(t, "c3", 3, "10.3.0.0/16")
	c3.Config.MetricsListen = c1.API().MetricsAddr()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if a, err := server.Start(ctx, c3.Config); err == nil {
		a.Close()
		t.Error("a server started on a metrics address in use")
	} else if !strings.Contains(err.Error(), "--metrics-addr "+c3.Config.MetricsListen) {
		t.Errorf("error %q does not name --metrics-addr", err)
	}
}
