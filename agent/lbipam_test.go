package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

const lbPool = `
apiVersion: isthmus.io/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: blue}
spec:
  blocks: [{cidr: 192.0.2.0/28}, {cidr: "2001:db8::/124"}]
`

func lbService(name, vips string, extra ...string) string {
	return "---\napiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: " + name + "}\nspec:\n  vips: [" + vips +
		"]\n  ports: [{port: 80}]\n  type: LoadBalancer\n" + strings.Join(extra, "")
}

// newAgent is start/startMesh that also returns the Agent, to read the
// desired state the reconcilers get.
func newAgent(t *testing.T, cfg Config, dp *agenttest.FakeDatapath) (*Agent, *api.Client, func()) {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.plumb = agenttest.NewFakePlumber()
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	ips := cfg.NodeIPs
	if len(ips) == 0 {
		ips = []netip.Addr{nodeIP}
	}
	a.nodeAddrs = func() ([]netip.Addr, error) { return ips, nil }
	fr := agenttest.NewFakeRouter()
	a.newRouter = func() (routes.Router, error) { return fr, nil }
	c, stop := launch(t, a)
	return a, c, stop
}

// lbStatus returns the status of service default/name in the objects the
// reconcilers read, and the objects' generation.
func lbStatus(a *Agent, name string) (objects.LoadBalancerStatus, uint64, bool) {
	objs, gen := a.objectsGen()
	s, ok := objs["Service/default/"+name].(*objects.Service)
	if !ok {
		return objects.LoadBalancerStatus{}, gen, false
	}
	return s.Status.LoadBalancer, gen, true
}

func ingress(st objects.LoadBalancerStatus) string {
	var out []string
	for _, in := range st.Ingress {
		out = append(out, in.IP+"@"+in.Pool)
	}
	return strings.Join(out, ",")
}

// waitLB waits until the reconcilers' objects show default/name with
// the addresses want and a refusal containing refused.
func waitLB(t *testing.T, a *Agent, name, want, refused string) uint64 {
	t.Helper()
	var gen uint64
	waitFor(t, "LB status of "+name, func() (bool, string) {
		st, g, ok := lbStatus(a, name)
		gen = g
		return ok && ingress(st) == want && strings.Contains(st.Refused, refused) && (refused != "" || st.Refused == ""), fmt.Sprintf("%+v (present %v)", st, ok)
	})
	return gen
}

// getStatus returns what `isthmus get KIND NAME -o json` prints.
func getObject(t *testing.T, c *api.Client, kind, name string) map[string]any {
	t.Helper()
	objs, err := c.ListObjects(context.Background(), kind)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.Name == name {
			var m map[string]any
			if err := json.Unmarshal(o.Object, &m); err != nil {
				t.Fatal(err)
			}
			return m
		}
	}
	t.Fatalf("%s %s not listed", kind, name)
	return nil
}

// Cluster mode against a real clustermesh server: the server's LB-IPAM
// assigns, the agent's watcher fills the status into the services the
// reconcilers get (a new objects generation), `get` shows it, and a
// restart while etcd is away keeps it (the state dir's copy).
func TestClusterModeLBIPAM(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv := servertest.Start(t, "c1", 1, "10.1.0.0/16", "fd00:1::/32")
	cfg := testConfig(t)
	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24"), netip.MustParsePrefix("fd00:1:1::/64")}
	cfg.KVStoreEndpoints = []string{srv.Endpoint()}
	cfg.NodeIPs = []netip.Addr{netip.MustParseAddr("192.0.2.200")}
	b, err := srv.API().Server.ExportNodeBundle(ctx, cfg.NodeName)
	if err != nil {
		t.Fatal(err)
	}
	cfg.KVStoreBundle = t.TempDir()
	if err := b.WriteDir(cfg.KVStoreBundle); err != nil {
		t.Fatal(err)
	}
	dp := agenttest.NewFakeDatapath()
	a, c, stop := newAgent(t, cfg, dp)
	(&meshNode{testNode: &testNode{cfg: cfg, client: c}}).meshSynced(t)

	// Apply waits until this node's watcher delivered the objects as
	// applied; the status LB-IPAM adds must not make it wait for nothing
	// (until reconcile.ConvergeTimeout).
	began := time.Now()
	if _, err := c.Apply(ctx, []byte(lbPool+lbService("web", `10.96.0.10, "fd00:96::10"`))); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(began); took > reconcile.ConvergeTimeout/2 {
		t.Errorf("apply took %s: it waited for objects that carry a status", took)
	}
	gen := waitLB(t, a, "web", "192.0.2.0@blue,2001:db8::@blue", "")
	// A requested address another service holds: the refusal reaches
	// the status, with a new objects generation.
	if _, err := c.Apply(ctx, []byte(lbService("taken", "10.96.0.12", "  loadBalancerIPs: [192.0.2.0]\n"))); err != nil {
		t.Fatal(err)
	}
	if g := waitLB(t, a, "taken", "", "loadBalancerIP 192.0.2.0 is in use by service default/web"); g == gen {
		t.Error("the objects generation did not move with the assignments")
	}

	// `isthmus get service web -o json` shows the addresses; the pool its usage.
	st := getObject(t, c, objects.KindService, "web")["status"]
	if js, _ := json.Marshal(st); !strings.Contains(string(js), `"ip":"192.0.2.0","pool":"blue"`) {
		t.Errorf("get service web: status %s", js)
	}
	ps, _ := json.Marshal(getObject(t, c, objects.KindLoadBalancerIPPool, "blue")["status"])
	if string(ps) != `{"total":"32","used":2}` {
		t.Errorf("get pool blue: status %s, want 2 of 32 used", ps)
	}

	// The copy in the state dir carries the status over a restart while
	// the cluster's etcd is unreachable.
	waitFor(t, "assignments persisted", func() (bool, string) {
		data, err := os.ReadFile(filepath.Join(cfg.StateDir, state.LBIPAMFile))
		return err == nil && strings.Contains(string(data), "192.0.2.0") && strings.Contains(string(data), "is in use by"), string(data)
	})
	stop()
	srv.Proxy.Cut()
	defer srv.Proxy.Restore()
	a2, _, _ := newAgent(t, cfg, dp)
	if st, _, _ := lbStatus(a2, "web"); ingress(st) != "192.0.2.0@blue,2001:db8::@blue" {
		t.Errorf("after a restart without etcd: web's status %+v", st)
	}
}

// Standalone: the agent is LB-IPAM. Addresses are assigned at apply,
// freed by delete, stick across a restart (the state dir); overlapping
// pools are refused and change nothing.
func TestStandaloneLBIPAM(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	dp := agenttest.NewFakeDatapath()
	a, c, stop := newAgent(t, cfg, dp)
	if _, err := c.Apply(ctx, []byte(lbPool+lbService("one", "10.96.0.1")+lbService("two", `10.96.0.2, "fd00:96::2"`))); err != nil {
		t.Fatal(err)
	}
	waitLB(t, a, "one", "192.0.2.0@blue", "")
	waitLB(t, a, "two", "192.0.2.1@blue,2001:db8::@blue", "")

	// A pool overlapping blue is refused, naming both; nothing changes.
	_, err := c.Apply(ctx, []byte(lbService("three", "10.96.0.3")+"---\napiVersion: isthmus.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: green}\nspec:\n  blocks: [{start: 192.0.2.8, stop: 192.0.2.20}]\n"))
	if err == nil || !strings.Contains(err.Error(), "LoadBalancerIPPool green: block 192.0.2.8-192.0.2.20 overlaps block 192.0.2.0-192.0.2.15 of LoadBalancerIPPool blue") {
		t.Fatalf("overlapping pool: %v", err)
	}
	if _, _, ok := lbStatus(a, "three"); ok {
		t.Fatal("a refused batch was partly applied")
	}

	// one goes; two keeps its address; a refused request says why.
	if err := c.DeleteObject(ctx, objects.KindService, "default", "one"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, []byte(lbService("four", "10.96.0.4", "  loadBalancerIPs: [192.0.2.1]\n"))); err != nil {
		t.Fatal(err)
	}
	waitLB(t, a, "two", "192.0.2.1@blue,2001:db8::@blue", "")
	waitLB(t, a, "four", "", "loadBalancerIP 192.0.2.1 is in use by service default/two")

	// After a restart two keeps 192.0.2.1 although 192.0.2.0 is free and
	// lower; a new service gets 192.0.2.0.
	stop()
	a2, c2, _ := newAgent(t, cfg, dp)
	waitLB(t, a2, "two", "192.0.2.1@blue,2001:db8::@blue", "")
	if _, err := c2.Apply(ctx, []byte(lbService("five", "10.96.0.5"))); err != nil {
		t.Fatal(err)
	}
	waitLB(t, a2, "five", "192.0.2.0@blue", "")
	js, _ := json.Marshal(getObject(t, c2, objects.KindService, "four")["status"])
	if !strings.Contains(string(js), "is in use by service default/two") {
		t.Errorf("get service four: status %s", js)
	}
}
