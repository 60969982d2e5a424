package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// A node cut off from etcd past its lease TTL, while identity GC collects
// its pod's identity and another node allocates the same labels anew,
// moves its pod to the new ID once it is back, without a restart: its own
// maps, its published records, and so the other node's ipcache and policy.
func TestClusterModePartitionMovesIdentity(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t)
	kv := kvClient(t, e)
	writeClusterConfig(t, kv, "c1", 1, "10.1.0.0/16", "fd00:1::/32")
	proxy := etcdtest.StartProxy(t, strings.TrimPrefix(e.Endpoint, "http://"))
	cfg1 := meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64")
	cfg1.KVStoreEndpoints = []string{"http://" + proxy.Addr}
	cfg1.LeaseTTL = 2 * time.Second
	n1 := startMesh(t, cfg1, agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n2 := startMesh(t, meshConfig(t, e, "node2", "192.0.2.12", "10.1.2.0/24", "fd00:1:2::/64"), agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n1.meshSynced(t)
	n2.meshSynced(t)

	client, err := n1.client.AddEndpoint(ctx, api.EndpointRequest{Name: "client", Netns: "/netns/client", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	web, err := n2.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n2.client.Apply(ctx, []byte(serverPolicy)); err != nil {
		t.Fatal(err)
	}
	clientIP := client.IPs[0].String() + "/32"
	admits := func(peer uint32) func() (bool, string) {
		return func() (bool, string) {
			keys, _ := n2.dp.PolicyList()
			ipc, _ := n2.ipcache(clientIP)
			want := bpf.PolicyKey{EndpointID: web.ID, PeerIdentity: peer, Port: 8080, Proto: bpf.ProtoTCP, Direction: bpf.Ingress}
			return ipc.Identity == peer && slices.Contains(keys, want), fmt.Sprintf("client in node2's ipcache %+v, policy %v", ipc, keys)
		}
	}
	waitFor(t, "node2 admitting node1's client", admits(client.Identity))

	// The partition: node1's lease expires, GC collects the client's
	// identity (nothing else references it), node2 allocates app=client
	// anew and gets another ID.
	proxy.Cut()
	gc, err := identity.NewEtcd(kv, "c1", 1, "gc")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the client's identity collected while node1 is cut off", func() (bool, string) {
		n, err := gc.GC(ctx, 0)
		_, found, _ := kv.Get(ctx, records.IdentityIDKey(client.Identity))
		return !found, fmt.Sprint(n, err)
	})
	client2, err := n2.client.AddEndpoint(ctx, api.EndpointRequest{Name: "client2", Netns: "/netns/client2", Labels: map[string]string{"app": "client"}})
	if err != nil {
		t.Fatal(err)
	}
	if client2.Identity == client.Identity {
		t.Fatalf("app=client got its old ID %d again", client.Identity)
	}
	healed := time.Now()
	proxy.Restore()

	waitFor(t, "node1's client moved to app=client's new identity", func() (bool, string) {
		eps, err := n1.client.ListEndpoints(ctx)
		if err != nil || len(eps) != 1 {
			return false, fmt.Sprint(eps, err)
		}
		own, _ := n1.ipcache(clientIP)
		return eps[0].Identity == client2.Identity && own.Identity == client2.Identity, fmt.Sprintf("endpoint %d, own ipcache %+v", eps[0].Identity, own)
	})
	waitFor(t, "node2 admitting node1's client under the new identity", admits(client2.Identity))
	t.Logf("moved from identity %d to %d within %s of the heal", client.Identity, client2.Identity, time.Since(healed).Round(10*time.Millisecond))
	// The old ID is not referenced by node1 any more; the new one is.
	if _, found, _ := kv.Get(ctx, records.IdentityValueKey(identity.Labels{"app": "client", identity.LabelNamespace: "default", identity.LabelCluster: "c1"}.String(), "node1")); !found {
		t.Error("node1 does not reference app=client's identity in etcd")
	}
}
