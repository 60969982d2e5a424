package meshctl

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

func dial(t *testing.T, c *servertest.Cluster) *Conn {
	t.Helper()
	return &Conn{Endpoints: []string{c.Endpoint()}, EndpointsSet: true, Bundle: c.RootBundleDir()}
}

// Connect, wait, status, conflicts, disconnect and revoke against real
// servers (embedded etcd).
func TestConnectStatusDisconnect(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16")
	c3 := servertest.Start(t, "c3", 2, "10.3.0.0/16") // the ID of c2

	kv, err := dial(t, c1).Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer kv.Close()

	st, err := ReadStatus(ctx, kv)
	if err != nil {
		t.Fatal(err)
	}
	if st.Cluster != "c1" || st.ClusterID != 1 || len(st.PodCIDRs) != 1 || st.PodCIDRs[0].String() != "10.1.0.0/16" || len(st.Remotes) != 0 || st.Heartbeat.IsZero() {
		t.Fatalf("status before connect: %+v", st)
	}

	// A bundle c2 exported for c1, through RemoteBundle and a file.
	d2, err := etcdserver.OpenDataDir(c2.DataDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := RemoteBundle(ctx, d2, "c1", []string{c2.Endpoint()})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "c2-for-c1.json")
	if dir, err := WriteBundle(b, file); err != nil || dir {
		t.Fatalf("WriteBundle(file) = %v, %v", dir, err)
	}
	if b, err = ReadBundle(file); err != nil {
		t.Fatal(err)
	}

	done, err := Connect(ctx, kv, b, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if done.Local != "c1" || done.Remote.Name != "c2" || done.Config.ID != 2 || done.Updated {
		t.Fatalf("Connect = %+v", done)
	}
	if again, err := Connect(ctx, kv, b, 5*time.Second); err != nil || !again.Updated {
		t.Fatalf("second Connect = %+v, %v; want updated", again, err)
	}
	synced, err := WaitSynced(ctx, kv, "c2", 30*time.Second)
	if err != nil || !synced.Ready || synced.Cluster != "c2" {
		t.Fatalf("WaitSynced = %+v, %v", synced, err)
	}
	st, err = ReadStatus(ctx, kv)
	if err != nil || len(st.Remotes) != 1 || st.Remotes[0].State != mirror.StateConnected {
		t.Fatalf("status after connect: %+v, %v", st, err)
	}
	if names, err := Remotes(ctx, kv); err != nil || strings.Join(names, ",") != "c2" {
		t.Fatalf("Remotes = %v, %v", names, err)
	}

	// c3 has c2's ID: refused, nothing written.
	b3 := c3.RemoteBundle(t, "c1")
	_, err = Connect(ctx, kv, b3, 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "refusing to connect cluster c3") || !strings.Contains(err.Error(), "connected cluster c2") {
		t.Fatalf("Connect c3: %v", err)
	}
	if _, found, _ := kv.Get(ctx, etcdserver.RemoteKey("c3")); found {
		t.Fatal("a refused cluster was written")
	}
	// A bundle c2 made for another cluster does not let c1 in.
	if _, err := Connect(ctx, kv, c2.RemoteBundle(t, "c9"), 2*time.Second); err == nil {
		t.Fatal("Connect with a bundle made for c9 succeeded")
	}
	// Nothing listens: a timely error naming the remote.
	b.Endpoints = []string{"https://127.0.0.1:1"}
	if _, err := Connect(ctx, kv, b, 500*time.Millisecond); err == nil || !strings.Contains(err.Error(), "cannot reach cluster c2") {
		t.Fatalf("Connect to nothing: %v", err)
	}

	if err := Disconnect(ctx, kv, "c2"); err != nil {
		t.Fatal(err)
	}
	if err := RevokeAccess(ctx, kv, "c2"); err != nil {
		t.Fatal(err)
	}
	if err := Disconnect(ctx, kv, "c2"); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("second Disconnect: %v", err)
	}
	if err := Disconnect(ctx, kv, "Not_A_Name"); err == nil {
		t.Fatal("Disconnect accepted a bad name")
	}
	// Now c3 no longer conflicts.
	if _, err := Connect(ctx, kv, b3, 5*time.Second); err != nil {
		t.Fatalf("Connect c3 after c2 left: %v", err)
	}
}

// Without a bundle, Dial uses the one server under DataDirRoot.
func TestDialFindsTheServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := (&Conn{DataDirRoot: t.TempDir()}).Dial(ctx); err == nil || !strings.Contains(err.Error(), "--kvstore-bundle DIR or "+EnvBundle) {
		t.Fatalf("Dial without bundle or server: %v", err)
	}
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	conn := &Conn{DataDirRoot: filepath.Dir(c1.DataDir())}
	kv, err := conn.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer kv.Close()
	if conn.Bundle != c1.RootBundleDir() || len(conn.Endpoints) != 1 {
		t.Errorf("found bundle %s, endpoints %v", conn.Bundle, conn.Endpoints)
	}
	if info, _, err := LocalCluster(ctx, kv); err != nil || info.Cluster != "c1" {
		t.Fatalf("LocalCluster = %+v, %v", info, err)
	}
	if _, err := LoadBundleDir(t.TempDir()); err == nil || !strings.Contains(err.Error(), "--kvstore-bundle") {
		t.Fatalf("LoadBundleDir of an empty dir: %v", err)
	}
}

func TestBundleDirRoundTrip(t *testing.T) {
	c1 := servertest.Start(t, "c1", 1, "10.1.0.0/16")
	b := c1.RemoteBundle(t, "c2")
	dir := filepath.Join(t.TempDir(), "out") + "/"
	isDir, err := WriteBundle(b, dir)
	if err != nil || !isDir {
		t.Fatalf("WriteBundle(dir/) = %v, %v", isDir, err)
	}
	for _, f := range []string{etcdserver.BundleCAFile, etcdserver.BundleCertFile, etcdserver.BundleKeyFile, BundleFileInDir} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Mode().Perm()&0o077 != 0 && f == etcdserver.BundleKeyFile {
			t.Errorf("%s: %v %v", f, fi, err)
		}
	}
	back, err := ReadBundle(dir)
	if err != nil || back.Cluster != "c1" || back.User != b.User {
		t.Fatalf("ReadBundle(dir) = %+v, %v", back, err)
	}
	if _, err := LoadBundleDir(dir); err != nil {
		t.Fatalf("LoadBundleDir: %v", err)
	}
}

func TestLoopbackOnly(t *testing.T) {
	for _, c := range []struct {
		eps  []string
		want bool
	}{
		{[]string{"https://127.0.0.1:2379"}, true},
		{[]string{"https://localhost:2379", "https://[::1]:2379"}, true},
		{[]string{"https://127.0.0.1:2379", "https://192.0.2.1:2379"}, false},
		{[]string{"https://etcd.example:2379"}, false},
		{nil, false},
	} {
		if got := LoopbackOnly(c.eps); got != c.want {
			t.Errorf("LoopbackOnly(%v) = %v", c.eps, got)
		}
	}
}
