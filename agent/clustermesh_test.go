package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// meshNode is an agent in cluster mode with fake kernel parts.
type meshNode struct {
	*testNode
	router *agenttest.FakeRouter
	nodeIP netip.Addr
}

func meshConfig(t *testing.T, e *etcdtest.Etcd, name, nodeIP, cidr4, cidr6 string) Config {
	dir := t.TempDir()
	return Config{
		NodeName: name, ClusterName: "c1", ClusterID: 1,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix(cidr4), netip.MustParsePrefix(cidr6)},
		StateDir: filepath.Join(dir, "state"), SocketPath: filepath.Join(dir, "agent.sock"),
		BPFFSRoot: filepath.Join(dir, "bpffs"), MTU: 1500,
		KVStoreEndpoints: []string{e.Endpoint}, NodeIPs: []netip.Addr{netip.MustParseAddr(nodeIP)},
		LeaseTTL: 5 * time.Second,
	}
}

// startMesh runs an agent in cluster mode; the maps of dp survive a
// restart, like pinned maps.
func startMesh(t *testing.T, cfg Config, dp *agenttest.FakeDatapath, plumb *agenttest.FakePlumber) *meshNode {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	fr := agenttest.NewFakeRouter()
	a.plumb = plumb
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	a.nodeAddrs = func() ([]netip.Addr, error) { return cfg.NodeIPs, nil }
	a.newRouter = func() (routes.Router, error) { return fr, nil }
	c, stop := launch(t, a)
	return &meshNode{testNode: &testNode{cfg: cfg, dp: dp, plumb: plumb, client: c, stop: stop}, router: fr, nodeIP: cfg.NodeIPs[0]}
}

// waitFor polls cond (which reports what it saw) until it holds.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok, seen := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last saw: %s", what, seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (n *meshNode) meshSynced(t *testing.T) {
	t.Helper()
	waitFor(t, n.cfg.NodeName+" connected and synced", func() (bool, string) {
		st, err := n.client.Status(context.Background())
		if err != nil || st.ClusterMesh == nil {
			return false, fmt.Sprint(err)
		}
		cm := st.ClusterMesh
		return cm.Connected && len(cm.Clusters) > 0 && cm.Clusters[0].Synced && cm.Published, fmt.Sprintf("%+v", cm)
	})
}

func (n *meshNode) ipcache(p string) (bpf.IPCacheEntry, bool) {
	m, _ := n.dp.IPCacheList()
	e, ok := m[netip.MustParsePrefix(p)]
	return e, ok
}

func (n *meshNode) service(f bpf.Frontend) ([]bpf.Backend, bool) {
	m, _ := n.dp.ServiceList()
	bs, ok := m[f]
	return bs, ok
}

func kvClient(t *testing.T, e *etcdtest.Etcd) *kvstore.Client {
	t.Helper()
	c, err := kvstore.Connect(context.Background(), kvstore.Config{Endpoints: []string{e.Endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func putRecord(t *testing.T, c *kvstore.Client, key string, value []byte, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(context.Background(), key, value); err != nil {
		t.Fatal(err)
	}
}

func writeClusterConfig(t *testing.T, c *kvstore.Client, name string, id uint32, cidrs ...string) {
	var ps []netip.Prefix
	for _, s := range cidrs {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	v, err := records.ClusterConfig{Name: name, ID: id, PodCIDRs: ps}.Marshal()
	putRecord(t, c, records.ClusterConfigKey(name), v, err)
}

const globalWeb = `
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: web
  annotations: {isthmus.io/global: "true"}
spec:
  vips: ["10.96.0.10"]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: web}
`

const crossClusterPolicy = `
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: from-c2
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client, isthmus.io/cluster: c2}}]
    toPorts: [{port: 9090}]
`

func TestClusterMode(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t)
	kv := kvClient(t, e)
	writeClusterConfig(t, kv, "c1", 1, "10.1.0.0/16", "fd00:1::/32")

	n1 := startMesh(t, meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n2 := startMesh(t, meshConfig(t, e, "node2", "192.0.2.12", "10.1.2.0/24", "fd00:1:2::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n1.meshSynced(t)
	n2.meshSynced(t)

	// Global identities: the same labels on two nodes get the same ID.
	web1, err := n1.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web1", Netns: "/netns/web1", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	web2, err := n2.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web2", Netns: "/netns/web2", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	client2, err := n2.client.AddEndpoint(ctx, api.EndpointRequest{Name: "client", Netns: "/netns/client", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	if web1.Identity != web2.Identity || web1.Identity == client2.Identity || web1.Identity>>20 != 1 {
		t.Fatalf("identities: web1 %d web2 %d client %d", web1.Identity, web2.Identity, client2.Identity)
	}

	// node1 learns node2's endpoints (with their host), node2's address
	// (remote-node) and a route to node2's pod CIDR.
	web2v4 := web2.IPs[0].String() + "/32"
	waitFor(t, "node2's endpoints in node1's ipcache", func() (bool, string) {
		e1, ok1 := n1.ipcache(web2v4)
		e2, ok2 := n1.ipcache(client2.IPs[0].String() + "/32")
		e3, ok3 := n1.ipcache("192.0.2.12/32")
		return ok1 && ok2 && ok3 && e1.Identity == web2.Identity && e1.HostIP == n2.nodeIP &&
			e2.Identity == client2.Identity && e3.Identity == bpf.IdentityRemote, fmt.Sprint(e1, e2, e3)
	})
	if e, _ := n1.ipcache("192.0.2.11/32"); e.Identity != bpf.IdentityHost {
		t.Errorf("own node IP has identity %d", e.Identity)
	}
	if e, _ := n1.ipcache(web1.IPs[0].String() + "/32"); e.Identity != web1.Identity || e.HostIP.IsValid() {
		t.Errorf("own endpoint in ipcache: %+v", e)
	}
	waitFor(t, "route to node2's pods", func() (bool, string) {
		r := n1.router.Get()
		return r[netip.MustParsePrefix("10.1.2.0/24")] == n2.nodeIP && len(r) == 1, fmt.Sprint(r)
	})

	// Apply on node1 goes to etcd; node2 picks it up from its watch.
	if _, err := n1.client.Apply(ctx, []byte(globalWeb+"---\n"+serverPolicy)); err != nil {
		t.Fatal(err)
	}
	f := bpf.Frontend{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: bpf.ProtoTCP}
	for _, n := range []*meshNode{n1, n2} {
		waitFor(t, n.cfg.NodeName+" has the service with both nodes' backends", func() (bool, string) {
			bs, _ := n.service(f)
			return slices.Equal(bs, []bpf.Backend{{Addr: web1.IPs[0], Port: 8080}, {Addr: web2.IPs[0], Port: 8080}}), fmt.Sprint(bs)
		})
	}
	// The policy on node2 admits client (a local endpoint) into web2.
	waitFor(t, "policy on node2", func() (bool, string) {
		keys, _ := n2.dp.PolicyList()
		want := bpf.PolicyKey{EndpointID: web2.ID, PeerIdentity: client2.Identity, Port: 8080, Proto: bpf.ProtoTCP, Direction: bpf.Ingress}
		return slices.Contains(keys, want), fmt.Sprint(keys)
	})
	objs, err := n2.client.ListObjects(ctx, "service")
	if err != nil || len(objs) != 1 || objs[0].Name != "web" {
		t.Errorf("get on node2: %+v, %v", objs, err)
	}

	// A VIP is taken once, cluster-wide.
	clash := strings.Replace(globalWeb, "name: web", "name: web-copy", 1)
	if _, err := n2.client.Apply(ctx, []byte(clash)); api.StatusOf(err) != http.StatusConflict {
		t.Errorf("conflicting apply on node2: %v", err)
	}
	// ... also when two applies race.
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, n := range []*meshNode{n1, n2} {
		wg.Go(func() {
			doc := strings.NewReplacer("name: web", fmt.Sprintf("name: race%d", i), "10.96.0.10", "10.96.0.99").Replace(globalWeb)
			_, errs[i] = n.client.Apply(ctx, []byte(doc))
		})
	}
	wg.Wait()
	if (errs[0] == nil) == (errs[1] == nil) {
		t.Errorf("racing applies of one VIP: %v / %v (want exactly one conflict)", errs[0], errs[1])
	}

	// A remote cluster's shared backends join the global service.
	writeClusterConfig(t, kv, "c2", 2, "10.2.0.0/16")
	remoteWeb, err := records.ServiceRecord{Name: "web", Namespace: "default", Cluster: "c2", ClusterID: 2,
		Frontends: []records.Frontend{{IP: netip.MustParseAddr("10.97.0.10"), Port: 80, Protocol: "TCP"}},
		Backends:  []records.Backend{{IP: netip.MustParseAddr("10.2.1.5"), Port: 8080, Protocol: "TCP", Cluster: "c2"}},
		Global:    true, Shared: true}.Marshal()
	key, _ := records.CacheKey(records.ServiceKey("c2", "default", "web"), "c2")
	putRecord(t, kv, key, remoteWeb, err)
	remoteIP, err := records.IPCacheEntry{Prefix: netip.MustParsePrefix("10.2.1.5/32"), Identity: 2<<20 | 1,
		HostIP: netip.MustParseAddr("198.51.100.1"), Cluster: "c2"}.Marshal()
	key, _ = records.CacheKey(records.IPCacheKey("c2", "n1", netip.MustParsePrefix("10.2.1.5/32")), "c2")
	putRecord(t, kv, key, remoteIP, err)
	remoteID, err := records.IdentityRecord{ID: 2<<20 | 1, Labels: map[string]string{
		"app": "client", "isthmus.io/cluster": "c2", "isthmus.io/namespace": "default"}}.Marshal()
	key, _ = records.CacheKey(records.IdentityIDKey(2<<20|1), "c2")
	putRecord(t, kv, key, remoteID, err)
	for _, k := range records.Kinds {
		v, err := records.Stamp{Cluster: "c2", Time: time.Now()}.Marshal()
		putRecord(t, kv, records.SyncedKey("c2", k), v, err)
	}
	waitFor(t, "remote backend in node1's service", func() (bool, string) {
		bs, _ := n1.service(f)
		return slices.Contains(bs, bpf.Backend{Addr: netip.MustParseAddr("10.2.1.5"), Port: 8080, ClusterID: 2}) && len(bs) == 3, fmt.Sprint(bs)
	})
	if e, ok := n1.ipcache("10.2.1.5/32"); !ok || e.Identity != 2<<20|1 || e.HostIP != netip.MustParseAddr("198.51.100.1") {
		t.Errorf("remote endpoint in ipcache: %+v %v", e, ok)
	}
	// A selector naming the cluster admits that cluster's workloads only.
	if _, err := n1.client.Apply(ctx, []byte(crossClusterPolicy)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "cross-cluster policy on node1", func() (bool, string) {
		keys, _ := n1.dp.PolicyList()
		var peers []uint32
		for _, k := range keys {
			if k.EndpointID == web1.ID && k.Direction == bpf.Ingress && k.Port == 9090 {
				peers = append(peers, k.PeerIdentity)
			}
		}
		return slices.Equal(peers, []uint32{2<<20 | 1}), fmt.Sprint(peers)
	})

	st, err := n1.client.Status(ctx)
	if err != nil || st.ClusterMesh == nil || len(st.ClusterMesh.Clusters) != 2 {
		t.Fatalf("status %+v, %v", st.ClusterMesh, err)
	}
	own, remote := st.ClusterMesh.Clusters[0], st.ClusterMesh.Clusters[1]
	if own.Name != "c1" || !own.Local || own.Nodes != 2 || own.Endpoints != 6 || own.Identities != 2 ||
		remote.Name != "c2" || remote.ID != 2 || !remote.Synced || remote.Services != 1 || remote.Endpoints != 1 || remote.Identities != 1 {
		t.Errorf("clustermesh status: own %+v remote %+v", own, remote)
	}

	// Deleting an endpoint takes it out of the other node's maps.
	if err := n2.client.DeleteEndpoint(ctx, "default", "web2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "web2 gone from node1", func() (bool, string) {
		_, ok := n1.ipcache(web2v4)
		bs, _ := n1.service(f)
		return !ok && !slices.ContainsFunc(bs, func(b bpf.Backend) bool { return b.Addr == web2.IPs[0] }), fmt.Sprint(bs)
	})

	// Deleting the service on node2 removes it on node1.
	if err := n2.client.DeleteObject(ctx, "Service", "default", "web"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "service gone from node1", func() (bool, string) {
		_, ok := n1.service(f)
		return !ok, ""
	})
	if err := n2.client.DeleteObject(ctx, "Service", "default", "web"); !api.IsNotFound(err) {
		t.Errorf("second delete: %v", err)
	}
}

// A restart while etcd is away keeps the datapath: nothing the mesh put
// there is removed until etcd has been listed again.
func TestClusterModeRestartWithoutEtcd(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t)
	kv := kvClient(t, e)
	writeClusterConfig(t, kv, "c1", 1, "10.1.0.0/16", "fd00:1::/32")
	cfg1 := meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64")
	dp1, plumb1 := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()
	n1 := startMesh(t, cfg1, dp1, plumb1)
	n2 := startMesh(t, meshConfig(t, e, "node2", "192.0.2.12", "10.1.2.0/24", "fd00:1:2::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n1.meshSynced(t)
	n2.meshSynced(t)
	web1, err := n1.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web1", Netns: "/netns/web1", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	web1b, err := n1.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web1b", Netns: "/netns/web1b", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	web2, err := n2.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web2", Netns: "/netns/web2", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n1.client.Apply(ctx, []byte(globalWeb+"---\n"+serverPolicy)); err != nil {
		t.Fatal(err)
	}
	f := bpf.Frontend{VIP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: bpf.ProtoTCP}
	waitFor(t, "all backends on node1", func() (bool, string) {
		bs, _ := n1.service(f)
		return len(bs) == 3, fmt.Sprint(bs)
	})
	time.Sleep(2*clustermode.PersistInterval + 100*time.Millisecond) // let node1 persist the applied objects
	before, _ := dp1.IPCacheList()
	beforeSvc, _ := dp1.ServiceList()
	beforeEP, _ := dp1.EndpointList()

	n1.stop()
	e.Stop()
	n1 = startMesh(t, cfg1, dp1, plumb1)
	time.Sleep(500 * time.Millisecond)
	after, _ := dp1.IPCacheList()
	afterSvc, _ := dp1.ServiceList()
	afterEP, _ := dp1.EndpointList()
	if len(after) != len(before) || len(afterSvc) != len(beforeSvc) || !slices.Equal(afterSvc[f], beforeSvc[f]) {
		t.Errorf("restart without etcd changed the datapath:\nipcache %v\n-> %v\nservices %v\n-> %v", before, after, beforeSvc, afterSvc)
	}
	if !afterEP[web1.IPs[0]].PolicyIngress || afterEP[web1.IPs[0]].PolicyIngress != beforeEP[web1.IPs[0]].PolicyIngress {
		t.Errorf("enforcement of web1 changed: %+v -> %+v", beforeEP[web1.IPs[0]], afterEP[web1.IPs[0]])
	}
	st, err := n1.client.Status(ctx)
	if err != nil || st.ClusterMesh == nil || st.ClusterMesh.Connected || st.ClusterMesh.LastError == "" {
		t.Errorf("status while etcd is away: %+v, %v", st.ClusterMesh, err)
	}
	// Endpoints need etcd for their identity in cluster mode.
	if _, err := n1.client.AddEndpoint(ctx, api.EndpointRequest{Name: "late", Netns: "/netns/late"}); api.StatusOf(err) != http.StatusServiceUnavailable {
		t.Errorf("endpoint add without etcd: %v", err)
	}

	// What the node itself knows completely still applies: a local
	// endpoint deleted during the outage leaves the maps; the rest stays.
	if err := n1.client.DeleteEndpoint(ctx, "default", "web1b"); err != nil {
		t.Fatal(err)
	}
	if _, ok := n1.ipcache(web1b.IPs[0].String() + "/32"); ok {
		t.Error("deleted local endpoint still in the ipcache")
	}
	if bs, _ := n1.service(f); len(bs) != 2 || slices.ContainsFunc(bs, func(b bpf.Backend) bool { return b.Addr == web1b.IPs[0] }) {
		t.Errorf("backends after a local delete during the outage: %v", bs)
	}
	if _, ok := n1.ipcache(web2.IPs[0].String() + "/32"); !ok {
		t.Error("node2's endpoint left node1's ipcache during the outage")
	}

	// etcd is back; what changed meanwhile converges: web2 is gone.
	e.Restart(t)
	n1.meshSynced(t)
	if err := n2.client.DeleteEndpoint(ctx, "default", "web2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "web2 gone from node1 after the outage", func() (bool, string) {
		_, ok := n1.ipcache(web2.IPs[0].String() + "/32")
		bs, _ := n1.service(f)
		return !ok && len(bs) == 1 && bs[0].Addr == web1.IPs[0], fmt.Sprint(bs)
	})
}

func TestClusterConfigMismatchStopsAgent(t *testing.T) {
	e := etcdtest.Start(t)
	kv := kvClient(t, e)
	writeClusterConfig(t, kv, "c1", 7, "10.1.0.0/16")
	cfg := meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64")
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.plumb = agenttest.NewFakePlumber()
	dp := agenttest.NewFakeDatapath()
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	a.nodeAddrs = func() ([]netip.Addr, error) { return cfg.NodeIPs, nil }
	a.newRouter = func() (routes.Router, error) { return agenttest.NewFakeRouter(), nil }
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = a.Run(ctx)
	if err == nil || !strings.Contains(err.Error(), "cluster \"c1\" has ID 7 in etcd, this agent runs with --cluster-id 1") {
		t.Errorf("Run: %v", err)
	}
}

func TestClusterModeConfigValidation(t *testing.T) {
	cfg := testConfig(t)
	cfg.KVStoreBundle = "/x"
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "need --kvstore-endpoints") {
		t.Errorf("bundle without endpoints: %v", err)
	}
	cfg = testConfig(t)
	cfg.KVStoreEndpoints = []string{"https://192.0.2.1:2379", "etcd:2379"}
	cfg.NodeIPs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	_, err := New(cfg)
	for _, want := range []string{"--kvstore-bundle is required", `"etcd:2379": want https://host:port`, "node IP 127.0.0.1"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %q", err, want)
		}
	}
}

// A second node started with a name another live node holds neither
// publishes nor overwrites that node's record; it says why in its status.
func TestClusterModeRefusesTakenNodeName(t *testing.T) {
	e := etcdtest.Start(t)
	kv := kvClient(t, e)
	writeClusterConfig(t, kv, "c1", 1, "10.1.0.0/16", "fd00:1::/32")
	n1 := startMesh(t, meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n1.meshSynced(t)
	dup := startMesh(t, meshConfig(t, e, "node1", "192.0.2.99", "10.1.9.0/24", "fd00:1:9::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	waitFor(t, "the duplicate to report the taken name", func() (bool, string) {
		st, err := dup.client.Status(context.Background())
		if err != nil || st.ClusterMesh == nil {
			return false, fmt.Sprint(err)
		}
		return strings.Contains(st.ClusterMesh.LastError, "node name taken") && !st.ClusterMesh.Published, fmt.Sprintf("%+v", st.ClusterMesh)
	})
	got, found, err := kv.Get(context.Background(), records.NodeKey("c1", "node1"))
	if err != nil || !found {
		t.Fatalf("node1's record: found %v, %v", found, err)
	}
	n, err := records.DecodeNode(got.Value)
	if err != nil || n.IPs[0] != netip.MustParseAddr("192.0.2.11") {
		t.Fatalf("node1's record was overwritten: %+v %v", n, err)
	}
}

// TestClusterModeAddWaitsForTheFirstConnection: an endpoint add that
// arrives while the agent is still connecting to etcd (a pod created as
// its node's agent starts) waits for the connection instead of failing.
func TestClusterModeAddWaitsForTheFirstConnection(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t)
	writeClusterConfig(t, kvClient(t, e), "c1", 1, "10.1.0.0/16", "fd00:1::/32")
	e.Stop()
	n1 := startMesh(t, meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	done := make(chan error, 1)
	go func() {
		_, err := n1.client.AddEndpoint(ctx, api.EndpointRequest{Name: "early", Netns: "/netns/early", Labels: map[string]string{"app": "web"}})
		done <- err
	}()
	time.Sleep(time.Second) // the add is waiting; etcd comes up
	e.Restart(t)
	if err := <-done; err != nil {
		t.Fatalf("an add that arrived while the agent connected: %v", err)
	}
}
