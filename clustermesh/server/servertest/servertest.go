// Package servertest starts real isthmus-clustermesh servers
// (server.Start: embedded etcd with mTLS, mirror, service syncer) on
// free loopback ports with temp data dirs and fast timings, for tests of
// this module. Everything is stopped when the test ends, also on failure.
package servertest

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/clustermesh/servicesync"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// Logger is what test servers log to: errors only, unless
// ISTHMUS_TEST_LOG=debug|info|warn.
func Logger() *slog.Logger {
	level := slog.LevelError
	switch os.Getenv("ISTHMUS_TEST_LOG") {
	case "debug":
		level = slog.LevelDebug
	case "info":
		level = slog.LevelInfo
	case "warn":
		level = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// Cluster is one cluster's server, started and stopped at will on the
// same ports and data dir.
//
// Peers reach it through a Proxy (its advertised endpoint, so bundles name
// the proxy): Stop cuts the proxy's connections first, since the embedded
// etcd otherwise waits up to its request timeout (7 s) for the watch
// streams of connected peers to end. Tests also use the proxy to make the
// server unreachable while it runs.
type Cluster struct {
	Name   string
	ID     uint32
	Config server.Config
	Proxy  *etcdtest.Proxy

	mu sync.Mutex
	a  *server.APIServer
}

// New prepares (does not start) the server of cluster name with ID id and
// the given pod CIDRs.
func New(t testing.TB, name string, id uint32, podCIDRs ...string) *Cluster {
	t.Helper()
	var cidrs []netip.Prefix
	for _, c := range podCIDRs {
		cidrs = append(cidrs, netip.MustParsePrefix(c))
	}
	listen := FreeAddr(t)
	proxy := etcdtest.StartProxy(t, listen)
	return &Cluster{Name: name, ID: id, Proxy: proxy, Config: server.Config{
		Server: etcdserver.Config{
			ClusterName: name, ClusterID: id, PodCIDRs: cidrs,
			DataDir:      filepath.Join(t.TempDir(), name),
			ListenClient: listen, ListenPeer: FreeAddr(t),
			AdvertiseClient: []string{proxy.URL()},
			UnsafeNoFsync:   true, Logger: Logger(),
		},
		Mirror: mirror.Config{
			ProbeInterval: 100 * time.Millisecond, DialTimeout: time.Second,
			RetryMin: 50 * time.Millisecond, RetryMax: 300 * time.Millisecond,
			StatusInterval: 50 * time.Millisecond,
		},
		ServiceSync: servicesync.Config{Debounce: 5 * time.Millisecond},
	}}
}

// Start prepares and starts a server (see New).
func Start(t testing.TB, name string, id uint32, podCIDRs ...string) *Cluster {
	t.Helper()
	c := New(t, name, id, podCIDRs...)
	c.Start(t)
	return c
}

// Start starts the server; it is stopped when the test ends.
func (c *Cluster) Start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := server.Start(ctx, c.Config)
	// FreeAddr's ports were free a moment ago; an outgoing connection of
	// another test process may hold one as its local port for a while.
	// The proxy points at these ports, so wait for them rather than pick
	// others.
	for i := 0; err != nil && strings.Contains(err.Error(), "address already in use") && i < 20; i++ {
		time.Sleep(250 * time.Millisecond)
		a, err = server.Start(ctx, c.Config)
	}
	if err != nil {
		t.Fatalf("start the server of %s: %v", c.Name, err)
	}
	c.mu.Lock()
	c.a = a
	c.mu.Unlock()
	t.Cleanup(c.Stop)
}

// Stop stops the server (idempotent); data and ports stay for Start. The
// proxy is cut meanwhile and restored afterwards unless it was cut before.
func (c *Cluster) Stop() {
	c.mu.Lock()
	a := c.a
	c.a = nil
	c.mu.Unlock()
	if a == nil {
		return
	}
	wasCut := c.Proxy.IsCut()
	c.Proxy.Cut()
	a.Close()
	if !wasCut {
		c.Proxy.Restore()
	}
}

// API returns the running server (nil while stopped).
func (c *Cluster) API() *server.APIServer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.a
}

// KV returns the running server's root client of its etcd.
func (c *Cluster) KV() *kvstore.Client { return c.API().Server.Client() }

// Endpoint returns the etcd client URL peers use (the proxy's).
func (c *Cluster) Endpoint() string { return c.Proxy.URL() }

// DataDir returns the server's data dir.
func (c *Cluster) DataDir() string { return c.Config.Server.DataDir }

// RootBundleDir returns the directory of the root bundle (ca.crt,
// client.crt, client.key), as the CLI's --kvstore-bundle takes it.
func (c *Cluster) RootBundleDir() string {
	return filepath.Join(c.DataDir(), "pki", "bundles", etcdserver.UserRoot)
}

// RemoteBundle exports the bundle with which cluster `for` reads this one.
func (c *Cluster) RemoteBundle(t testing.TB, forCluster string) etcdserver.Bundle {
	t.Helper()
	b, err := c.API().Server.ExportRemoteBundle(context.Background(), forCluster)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Connect makes from mirror to (writes from's record isthmus/remotes/<to>),
// reaching to at endpoints (default: its own address).
func Connect(t testing.TB, from, to *Cluster, endpoints ...string) {
	t.Helper()
	b := to.RemoteBundle(t, from.Name)
	if len(endpoints) > 0 {
		b.Endpoints = endpoints
	}
	v, err := mirror.RemoteFromBundle(b).Marshal(from.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := from.KV().Put(context.Background(), etcdserver.RemoteKey(to.Name), v); err != nil {
		t.Fatal(err)
	}
}

// Eventually calls f until it returns nil, failing the test with f's last
// error after timeout.
func Eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %v", what, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// FreeAddr returns a loopback host:port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}
