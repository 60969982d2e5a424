package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

var nodeIP = netip.MustParseAddr("192.0.2.10")

func TestMain(m *testing.M) {
	// The agent logs every step; in tests only what went wrong is of interest.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	os.Exit(m.Run())
}

type testNode struct {
	cfg    Config
	dp     *agenttest.FakeDatapath
	plumb  *agenttest.FakePlumber
	client *api.Client
	stop   func()
}

func testConfig(t *testing.T) Config {
	dir := t.TempDir()
	return Config{
		NodeName: "node1", ClusterName: "c1", ClusterID: 1,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.10.0.0/24"), netip.MustParsePrefix("fd00:10::/64")},
		StateDir: filepath.Join(dir, "state"), SocketPath: filepath.Join(dir, "agent.sock"),
		BPFFSRoot: filepath.Join(dir, "bpffs"), MTU: 1500,
	}
}

// start runs an agent on cfg with the given fakes (the maps of dp survive
// a restart, like pinned maps).
func start(t *testing.T, cfg Config, dp *agenttest.FakeDatapath, plumb *agenttest.FakePlumber) *testNode {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.plumb = plumb
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	a.nodeAddrs = func() ([]netip.Addr, error) { return []netip.Addr{nodeIP}, nil }
	c, stop := launch(t, a)
	return &testNode{cfg: cfg, dp: dp, plumb: plumb, client: c, stop: stop}
}

// launch runs a and returns once its API answers, with a client of the API
// and stop, which ends Run (once; it also runs when the test ends) and
// reports an error of Run.
func launch(t *testing.T, a *Agent) (*api.Client, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	c := api.NewClient(a.cfg.SocketPath)
	deadline := time.Now().Add(10 * time.Second)
	for c.Health(context.Background()) != nil {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("agent did not come up: %v", <-done)
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	return c, stop
}

const webService = `
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: web
spec:
  vips: ["10.96.0.10", "fd00:96::10"]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: web}
`

const serverPolicy = `
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: server
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{port: 8080}]
`

func TestEndpointServicePolicyRestart(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	dp, plumb := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()
	n := start(t, cfg, dp, plumb)
	c := n.client

	web, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	if web.Namespace != "default" || len(web.IPs) != 2 || !netip.MustParsePrefix("10.10.0.0/24").Contains(web.IPs[0]) ||
		identity.ClusterIDOf(web.Identity) != 1 || web.Interface != endpoint.HostIfName("node1", "default", "web") {
		t.Fatalf("endpoint %+v", web)
	}
	client, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "client", Netns: "/netns/client", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	if client.Identity == web.Identity || client.ID == web.ID {
		t.Errorf("endpoints share identity or ID: %+v %+v", web, client)
	}
	if dp.Attached[web.Interface] != web.IfIndex {
		t.Errorf("datapath not attached to %s: %v", web.Interface, dp.Attached)
	}

	// ipcache: endpoints, the node, the world.
	ipc, _ := dp.IPCacheList()
	for p, want := range map[string]uint32{
		web.IPs[0].String() + "/32":     web.Identity,
		web.IPs[1].String() + "/128":    web.Identity,
		client.IPs[0].String() + "/32":  client.Identity,
		"192.0.2.10/32":                 bpf.IdentityHost,
		"0.0.0.0/0":                     bpf.IdentityWorld,
		"::/0":                          bpf.IdentityWorld,
		client.IPs[1].String() + "/128": client.Identity,
	} {
		if got := ipc[netip.MustParsePrefix(p)]; got.Identity != want {
			t.Errorf("ipcache %s = %d, want %d", p, got.Identity, want)
		}
	}
	if len(ipc) != 7 {
		t.Errorf("ipcache has %d entries, want 7: %v", len(ipc), ipc)
	}
	info := dp.EPs[web.IPs[0]]
	if info.ID != web.ID || info.Identity != web.Identity || int(info.IfIndex) != web.IfIndex || info.HostMAC.String() != web.HostMAC || info.PolicyIngress {
		t.Errorf("endpoints map entry %+v for %+v", info, web)
	}

	// Service and policy.
	res, err := c.Apply(ctx, []byte(webService+"---\n"+serverPolicy))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Objects) != 2 || res.Objects[0].Action != api.ActionCreated {
		t.Errorf("apply result %+v", res)
	}
	f4 := bpf.Frontend{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: bpf.ProtoTCP}
	f6 := bpf.Frontend{VIP: netip.MustParseAddr("fd00:96::10"), Port: 80, Proto: bpf.ProtoTCP}
	if got := dp.Svcs[f4]; len(got) != 1 || got[0] != (bpf.Backend{Addr: web.IPs[0], Port: 8080}) {
		t.Errorf("service %s backends %v", f4, got)
	}
	if got := dp.Svcs[f6]; len(got) != 1 || got[0].Addr != web.IPs[1] {
		t.Errorf("service %s backends %v", f6, got)
	}
	if !dp.EPs[web.IPs[0]].PolicyIngress || dp.EPs[client.IPs[0]].PolicyIngress || dp.EPs[web.IPs[0]].PolicyEgress {
		t.Errorf("enforcement flags: web %+v client %+v", dp.EPs[web.IPs[0]], dp.EPs[client.IPs[0]])
	}
	wantKey := bpf.PolicyKey{EndpointID: web.ID, PeerIdentity: client.Identity, Port: 8080, Proto: bpf.ProtoTCP, Direction: bpf.Ingress}
	if !dp.Pol[wantKey] || len(dp.Pol) != 1 {
		t.Errorf("policy map %v, want only %+v", dp.Pol, wantKey)
	}

	// Applying the same again changes nothing.
	dp.TakeWrites()
	res, err = c.Apply(ctx, []byte(webService))
	if err != nil || res.Objects[0].Action != api.ActionUnchanged {
		t.Errorf("re-apply: %+v, %v", res, err)
	}
	if w := dp.TakeWrites(); len(w) != 0 {
		t.Errorf("re-apply wrote %v", w)
	}

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Endpoints != 2 || st.Services != 1 || st.NetworkPolicies != 1 || st.Frontends != 2 || st.PolicyEntries != 1 ||
		st.Conntrack != 3 || st.AttachMode != "tcx" || len(st.Metrics) != 2 || st.Reconcile.LastError != "" || st.Reconcile.Runs == 0 {
		t.Errorf("status %+v", st)
	}
	ids, _ := c.Identities(ctx)
	var found bool
	for _, id := range ids {
		if id.ID == web.Identity {
			found = true
			if id.Endpoints != 1 || id.Labels["app"] != "web" || id.Labels[identity.LabelNamespace] != "default" || id.Labels[identity.LabelCluster] != "c1" {
				t.Errorf("identity %+v", id)
			}
		}
	}
	if !found || ids[0].ID != bpf.IdentityHost {
		t.Errorf("identities %+v", ids)
	}

	// Restart: state comes back, the pinned maps are already right, nothing is written.
	n.stop()
	dp.TakeWrites()
	n = start(t, cfg, dp, plumb)
	if w := dp.TakeWrites(); len(w) != 0 {
		t.Errorf("restart rewrote the datapath: %v", w)
	}
	eps, err := n.client.ListEndpoints(ctx)
	if err != nil || len(eps) != 2 {
		t.Fatalf("endpoints after restart: %+v, %v", eps, err)
	}
	// Addresses are not handed out twice after a restart.
	third, err := n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "third", Netns: "/netns/third"})
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range third.IPs {
		if slices.Contains(web.IPs, ip) || slices.Contains(client.IPs, ip) {
			t.Errorf("address %s handed out twice", ip)
		}
	}
	if third.ID <= client.ID {
		t.Errorf("endpoint ID %d reused (client has %d)", third.ID, client.ID)
	}

	// Deleting the policy switches enforcement off and removes its entries.
	if err := n.client.DeleteObject(ctx, "networkpolicy", "default", "server"); err != nil {
		t.Fatal(err)
	}
	if dp.EPs[web.IPs[0]].PolicyIngress || len(dp.Pol) != 0 {
		t.Errorf("after policy delete: flags %+v, policy %v", dp.EPs[web.IPs[0]], dp.Pol)
	}
	if err := n.client.DeleteObject(ctx, "NetworkPolicy", "default", "server"); !api.IsNotFound(err) {
		t.Errorf("second delete: %v", err)
	}

	// Deleting the web endpoint empties the service and frees everything.
	if err := n.client.DeleteEndpoint(ctx, "default", "web"); err != nil {
		t.Fatal(err)
	}
	if got, ok := dp.Svcs[f4]; !ok || len(got) != 0 {
		t.Errorf("service after backend delete: %v, %v", got, ok)
	}
	if _, ok := dp.EPs[web.IPs[0]]; ok {
		t.Error("endpoints map still has the deleted endpoint")
	}
	if _, ok := dp.IPCache[netip.PrefixFrom(web.IPs[0], 32)]; ok {
		t.Error("ipcache still has the deleted endpoint")
	}
	if _, ok := plumb.Links[web.Interface]; ok {
		t.Error("veth of the deleted endpoint still exists")
	}
	if _, ok := dp.Attached[web.Interface]; ok {
		t.Error("datapath still attached to the deleted endpoint")
	}
	for _, id := range mustIdentities(t, n.client) {
		if id.ID == web.Identity {
			t.Error("identity of the deleted endpoint is still allocated")
		}
	}
	if err := n.client.DeleteEndpoint(ctx, "default", "web"); !api.IsNotFound(err) || err.Error() != "endpoint default/web not found" {
		t.Errorf("second delete: %v", err)
	}
}

func mustIdentities(t *testing.T, c *api.Client) []api.Identity {
	t.Helper()
	ids, err := c.Identities(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func TestBadInputChangesNothing(t *testing.T) {
	ctx := context.Background()
	dp, plumb := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()
	n := start(t, testConfig(t), dp, plumb)
	c := n.client
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, []byte(webService)); err != nil {
		t.Fatal(err)
	}
	dp.TakeWrites()
	before, _ := c.Status(ctx)

	for _, tt := range []struct {
		name   string
		do     func() error
		status int
		msg    string
	}{
		{"duplicate endpoint", func() error {
			_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/other"})
			return err
		}, 409, "endpoint default/web already exists"},
		{"netns in use", func() error {
			_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "web2", Netns: "/netns/web"})
			return err
		}, 409, "netns /netns/web is already used by endpoint default/web"},
		{"missing netns", func() error {
			_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "x", Netns: "/var/run/netns/nope"})
			return err
		}, 400, "netns /var/run/netns/nope does not exist"},
		{"bad name", func() error {
			_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "Bad_Name", Netns: "/netns/x"})
			return err
		}, 400, `endpoint name "Bad_Name" must be a DNS label`},
		{"bad label", func() error {
			_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "x", Netns: "/netns/x", Labels: map[string]string{"app": "a b"}})
			return err
		}, 400, `label value "a b"`},
		{"reserved label", func() error {
			_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "x", Netns: "/netns/x", Labels: map[string]string{identity.LabelCluster: "other"}})
			return err
		}, 400, "set by the agent"},
		{"malformed yaml", func() error {
			_, err := c.Apply(ctx, []byte("kind: [Service\n"))
			return err
		}, 400, "document 1"},
		{"unknown kind", func() error {
			_, err := c.Apply(ctx, []byte("apiVersion: isthmus.io/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n"))
			return err
		}, 400, `unknown kind "Gadget"`},
		{"invalid CIDR/VIP", func() error {
			_, err := c.Apply(ctx, []byte(strings.Replace(webService, "10.96.0.10", "10.96.0.300", 1)))
			return err
		}, 400, "10.96.0.300"},
		{"invalid port", func() error {
			_, err := c.Apply(ctx, []byte(strings.Replace(webService, "port: 80,", "port: 70000,", 1)))
			return err
		}, 400, "70000"},
		{"VIP conflict with an applied service", func() error {
			_, err := c.Apply(ctx, []byte(strings.Replace(webService, "name: web", "name: web-copy", 1)))
			return err
		}, 409, "10.96.0.10"},
		{"VIP conflict inside the batch (first one valid and new)", func() error {
			other := strings.NewReplacer("name: web", "name: a", "10.96.0.10", "10.96.0.20", "fd00:96::10", "fd00:96::20").Replace(webService)
			_, err := c.Apply(ctx, []byte(other+"---\n"+strings.Replace(other, "name: a", "name: b", 1)))
			return err
		}, 409, "10.96.0.20"},
		{"same object twice", func() error {
			_, err := c.Apply(ctx, []byte(webService+"---\n"+webService))
			return err
		}, 400, "appears more than once"},
		{"unknown kind to delete", func() error {
			return c.DeleteObject(ctx, "gadget", "default", "x")
		}, 400, `unknown kind "gadget"`},
	} {
		err := tt.do()
		if api.StatusOf(err) != tt.status || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: got %v (status %d), want %d containing %q", tt.name, err, api.StatusOf(err), tt.status, tt.msg)
		} else {
			t.Logf("%s: %v", tt.name, err)
		}
	}
	after, _ := c.Status(ctx)
	if w := dp.TakeWrites(); len(w) != 0 {
		t.Errorf("bad input wrote to the datapath: %v", w)
	}
	if before.Endpoints != after.Endpoints || before.Services != after.Services || before.Identities != after.Identities {
		t.Errorf("bad input changed state: before %+v after %+v", before, after)
	}
}

func TestAddRollsBack(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	dp, plumb := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()
	n := start(t, cfg, dp, plumb)
	c := n.client

	// Plumbing fails: address and identity are given back.
	plumb.FailAfter = endpoint.HostIfName("node1", "default", "a")
	_, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "a", Netns: "/netns/a", Labels: map[string]string{"app": "a"}})
	if err == nil || !strings.Contains(err.Error(), "plumb endpoint default/a: add address to eth0 in /netns/a: boom") {
		t.Fatalf("got %v", err)
	}
	// The datapath refuses the endpoint: everything, veth included, is undone.
	dp.FailEP = errors.New("map full")
	_, err = c.AddEndpoint(ctx, api.EndpointRequest{Name: "b", Netns: "/netns/b", Labels: map[string]string{"app": "b"}})
	if err == nil || !strings.Contains(err.Error(), "rolled back") || !strings.Contains(err.Error(), "map full") {
		t.Fatalf("got %v", err)
	}
	dp.FailEP = nil
	plumb.FailAfter = ""
	time.Sleep(50 * time.Millisecond) // let the loop's retry after the rollback land

	if eps, _ := c.ListEndpoints(ctx); len(eps) != 0 {
		t.Errorf("endpoints after failed adds: %+v", eps)
	}
	if len(plumb.Links) != 0 || len(dp.Attached) != 0 {
		t.Errorf("leftovers: links %v attached %v", plumb.Links, dp.Attached)
	}
	for _, id := range mustIdentities(t, c) {
		if id.ID > identity.MaxReserved {
			t.Errorf("identity left allocated: %+v", id)
		}
	}
	// The addresses were given back: a new endpoint works and the first
	// failed owner holds nothing.
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "a", Netns: "/netns/a"}); err != nil {
		t.Fatalf("add after rollback: %v", err)
	}
	n.stop()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if allocs := a.ipam.Allocations(); len(allocs) != 1 || allocs["default/a"] == nil {
		t.Errorf("IPAM after rollbacks: %v", allocs)
	}
}

func TestRestartCollectsLeftovers(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	dp, plumb := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()

	// A crash after IPAM, identity and veth, before the endpoint was persisted.
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.ipam.Allocate("default/ghost"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.ids.Allocate(ctx, identity.Labels{"app": "ghost", identity.LabelNamespace: "default", identity.LabelCluster: "c1"}); err != nil {
		t.Fatal(err)
	}
	ghostIf := endpoint.HostIfName("node1", "default", "ghost")
	if _, err := plumb.Create(endpoint.Spec{HostIfName: ghostIf}); err != nil {
		t.Fatal(err)
	}
	// A crash while an add plumbed its veth before its addresses were
	// written (they are written side by side): a veth nothing names.
	unwrittenIf := endpoint.HostIfName("node1", "default", "unwritten")
	if _, err := plumb.Create(endpoint.Spec{HostIfName: unwrittenIf}); err != nil {
		t.Fatal(err)
	}

	n := start(t, cfg, dp, plumb)
	if _, ok := plumb.Links[ghostIf]; ok {
		t.Error("leftover veth survived the restart")
	}
	if _, ok := plumb.Links[unwrittenIf]; ok {
		t.Error("a veth without an endpoint or addresses survived the restart")
	}
	for _, id := range mustIdentities(t, n.client) {
		if id.ID > identity.MaxReserved {
			t.Errorf("leftover identity survived the restart: %+v", id)
		}
	}
	n.stop()
	a, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if allocs := a.ipam.Allocations(); len(allocs) != 0 {
		t.Errorf("leftover addresses survived the restart: %v", allocs)
	}
}

func TestRestartRecreatesMissingVeth(t *testing.T) {
	ctx := context.Background()
	cfg := testConfig(t)
	dp, plumb := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()
	n := start(t, cfg, dp, plumb)
	ep, err := n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "a", Netns: "/netns/a"})
	if err != nil {
		t.Fatal(err)
	}
	gone, err := n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "b", Netns: "/netns/b"})
	if err != nil {
		t.Fatal(err)
	}
	n.stop()

	delete(plumb.Links, ep.Interface)   // someone deleted the veth; the pod is still there
	delete(plumb.Links, gone.Interface) // the pod is gone with its netns
	plumbNetnsGone := &netnsGone{FakePlumber: plumb, gone: "/netns/b"}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.plumb = plumbNetnsGone
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	a.nodeAddrs = func() ([]netip.Addr, error) { return []netip.Addr{nodeIP}, nil }
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(rctx) }()
	c := api.NewClient(cfg.SocketPath)
	for c.Health(ctx) != nil {
		time.Sleep(10 * time.Millisecond)
	}
	eps, err := c.ListEndpoints(ctx)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err != nil || len(eps) != 1 || eps[0].Name != "a" {
		t.Fatalf("endpoints after restart: %+v, %v", eps, err)
	}
	if eps[0].IfIndex == ep.IfIndex || !slices.Equal(eps[0].IPs, ep.IPs) {
		t.Errorf("recreated endpoint %+v, was %+v: want a new ifindex and the same addresses", eps[0], ep)
	}
	if got := dp.EPs[ep.IPs[0]]; int(got.IfIndex) != eps[0].IfIndex {
		t.Errorf("endpoints map points at ifindex %d, want %d", got.IfIndex, eps[0].IfIndex)
	}
	if _, ok := dp.EPs[gone.IPs[0]]; ok {
		t.Error("the endpoint whose netns is gone is still in the map")
	}
}

type netnsGone struct {
	*agenttest.FakePlumber
	gone string
}

func (p *netnsGone) CheckNetns(path string) error {
	if path == p.gone {
		return fmt.Errorf("netns %s does not exist", path)
	}
	return p.FakePlumber.CheckNetns(path)
}

func TestConfigValidation(t *testing.T) {
	cfg := testConfig(t)
	cfg.NodeName = "Node_1"
	cfg.ClusterID = 0
	cfg.PodCIDRs = nil
	_, err := New(cfg)
	for _, want := range []string{`node name "Node_1"`, "cluster ID 0", "no pod CIDR"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %q", err, want)
		}
	}
}

func TestSecondAgentRefused(t *testing.T) {
	cfg := testConfig(t)
	start(t, cfg, agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.openDatapath = func(Config) (datapath.Datapath, error) {
		t.Error("second agent opened the datapath")
		return nil, errors.New("no")
	}
	err = a.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Errorf("second agent: %v", err)
	}
}
