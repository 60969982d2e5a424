package etcdserver

import (
	"errors"
	"io/fs"
	"os"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"

	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// A node's credential writes that node's records and nothing else: not
// another node's (not even one whose name starts with its own), not the
// cluster config, the mirror's cache, canaries, heartbeats or services;
// and it never reads the remotes' private keys. Removing the node cuts it
// off.
func TestNodeCredentialWritesOnlyItsOwnRecords(t *testing.T) {
	ctx := testCtx(t)
	s := start(t, testConfig(t))
	b, err := s.ExportNodeBundle(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if b.User != "node-n1" {
		t.Fatalf("bundle user %q, want node-n1", b.User)
	}
	if node, ok := records.NodeOfUser(b.User); !ok || node != "n1" {
		t.Fatalf("NodeOfUser(%q) = %q, %v", b.User, node, ok)
	}
	n1 := connectBundle(t, b)
	allowed := []string{
		records.NodeKey("c1", "n1"),
		records.NodeIPCachePrefix("c1", "n1") + "10.1.0.5",
		records.IdentityIDKey(1<<20 | 300),
		records.IdentityLabelsKey("app=x;isthmus.io/cluster=c1"),
		records.IdentityValueKey("app=x;isthmus.io/cluster=c1", "n1"),
		records.ConfigPrefix + "Service/default/web",
		records.ConfigGuardKey,
	}
	for _, k := range allowed {
		if err := n1.Put(ctx, k, []byte("x")); err != nil {
			t.Errorf("node n1 writing its own %s: %v", k, err)
		}
	}
	denied := []string{
		records.NodeKey("c1", "n2"),
		records.NodeKey("c1", "n10"), // a prefix match would allow this
		records.NodeIPCachePrefix("c1", "n2") + "10.1.0.5",
		records.NodeIPCachePrefix("c1", "n10") + "10.1.0.5",
		records.StateClusterPrefix(records.KindIP, "c1") + "10.1.0.5", // outside any node's prefix
		records.ClusterConfigKey("c1"),
		records.ClusterConfigKey("c2"),
		records.HeartbeatKey("c1"),
		records.SyncedKey("c2", records.KindIP),
		records.CachePrefix(records.KindIP, "c2") + "n1/10.2.0.5",
		records.ServiceKey("c1", "default", "web"),
		records.LBIPAMKey("default", "web"), // LB-IPAM's assignments: the server's alone
		RemoteKey("c2"),
		InfoKey,
		"elsewhere",
	}
	for _, k := range denied {
		if err := n1.Put(ctx, k, []byte("x")); !isPermissionDenied(err) {
			t.Errorf("node n1 writing %s = %v, want permission denied", k, err)
		}
	}
	if _, _, err := n1.Get(ctx, RemoteKey("c2")); !isPermissionDenied(err) {
		t.Errorf("node n1 reading a remote record (private keys) = %v, want permission denied", err)
	}
	if _, found, err := n1.Get(ctx, records.ClusterConfigKey("c1")); err != nil || !found {
		t.Errorf("node n1 reading the cluster config: found %v, %v", found, err)
	}

	if err := s.RemoveNode(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	if err := n1.Put(ctx, records.NodeKey("c1", "n1"), []byte("y")); err == nil {
		t.Error("node n1 still writes after RemoveNode")
	}
	if _, err := s.ExportNodeBundle(ctx, "Not_A_Node"); err == nil {
		t.Error("a bundle for an invalid node name was issued")
	}
}

// Without SharedAgentCredential there is no "agents" user and no bundle
// for it; a server restarted without it removes the user, so a shared
// bundle handed out before stops working.
func TestSharedAgentCredentialOffByDefault(t *testing.T) {
	ctx := testCtx(t)
	cfg := sharedConfig(t)
	s := start(t, cfg)
	shared, err := s.ExportBundle()
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	cfg.SharedAgentCredential = false
	s = start(t, cfg)
	if _, err := s.ExportBundle(); err == nil {
		t.Error("ExportBundle with the shared credential off: want an error")
	}
	if _, err := os.Stat(s.BundleDir(UserAgents)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("bundle dir of the shared credential: %v, want it removed", err)
	}
	if d, err := OpenDataDir(cfg.DataDir); err != nil {
		t.Fatal(err)
	} else if _, err := d.Bundle(UserAgents); err == nil {
		t.Error("the data dir still hands out the shared bundle")
	}
	c, err := kvstore.Connect(ctx, mustKVConfig(t, shared))
	if err == nil {
		err = c.Put(ctx, records.NodeKey("c1", "n1"), []byte("x"))
		c.Close()
	}
	if err == nil {
		t.Error("the shared agents bundle still writes after a restart without the shared credential")
	}
}

func mustKVConfig(t *testing.T, b Bundle) kvstore.Config {
	t.Helper()
	kc, err := b.KVConfig()
	if err != nil {
		t.Fatal(err)
	}
	kc.Logger, kc.DialTimeout, kc.MaxRetries = quiet, time.Second, 1
	return kc
}
