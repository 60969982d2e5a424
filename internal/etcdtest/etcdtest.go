// Package etcdtest starts a real, embedded, single-member etcd for tests:
// plain HTTP on free loopback ports, data in the test's temp dir, fast
// timings, no fsync. It is for tests only.
package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Etcd is a running embedded etcd.
type Etcd struct {
	// Endpoint is the client URL, e.g. "http://127.0.0.1:34567".
	Endpoint string
	e        *embed.Etcd
	dir      string
	client   url.URL
	peer     url.URL
}

// Start starts an etcd that is stopped when the test ends.
func Start(t testing.TB) *Etcd {
	t.Helper()
	dir := t.TempDir()
	var lastErr error
	// Free ports are found by binding to port 0 and closing; another
	// process may grab one in between, so try a few times.
	for range 5 {
		cu, pu := url.URL{Scheme: "http", Host: FreeAddr(t)}, url.URL{Scheme: "http", Host: FreeAddr(t)}
		e := &Etcd{dir: filepath.Join(dir, "etcd"), client: cu, peer: pu, Endpoint: cu.String()}
		if lastErr = e.start(); lastErr == nil {
			t.Cleanup(e.Stop)
			return e
		}
	}
	t.Fatalf("etcdtest: start embedded etcd: %v", lastErr)
	return nil
}

func (e *Etcd) start() error {
	cfg := embed.NewConfig()
	cfg.Name = "test"
	cfg.Dir = e.dir
	cfg.ListenClientUrls = []url.URL{e.client}
	cfg.AdvertiseClientUrls = []url.URL{e.client}
	cfg.ListenPeerUrls = []url.URL{e.peer}
	cfg.AdvertisePeerUrls = []url.URL{e.peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// Short ticks: elections in milliseconds and lease TTLs of one second
	// are honoured.
	cfg.TickMs = 10
	cfg.ElectionMs = 100
	cfg.UnsafeNoFsync = true
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	select {
	case <-etcd.Server.ReadyNotify():
	case <-time.After(20 * time.Second):
		etcd.Close()
		return fmt.Errorf("etcd not ready after 20s")
	}
	e.e = etcd
	return nil
}

// Stop stops etcd (idempotent). Its data stays for Restart.
func (e *Etcd) Stop() {
	if e.e != nil {
		e.e.Close()
		e.e = nil
	}
}

// Restart starts etcd again on the same ports with the same data.
func (e *Etcd) Restart(t testing.TB) {
	t.Helper()
	e.Stop()
	if err := e.start(); err != nil {
		t.Fatalf("etcdtest: restart: %v", err)
	}
}

// FreeAddr returns a loopback host:port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("etcdtest: find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}
