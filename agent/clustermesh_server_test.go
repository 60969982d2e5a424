package agent

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// An agent reaches a real clustermesh server with nothing but the flags
// (endpoints, its node's bundle directory, node IP): mTLS, the etcd user
// node-<name> (which writes only that node's records, so the agent's
// publishing, identity allocation and apply all stay inside it), the
// server's cluster-config.
func TestClusterModeAgainstServer(t *testing.T) {
	if got, want := meshsync.ServerName("c1"), etcdserver.ServerName("c1"); got != want {
		t.Fatalf("agent expects server name %q, servers present %q", got, want)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	srv, err := etcdserver.Start(ctx, etcdserver.Config{
		ClusterName: "c1", ClusterID: 1,
		PodCIDRs:     []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd00:1::/32")},
		DataDir:      t.TempDir(),
		ListenClient: etcdtest.FreeAddr(t), ListenPeer: etcdtest.FreeAddr(t),
	})
	if err != nil {
		t.Fatalf("start server: %v", err)
	}
	t.Cleanup(func() { srv.Close() })

	cfg := testConfig(t)
	cfg.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.1.1.0/24"), netip.MustParsePrefix("fd00:1:1::/64")}
	cfg.KVStoreEndpoints = srv.Endpoints()
	// The node's own credential, as `isthmus clustermesh certs --node` makes it.
	b, err := srv.ExportNodeBundle(ctx, cfg.NodeName)
	if err != nil {
		t.Fatal(err)
	}
	cfg.KVStoreBundle = t.TempDir()
	if err := b.WriteDir(cfg.KVStoreBundle); err != nil {
		t.Fatal(err)
	}
	cfg.NodeIPs = []netip.Addr{netip.MustParseAddr("192.0.2.11")}
	n := startMesh(t, cfg, agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n.meshSynced(t)

	ep, err := n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	key := records.IPCacheKey("c1", cfg.NodeName, netip.PrefixFrom(ep.IPs[0], 32))
	waitFor(t, "the endpoint in the server's etcd", func() (bool, string) {
		kv, found, err := srv.Client().Get(ctx, key)
		return found && err == nil, fmt.Sprint(kv, err)
	})
	if _, err := n.client.Apply(ctx, []byte(webService)); err != nil {
		t.Fatalf("apply through the server's etcd: %v", err)
	}
}
