package agent

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/cniinstall"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
)

// The agent's side of the CNI plugin: adds keyed by container ID (repeat,
// replace), deletes conditional on it, GC of CNI endpoints only, the
// labels hook, and the conflist written at start.
func TestCNIEndpoints(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	cfg.CNI = cniinstall.Config{ConfDir: filepath.Join(t.TempDir(), "net.d")}
	podLabels := map[string]map[string]string{"web": {"app": "web", "k8s.namespace": "default"}}
	cfg.LabelsFor = func(_ context.Context, ns, name, uid string) (map[string]string, error) {
		if l, ok := podLabels[name]; ok {
			return l, nil
		}
		return nil, errors.New("pod " + ns + "/" + name + " (" + uid + ") not known yet")
	}
	plumb := agenttest.NewFakePlumber()
	n := start(t, cfg, agenttest.NewFakeDatapath(), plumb)
	c := n.client

	data, err := os.ReadFile(filepath.Join(cfg.CNI.ConfDir, cniinstall.ConfListName))
	if err != nil || !strings.Contains(string(data), `"agentSocket": "`+cfg.SocketPath+`"`) {
		t.Errorf("conflist: %s, %v", data, err)
	}

	req := api.EndpointRequest{Name: "web", Netns: "/netns/web-1", ContainerID: "c1", PodUID: "uid-1"}
	first, err := c.AddEndpoint(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if first.ContainerID != "c1" || first.PodUID != "uid-1" || first.Labels["app"] != "web" || first.IfName != "" {
		t.Errorf("first add: %+v", first)
	}
	again, err := c.AddEndpoint(ctx, req)
	if err != nil || again.ID != first.ID || len(plumb.Links) != 1 {
		t.Errorf("repeated add: %+v, %v (links %v)", again, err, plumb.Links)
	}
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web-1", ContainerID: "c1", IfName: "net1"}); api.StatusOf(err) != http.StatusConflict {
		t.Errorf("same container, another interface: %v", err)
	}

	// The sandbox is recreated: a new container ID replaces the endpoint.
	req2 := api.EndpointRequest{Name: "web", Netns: "/netns/web-2", ContainerID: "c2"}
	second, err := c.AddEndpoint(ctx, req2)
	if err != nil {
		t.Fatal(err)
	}
	if second.ContainerID != "c2" || second.ID == first.ID || second.Netns != "/netns/web-2" {
		t.Errorf("replacing add: %+v", second)
	}
	// A late DEL of the old sandbox leaves the new one alone.
	if err := c.DeleteEndpointOf(ctx, "default", "web", "c1"); err != nil {
		t.Errorf("delete of the old container: %v", err)
	}
	if eps, _ := c.ListEndpoints(ctx); len(eps) != 1 || eps[0].ContainerID != "c2" {
		t.Errorf("after the old container's delete: %+v", eps)
	}
	// Each add's duration as the API handled it, in the list too (the
	// replaced endpoint's is forgotten).
	if first.AddDuration <= 0 || second.AddDuration <= 0 || again.AddDuration != 0 {
		t.Errorf("add durations: first %v, second %v, repeated %v", first.AddDuration, second.AddDuration, again.AddDuration)
	}
	if eps, _ := c.ListEndpoints(ctx); len(eps) != 1 || eps[0].AddDuration != second.AddDuration {
		t.Errorf("listed add duration %+v, want %v", eps, second.AddDuration)
	}

	// The hook's error fails the add with 503 (the plugin: try again later).
	_, err = c.AddEndpoint(ctx, api.EndpointRequest{Name: "new", Netns: "/netns/new", ContainerID: "c3", PodUID: "uid-3"})
	if api.StatusOf(err) != http.StatusServiceUnavailable || !strings.Contains(err.Error(), "labels of pod default/new: pod default/new (uid-3) not known yet") {
		t.Errorf("unknown pod: %v", err)
	}
	// Bad container IDs and interface names are refused.
	for _, r := range []api.EndpointRequest{
		{Name: "bad", Netns: "/netns/bad", ContainerID: "-x"},
		{Name: "bad", Netns: "/netns/bad", ContainerID: "a/b"},
		{Name: "bad", Netns: "/netns/bad", ContainerID: "c4", IfName: "a-name-longer-than-15"},
	} {
		if _, err := c.AddEndpoint(ctx, r); api.StatusOf(err) != http.StatusBadRequest {
			t.Errorf("%+v: %v, want 400", r, err)
		}
	}

	// The CLI: its endpoints have no container ID; a duplicate is still a
	// conflict, also for a CNI add of the same name.
	cli, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "cli", Netns: "/netns/cli", Labels: map[string]string{"app": "cli"}})
	if err != nil || cli.ContainerID != "" {
		t.Fatalf("CLI add: %+v, %v", cli, err)
	}
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "cli", Netns: "/netns/cli2"}); api.StatusOf(err) != http.StatusConflict {
		t.Errorf("CLI duplicate: %v", err)
	}
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "cli", Netns: "/netns/cli2", ContainerID: "c5"}); api.StatusOf(err) != http.StatusConflict {
		t.Errorf("CNI add over a CLI endpoint: %v", err)
	}
	podLabels["leak"] = map[string]string{"app": "leak"}
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "leak", Netns: "/netns/leak", ContainerID: "c6", IfName: "net1"}); err != nil {
		t.Fatal(err)
	}

	// GC: only CNI endpoints whose container is not valid.
	gc, err := c.CollectEndpoints(ctx, api.GCRequest{Valid: []string{"c2"}})
	if err != nil || len(gc.Removed) != 1 || gc.Removed[0].Name != "leak" || gc.Removed[0].IfName != "net1" || len(gc.Errors) != 0 {
		t.Errorf("GC: %+v, %v", gc, err)
	}
	if _, ok := plumb.Links[endpoint.HostIfName("node1", "default", "leak")]; ok {
		t.Error("GC left the veth of the collected endpoint")
	}
	eps, _ := c.ListEndpoints(ctx)
	if len(eps) != 2 {
		t.Errorf("after GC: %+v", eps)
	}
	// DEL: the right container deletes; a missing endpoint is not found.
	if err := c.DeleteEndpointOf(ctx, "default", "web", "c2"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteEndpointOf(ctx, "default", "web", "c2"); !api.IsNotFound(err) {
		t.Errorf("second delete: %v", err)
	}
	if err := c.DeleteEndpoint(ctx, "default", "cli"); err != nil {
		t.Errorf("CLI delete: %v", err)
	}
}
