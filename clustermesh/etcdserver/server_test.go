package etcdserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
)

var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func testConfig(t *testing.T) Config {
	return Config{
		ClusterName:       "c1",
		ClusterID:         1,
		PodCIDRs:          []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
		DataDir:           t.TempDir(),
		ListenClient:      etcdtest.FreeAddr(t),
		ListenPeer:        etcdtest.FreeAddr(t),
		HeartbeatInterval: 50 * time.Millisecond,
		Logger:            quiet,
	}
}

// sharedConfig is testConfig with the insecure shared "agents" credential,
// for the tests of that credential.
func sharedConfig(t *testing.T) Config {
	cfg := testConfig(t)
	cfg.SharedAgentCredential = true
	return cfg
}

func start(t *testing.T, cfg Config) *Server {
	t.Helper()
	s, err := Start(testCtx(t), cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func connectBundle(t *testing.T, b Bundle) *kvstore.Client {
	t.Helper()
	kc, err := b.KVConfig()
	if err != nil {
		t.Fatal(err)
	}
	kc.Logger = quiet
	c, err := kvstore.Connect(testCtx(t), kc)
	if err != nil {
		t.Fatalf("connect as %s: %v", b.User, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// refused checks that a client with this TLS config cannot reach etcd.
func refused(t *testing.T, what string, endpoint string, tc *tls.Config) {
	t.Helper()
	c, err := kvstore.Connect(testCtx(t), kvstore.Config{
		Endpoints: []string{endpoint}, TLS: tc, DialTimeout: 500 * time.Millisecond, Logger: quiet,
	})
	if err == nil {
		c.Close()
		t.Errorf("%s: connected, want refused", what)
	}
}

func isPermissionDenied(err error) bool {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if errors.Is(rpctypes.Error(e), rpctypes.ErrPermissionDenied) {
			return true
		}
	}
	return false
}

func TestEmbeddedMTLSAndAuth(t *testing.T) {
	ctx := testCtx(t)
	cfg := sharedConfig(t)
	s := start(t, cfg)

	b, err := s.ExportBundle()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Validate(); err != nil {
		t.Fatal(err)
	}
	if b.User != "agents" || len(b.Endpoints) != 1 || b.Endpoints[0] != "https://"+cfg.ListenClient {
		t.Errorf("bundle: user %q endpoints %v", b.User, b.Endpoints)
	}
	agents := connectBundle(t, b)

	// Put/get under isthmus/ works for agents.
	key := records.NodeKey("c1", "n1")
	if err := agents.Put(ctx, key, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if kv, found, err := agents.Get(ctx, key); err != nil || !found || string(kv.Value) != "x" {
		t.Fatalf("Get = %q %v %v", kv.Value, found, err)
	}
	if err := agents.Put(ctx, "elsewhere", []byte("x")); !isPermissionDenied(err) {
		t.Errorf("agents writing outside isthmus/ = %v, want permission denied", err)
	}

	// The cluster config and a heartbeat are there.
	kv, found, err := agents.Get(ctx, records.ClusterConfigKey("c1"))
	if err != nil || !found {
		t.Fatalf("cluster config: %v %v", found, err)
	}
	cc, err := records.ValidateClusterConfig(kv.Key, kv.Value, "c1", 1)
	if err != nil || cc.PodCIDRs[0] != cfg.PodCIDRs[0] {
		t.Fatalf("cluster config %+v: %v", cc, err)
	}
	first, found, _ := agents.Get(ctx, records.HeartbeatKey("c1"))
	if !found {
		t.Fatal("no heartbeat")
	}
	if _, err := records.DecodeStamp(first.Value); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		kv, _, _ := agents.Get(ctx, records.HeartbeatKey("c1"))
		if kv.ModRevision > first.ModRevision {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("heartbeat not renewed")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Clients without a certificate of this CA are refused.
	endpoint := "https://" + cfg.ListenClient
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(b.CACert)
	refused(t, "no client certificate", endpoint, &tls.Config{RootCAs: pool, ServerName: ServerName("c1")})
	other, err := openPKI(filepath.Join(t.TempDir(), "pki"), "evil")
	if err != nil {
		t.Fatal(err)
	}
	evil, _ := other.issue(UserAgents, false, sans{})
	evilCert, _ := evil.tls()
	refused(t, "certificate of another CA", endpoint, &tls.Config{RootCAs: pool, ServerName: ServerName("c1"), Certificates: []tls.Certificate{evilCert}})
	refused(t, "plain http", "http://"+cfg.ListenClient, nil)

	// A remote cluster's user reads but cannot write; removing it cuts it off.
	rb, err := s.ExportRemoteBundle(ctx, "c2")
	if err != nil {
		t.Fatal(err)
	}
	remote := connectBundle(t, rb)
	if _, found, err := remote.Get(ctx, key); err != nil || !found {
		t.Fatalf("remote read: %v %v", found, err)
	}
	if err := remote.Put(ctx, key, []byte("y")); !isPermissionDenied(err) {
		t.Errorf("remote write = %v, want permission denied", err)
	}
	if _, _, err := remote.Get(ctx, "isthmus/config/x"); !isPermissionDenied(err) {
		t.Errorf("remote read outside its prefixes = %v, want permission denied", err)
	}
	if err := s.RemoveRemote(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := remote.Get(ctx, key); err == nil {
		t.Error("removed remote user can still read")
	}
	if _, err := s.ExportRemoteBundle(ctx, "c1"); err == nil {
		t.Error("remote bundle for the cluster itself: want error")
	}

	// The bundle directories agents and the CLI load are on disk.
	for _, user := range []string{UserAgents, UserRoot} {
		dir := s.BundleDir(user)
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, BundleCertFile), filepath.Join(dir, BundleKeyFile))
		if err != nil {
			t.Fatalf("bundle dir of %s: %v", user, err)
		}
		leaf, _ := x509.ParseCertificate(cert.Certificate[0])
		if leaf.Subject.CommonName != user {
			t.Errorf("bundle dir of %s holds a certificate for %q", user, leaf.Subject.CommonName)
		}
		ca, _ := os.ReadFile(filepath.Join(dir, BundleCAFile))
		if !bytes.Equal(ca, b.CACert) {
			t.Errorf("bundle dir of %s: wrong CA", user)
		}
		if fi, _ := os.Stat(filepath.Join(dir, BundleKeyFile)); fi.Mode().Perm() != 0o600 {
			t.Errorf("bundle key of %s has mode %o", user, fi.Mode().Perm())
		}
		// Loaded the way agents do (no ServerName override): the
		// certificate's IP SANs cover the listen address.
		c, err := kvstore.Connect(ctx, kvstore.Config{Endpoints: b.Endpoints, Logger: quiet,
			TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}})
		if err != nil {
			t.Fatalf("connect with the %s bundle dir: %v", user, err)
		}
		c.Close()
	}

	// Bundles survive a round trip through a file.
	path := filepath.Join(t.TempDir(), "agents.json")
	if err := b.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	if back, err := ReadBundle(path); err != nil || !bytes.Equal(back.Key, b.Key) {
		t.Fatalf("ReadBundle: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("bundle file mode %o", fi.Mode().Perm())
	}
}

func TestRestartReusesDataAndPKI(t *testing.T) {
	ctx := testCtx(t)
	cfg := sharedConfig(t)
	s1 := start(t, cfg)
	b1, _ := s1.ExportBundle()
	c1 := connectBundle(t, b1)
	if err := c1.Put(ctx, "isthmus/state/nodes/v1/c1/n1", []byte("kept")); err != nil {
		t.Fatal(err)
	}
	c1.Close()
	caBefore, _ := os.ReadFile(filepath.Join(cfg.DataDir, "pki", "ca.crt"))
	serverBefore, _ := os.ReadFile(filepath.Join(cfg.DataDir, "pki", "server.crt"))
	s1.Close()

	s2 := start(t, cfg)
	caAfter, _ := os.ReadFile(filepath.Join(cfg.DataDir, "pki", "ca.crt"))
	serverAfter, _ := os.ReadFile(filepath.Join(cfg.DataDir, "pki", "server.crt"))
	if !bytes.Equal(caBefore, caAfter) || !bytes.Equal(serverBefore, serverAfter) {
		t.Error("restart re-created the CA or the server certificate")
	}
	b2, _ := s2.ExportBundle()
	if !bytes.Equal(b1.Cert, b2.Cert) || !bytes.Equal(b1.Key, b2.Key) {
		t.Error("restart re-issued the agents certificate")
	}
	// The old bundle still works and the data is still there.
	c2 := connectBundle(t, b1)
	if kv, found, err := c2.Get(ctx, "isthmus/state/nodes/v1/c1/n1"); err != nil || !found || string(kv.Value) != "kept" {
		t.Fatalf("after restart: %q %v %v", kv.Value, found, err)
	}
	c2.Close()
	s2.Close()

	// The data dir belongs to cluster c1 with ID 1.
	wrongID := cfg
	wrongID.ClusterID = 2
	if _, err := Start(ctx, wrongID); err == nil || !strings.Contains(err.Error(), "cluster ID 1") {
		t.Errorf("restart with another cluster ID = %v", err)
	}
	wrongName := cfg
	wrongName.ClusterName = "c9"
	if _, err := Start(ctx, wrongName); err == nil || !strings.Contains(err.Error(), `cluster "c1"`) {
		t.Errorf("restart as another cluster = %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	ctx := testCtx(t)
	base := testConfig(t)
	for name, tt := range map[string]struct {
		mod  func(c *Config)
		want string
	}{
		"no data dir":   {func(c *Config) { c.DataDir = "" }, "DataDir"},
		"bad name":      {func(c *Config) { c.ClusterName = "C_1" }, "cluster name"},
		"id 0":          {func(c *Config) { c.ClusterID = 0 }, "cluster ID 0"},
		"id too big":    {func(c *Config) { c.ClusterID = 4096 }, "cluster ID 4096"},
		"port 0":        {func(c *Config) { c.ListenClient = "127.0.0.1:0" }, "ListenClient"},
		"host name":     {func(c *Config) { c.ListenPeer = "localhost:2380" }, "ListenPeer"},
		"same ports":    {func(c *Config) { c.ListenPeer = c.ListenClient }, "both"},
		"overlap cidrs": {func(c *Config) { c.PodCIDRs = append(c.PodCIDRs, netip.MustParsePrefix("10.1.2.0/24")) }, "overlaps"},
		"bad advertise": {func(c *Config) { c.AdvertiseClient = []string{"http://x:1"} }, "AdvertiseClient"},
	} {
		cfg := base
		tt.mod(&cfg)
		s, err := Start(ctx, cfg)
		if err == nil {
			s.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", name, err, tt.want)
		}
	}
}

func TestHalfPKIRefused(t *testing.T) {
	dir := t.TempDir()
	if _, err := openPKI(dir, "c1"); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(dir, "ca.key"))
	if _, err := openPKI(dir, "c1"); err == nil || !strings.Contains(err.Error(), "ca.key") {
		t.Errorf("CA certificate without key = %v, want an error naming ca.key", err)
	}
}

func TestExternalEtcd(t *testing.T) {
	ctx := testCtx(t)
	e := etcdtest.Start(t)
	s := start(t, Config{ClusterName: "ext", ClusterID: 7, EtcdEndpoints: []string{e.Endpoint}, Logger: quiet})
	kv, found, err := s.Client().Get(ctx, records.ClusterConfigKey("ext"))
	if err != nil || !found {
		t.Fatalf("cluster config in external etcd: %v %v", found, err)
	}
	if _, err := records.ValidateClusterConfig(kv.Key, kv.Value, "ext", 7); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ExportBundle(); err == nil {
		t.Error("ExportBundle in external mode: want error")
	}
	s.Close()
	// Another cluster pointed at the same etcd is refused.
	if _, err := Start(ctx, Config{ClusterName: "other", ClusterID: 8, EtcdEndpoints: []string{e.Endpoint}, Logger: quiet}); err == nil ||
		!strings.Contains(err.Error(), `cluster "ext"`) {
		t.Errorf("second cluster on one etcd = %v", err)
	}
}

// The in-process client writes as root, what the TLS client reads; and
// the identity it adds is what makes it root: the same in-process client
// without it is refused (auth is on), so the root certificate in the
// request's context is not a formality.
func TestInProcessClientIsRoot(t *testing.T) {
	s := start(t, testConfig(t))
	ctx := testCtx(t)
	ip := s.InProcessClient()
	if ip == s.Client() {
		t.Fatal("no in-process client")
	}
	key := "isthmus/cache/ip/v1/c9/n1/10.9.0.1"
	ops := []kvstore.Op{kvstore.OpPut(key, []byte("v1"))}
	if _, err := ip.Txn(ctx, nil, ops); err != nil {
		t.Fatalf("in-process txn: %v", err)
	}
	if kv, found, err := s.Client().Get(ctx, key); err != nil || !found || string(kv.Value) != "v1" {
		t.Fatalf("read back over TLS: %q %v %v", kv.Value, found, err)
	}
	bare := kvstore.InProcess(v3client.New(s.etcd.Server), kvstore.Config{Endpoints: []string{"in-process"}, Logger: quiet}, nil)
	defer bare.Close()
	if _, err := bare.Txn(ctx, nil, []kvstore.Op{kvstore.OpPut(key, []byte("v2"))}); err == nil {
		t.Fatal("an in-process txn without the root identity was accepted")
	} else {
		t.Logf("refused as expected: %v", err)
	}
}
