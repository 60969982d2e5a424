package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/meshctl"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

// meshRun runs `isthmus clustermesh ARGS` against the etcd of cluster c
// with its root bundle.
func meshRun(t *testing.T, c *servertest.Cluster, args ...string) (string, error) {
	t.Helper()
	return run(t, "/nonexistent.sock", "", append([]string{"clustermesh",
		"--kvstore-endpoints", c.Endpoint(), "--kvstore-bundle", c.RootBundleDir()}, args...)...)
}

func TestClustermeshCommands(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	c3 := servertest.Start(t, "c3", 2, "10.3.0.0/16") // same ID as c2
	n := records.Node{Name: "n1", Cluster: "c2", ClusterID: 2, IPs: []netip.Addr{netip.MustParseAddr("192.0.2.2")}}
	v, _ := n.Marshal()
	if err := c2.KV().Put(context.Background(), records.NodeKey("c2", "n1"), v); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()

	// Status before anything is connected.
	out, err := meshRun(t, c1, "status")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "c1 (ID 1), pod CIDRs 10.1.0.0/16") || !strings.Contains(out, "No remote clusters connected") {
		t.Errorf("status:\n%s", out)
	}

	// On c2's server host: a bundle for c1. The agents bundle as a dir.
	bundle := filepath.Join(dir, "c2-for-c1.json")
	out, err = meshRun(t, c2, "certs", "--data-dir", c2.DataDir(), "--for-remote", "c1", "--out", bundle)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "etcd user remote-c1") || !strings.Contains(out, "isthmus clustermesh connect --bundle "+bundle) {
		t.Errorf("certs --for-remote printed:\n%s", out)
	}
	if fi, err := os.Stat(bundle); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("bundle file: %v %v", fi, err)
	}
	nodeDir := filepath.Join(dir, "n1") + "/"
	if out, err := meshRun(t, c2, "certs", "--data-dir", c2.DataDir(), "--node", "n1", "--out", nodeDir); err != nil || !strings.Contains(out, "node n1 of cluster c2 (etcd user node-n1)") {
		t.Fatalf("certs --node n1: %q %v", out, err)
	}
	for _, f := range []string{etcdserver.BundleCAFile, etcdserver.BundleCertFile, etcdserver.BundleKeyFile, meshctl.BundleFileInDir} {
		if _, err := os.Stat(filepath.Join(nodeDir, f)); err != nil {
			t.Error(err)
		}
	}
	if _, err := meshRun(t, c2, "certs", "--data-dir", c2.DataDir(), "--out", nodeDir); err == nil || !strings.Contains(err.Error(), "--node NAME") {
		t.Errorf("certs without --node or --for-remote: %v", err)
	}
	if _, err := meshRun(t, c2, "certs", "--data-dir", c2.DataDir(), "--insecure-shared-agents", "--out", nodeDir); err == nil || !strings.Contains(err.Error(), "--insecure-shared-agent-credential") {
		t.Errorf("certs --insecure-shared-agents on a server without it: %v", err)
	}
	if _, err := meshRun(t, c2, "certs", "--data-dir", t.TempDir(), "--node", "n1", "--out", bundle); err == nil || !strings.Contains(err.Error(), "--data-dir of an isthmus-clustermesh") {
		t.Errorf("certs on an empty dir: %v", err)
	}

	// Connect on c1, wait until synced.
	out, err = meshRun(t, c1, "connect", "--bundle", bundle, "--wait", "20s")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "cluster c2 (ID 2, pod CIDRs 10.2.0.0/16) connected") || !strings.Contains(out, "cluster c2 synced: 1 nodes") {
		t.Errorf("connect printed:\n%s", out)
	}
	out, err = meshRun(t, c1, "status")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "CLUSTER") || !regexpLine(out, `c2\s+2\s+connected\s+yes\s+yes\s+1\s+0\s+0\s+0\s+0\s`) {
		t.Errorf("status table:\n%s", out)
	}
	out, err = meshRun(t, c1, "status", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var st meshctl.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil || st.Cluster != "c1" || len(st.Remotes) != 1 || !st.Remotes[0].Ready || st.Remotes[0].Nodes != 1 {
		t.Errorf("status -o json: %+v %v\n%s", st, err, out)
	}
	if out, err := meshRun(t, c1, "status", "-o", "yaml"); err != nil || !strings.Contains(out, "state: connected") {
		t.Errorf("status -o yaml: %v\n%s", err, out)
	}
	// Shell completion of disconnect --name reads the connected clusters.
	if got, directive := runComplete(t, "/nonexistent.sock", "clustermesh", "--kvstore-endpoints", c1.Endpoint(),
		"--kvstore-bundle", c1.RootBundleDir(), "disconnect", "--name", ""); strings.Join(got, " ") != "c2" || directive != ":4" {
		t.Errorf("complete disconnect --name: %q %s", got, directive)
	}

	// Refusals: the same ID as the connected c2; a bundle made for another
	// cluster; a bundle named differently; an unreachable address.
	c3bundle := filepath.Join(dir, "c3-for-c1.json")
	if _, err := meshRun(t, c3, "certs", "--data-dir", c3.DataDir(), "--for-remote", "c1", "--out", c3bundle); err != nil {
		t.Fatal(err)
	}
	_, err = meshRun(t, c1, "connect", "--bundle", c3bundle)
	if err == nil || !strings.Contains(err.Error(), "refusing to connect cluster c3") || !strings.Contains(err.Error(), "both have cluster ID 2") {
		t.Errorf("connect with a duplicate ID: %v", err)
	}
	if _, found, _ := c1.KV().Get(context.Background(), etcdserver.RemoteKey("c3")); found {
		t.Error("a refused cluster was written")
	}
	forC9 := filepath.Join(dir, "c2-for-c9.json")
	if _, err := meshRun(t, c2, "certs", "--data-dir", c2.DataDir(), "--for-remote", "c9", "--out", forC9); err != nil {
		t.Fatal(err)
	}
	if _, err := meshRun(t, c1, "connect", "--bundle", forC9); err == nil || !strings.Contains(err.Error(), "--for-remote c1") {
		t.Errorf("connect with a bundle for another cluster: %v", err)
	}
	if _, err := meshRun(t, c1, "connect", "--bundle", bundle, "--name", "c7"); err == nil || !strings.Contains(err.Error(), `is for cluster "c2", not "c7"`) {
		t.Errorf("connect --name mismatch: %v", err)
	}
	if _, err := meshRun(t, c1, "connect", "--bundle", bundle, "--endpoints", "https://127.0.0.1:1", "--timeout", "500ms"); err == nil || !strings.Contains(err.Error(), "cannot reach cluster c2") {
		t.Errorf("connect to nothing: %v", err)
	}
	// The CLI needs the root bundle; on a server host with one server
	// under the default data dir root it finds it (and the address).
	dataDirRoot = t.TempDir()
	if _, err := run(t, "/x.sock", "", "clustermesh", "status", "--kvstore-bundle", ""); err == nil || !strings.Contains(err.Error(), "--kvstore-bundle DIR") {
		t.Errorf("status without a bundle: %v", err)
	}
	dataDirRoot = filepath.Dir(c1.DataDir())
	t.Cleanup(func() { dataDirRoot = etcdserver.DefaultDataDirRoot })
	if out, err := run(t, "/x.sock", "", "clustermesh", "status"); err != nil || !strings.Contains(out, "c1 (ID 1)") {
		t.Errorf("status with the server's data dir found: %v\n%s", err, out)
	}

	// c2 may read c1 (user remote-c2 exists); disconnect removes that too.
	c1bundle := filepath.Join(dir, "c1-for-c2.json")
	if _, err := meshRun(t, c1, "certs", "--data-dir", c1.DataDir(), "--for-remote", "c2", "--out", c1bundle); err != nil {
		t.Fatal(err)
	}
	if err := readAs(t, c1bundle); err != nil {
		t.Fatalf("remote-c2 cannot read c1: %v", err)
	}
	out, err = meshRun(t, c1, "disconnect", "--name", "c2")
	if err != nil || !strings.Contains(out, "cluster c2 disconnected") || !strings.Contains(out, "user remote-c2 removed") {
		t.Fatalf("disconnect: %q %v", out, err)
	}
	if err := readAs(t, c1bundle); err == nil {
		t.Error("remote-c2 can still read c1 after disconnect")
	}
	servertest.Eventually(t, 15*time.Second, "cache of c2 deleted", func() error {
		kvs, _, err := c1.KV().GetPrefix(context.Background(), records.CacheRoot)
		if err != nil || len(kvs) != 0 {
			return fmt.Errorf("%d cache keys (%v)", len(kvs), err)
		}
		return nil
	})
	out, err = meshRun(t, c1, "status")
	if err != nil || !strings.Contains(out, "No remote clusters connected") {
		t.Errorf("status after disconnect: %v\n%s", err, out)
	}
	if _, err := meshRun(t, c1, "disconnect", "--name", "c2"); err == nil || !strings.Contains(err.Error(), "not connected") {
		t.Errorf("disconnect again: %v", err)
	}

	// Now c3 (ID 2) no longer conflicts.
	if out, err := meshRun(t, c1, "connect", "--bundle", c3bundle, "--wait", "20s"); err != nil || !strings.Contains(out, "cluster c3 synced") {
		t.Errorf("connect c3 after c2 left: %v\n%s", err, out)
	}
	var rs mirror.Status
	servertest.Eventually(t, 5*time.Second, "status", func() error {
		st := c1.API().Mirror.Status()
		if len(st) != 1 || st[0].Cluster != "c3" {
			return fmt.Errorf("%+v", st)
		}
		rs = st[0]
		return nil
	})
	if rs.State != mirror.StateConnected {
		t.Errorf("c3 %+v", rs)
	}
}

// readAs reads c1's cluster config with the bundle at path.
func readAs(t *testing.T, path string) error {
	t.Helper()
	b, err := etcdserver.ReadBundle(path)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := b.KVConfig()
	if err != nil {
		t.Fatal(err)
	}
	kc.DialTimeout, kc.MaxRetries, kc.Logger = 2*time.Second, 1, slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := kvstore.Connect(ctx, kc)
	if err != nil {
		return err
	}
	defer c.Close()
	_, _, err = c.Get(ctx, records.ClusterConfigKey("c1"))
	return err
}

func regexpLine(out, pattern string) bool {
	return regexp.MustCompile("(?m)" + pattern).MatchString(out)
}
