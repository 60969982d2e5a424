package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Config configures a clustermesh server.
type Config struct {
	ClusterName string
	ClusterID   uint32
	PodCIDRs    []netip.Prefix
	// DataDir holds the embedded etcd's data (DataDir/etcd) and the PKI
	// (DataDir/pki). Required in embedded mode.
	DataDir string
	// ListenClient and ListenPeer are the IP:port the embedded etcd serves
	// clients and peers on. Defaults 127.0.0.1:2379 and 127.0.0.1:2380.
	ListenClient, ListenPeer string
	// AdvertiseClient are the client URLs put into exported bundles
	// (default https://<ListenClient>, with 127.0.0.1 for an unspecified
	// listen address). Their hosts are added to the server certificate.
	AdvertiseClient []string
	// ExtraSANs are more DNS names or IPs for the server certificate.
	ExtraSANs []string

	// EtcdEndpoints selects external mode: use this etcd instead of an
	// embedded one. Its users and certificates are managed by whoever
	// runs it; EtcdTLS, EtcdUsername and EtcdPassword are the server's
	// credentials.
	EtcdEndpoints []string
	EtcdTLS       *tls.Config
	EtcdUsername  string
	EtcdPassword  string

	// HeartbeatInterval is how often the heartbeat key is written.
	// Default 5 s.
	HeartbeatInterval time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Etcd users and roles of the embedded etcd.
const (
	UserRoot   = "root"
	UserAgents = "agents"
	roleAgents = "agents"
	// roleRemote is shared by every remote-<cluster> user: read-only
	// access to what remote clusters mirror. One user per remote cluster
	// lets one be cut off (RemoveRemote) without touching the others.
	roleRemote = "remote"
)

// RemoteUser returns the etcd user of a connected remote cluster.
func RemoteUser(cluster string) string { return "remote-" + cluster }

// remotePrefixes are what a remote cluster may read.
var remotePrefixes = []string{
	records.ClusterConfigPrefix, records.HeartbeatPrefix, records.StateRoot, records.SyncedPrefix,
}

// Server is a running clustermesh server.
type Server struct {
	cfg  Config
	log  *slog.Logger
	etcd *embed.Etcd // nil in external mode
	pki  *pki        // nil in external mode
	kv   *kvstore.Client

	endpoints []string // for bundles

	cancel   context.CancelFunc
	wg       sync.WaitGroup
	once     sync.Once
	stopping atomic.Bool
}

func (c *Config) setDefaults() {
	if c.ListenClient == "" {
		c.ListenClient = "127.0.0.1:2379"
	}
	if c.ListenPeer == "" {
		c.ListenPeer = "127.0.0.1:2380"
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = 5 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

func (c *Config) clusterConfig() records.ClusterConfig {
	return records.ClusterConfig{
		Version:  records.CurrentVersion,
		Name:     c.ClusterName,
		ID:       c.ClusterID,
		PodCIDRs: c.PodCIDRs,
	}
}

func (c *Config) validate() error {
	if err := c.clusterConfig().Validate(); err != nil {
		return fmt.Errorf("clustermesh config: %w", err)
	}
	if len(c.EtcdEndpoints) > 0 {
		return nil
	}
	if c.DataDir == "" {
		return errors.New("clustermesh config: DataDir is required for the embedded etcd")
	}
	for name, a := range map[string]string{"ListenClient": c.ListenClient, "ListenPeer": c.ListenPeer} {
		ap, err := netip.ParseAddrPort(a)
		if err != nil || ap.Port() == 0 {
			return fmt.Errorf("clustermesh config: %s %q: want IP:port with a non-zero port", name, a)
		}
	}
	if c.ListenClient == c.ListenPeer {
		return fmt.Errorf("clustermesh config: ListenClient and ListenPeer are both %s", c.ListenClient)
	}
	return nil
}

// Run starts the server and serves until ctx ends or the embedded etcd
// fails.
func Run(ctx context.Context, cfg Config) error {
	s, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	var etcdErr <-chan error
	if s.etcd != nil {
		etcdErr = s.etcd.Err()
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-etcdErr:
		return fmt.Errorf("embedded etcd failed: %w", err)
	}
}

// Start starts the server and returns once etcd serves, auth is set up and
// the cluster config is written. Close stops it.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("cluster", cfg.ClusterName)}
	ok := false
	defer func() {
		if !ok {
			s.Close()
		}
	}()
	var err error
	if len(cfg.EtcdEndpoints) > 0 {
		s.kv, err = kvstore.Connect(ctx, kvstore.Config{
			Endpoints: cfg.EtcdEndpoints, TLS: cfg.EtcdTLS,
			Username: cfg.EtcdUsername, Password: cfg.EtcdPassword, Logger: s.log,
		})
		if err != nil {
			return nil, fmt.Errorf("clustermesh: external etcd: %w", err)
		}
		s.endpoints = append([]string(nil), cfg.EtcdEndpoints...)
	} else if err := s.startEmbedded(ctx); err != nil {
		return nil, err
	}
	if err := s.writeClusterConfig(ctx); err != nil {
		return nil, err
	}
	hctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.wg.Go(func() { s.heartbeat(hctx) })
	ok = true
	s.log.Info("clustermesh server running", "endpoints", s.endpoints, "embedded", s.etcd != nil)
	return s, nil
}

// sans returns the names the server certificate must carry.
func (s *Server) sans() (sans, error) {
	n := sans{
		dns: []string{"*." + MeshDomain, ServerName(s.cfg.ClusterName), "localhost"},
		ips: []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback},
	}
	add := func(host string) {
		if ip := net.ParseIP(host); ip != nil {
			if !ip.IsUnspecified() {
				if v4 := ip.To4(); v4 != nil {
					ip = v4
				}
				n.ips = append(n.ips, ip)
			}
		} else if host != "" {
			n.dns = append(n.dns, host)
		}
	}
	for _, a := range []string{s.cfg.ListenClient, s.cfg.ListenPeer} {
		host, _, _ := net.SplitHostPort(a)
		add(host)
	}
	for _, a := range s.cfg.AdvertiseClient {
		u, err := url.Parse(a)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return sans{}, fmt.Errorf("clustermesh config: AdvertiseClient %q: want https://host:port", a)
		}
		add(u.Hostname())
	}
	for _, name := range s.cfg.ExtraSANs {
		add(name)
	}
	return n, nil
}

func (s *Server) startEmbedded(ctx context.Context) error {
	if err := os.MkdirAll(s.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("clustermesh: data dir: %w", err)
	}
	names, err := s.sans()
	if err != nil {
		return err
	}
	s.pki, err = openPKI(filepath.Join(s.cfg.DataDir, "pki"), s.cfg.ClusterName)
	if err != nil {
		return fmt.Errorf("clustermesh: %w", err)
	}
	if _, err := s.pki.ensure("server", ServerName(s.cfg.ClusterName), true, names); err != nil {
		return fmt.Errorf("clustermesh: %w", err)
	}
	root, err := s.pki.ensure(UserRoot, UserRoot, false, sans{})
	if err != nil {
		return fmt.Errorf("clustermesh: %w", err)
	}
	if _, err := s.pki.ensure(UserAgents, UserAgents, false, sans{}); err != nil {
		return fmt.Errorf("clustermesh: %w", err)
	}

	clientURL := url.URL{Scheme: "https", Host: s.cfg.ListenClient}
	peerURL := url.URL{Scheme: "https", Host: s.cfg.ListenPeer}
	certFile, keyFile := s.pki.paths("server")
	caFile, _ := s.pki.paths("ca")
	ecfg := embed.NewConfig()
	ecfg.Name = "isthmus-" + s.cfg.ClusterName
	ecfg.Dir = filepath.Join(s.cfg.DataDir, "etcd")
	ecfg.ListenClientUrls = []url.URL{clientURL}
	ecfg.AdvertiseClientUrls = []url.URL{clientURL}
	ecfg.ListenPeerUrls = []url.URL{peerURL}
	ecfg.AdvertisePeerUrls = []url.URL{peerURL}
	ecfg.InitialCluster = ecfg.InitialClusterFromName(ecfg.Name)
	ecfg.InitialClusterToken = "isthmus-" + s.cfg.ClusterName
	ecfg.ClientTLSInfo.CertFile, ecfg.ClientTLSInfo.KeyFile = certFile, keyFile
	ecfg.ClientTLSInfo.TrustedCAFile = caFile
	ecfg.ClientTLSInfo.ClientCertAuth = true
	ecfg.PeerTLSInfo = ecfg.ClientTLSInfo
	// Keep an hour of history: a watcher that was away longer re-lists
	// (kvstore does that) instead of the database growing forever.
	ecfg.AutoCompactionMode = "periodic"
	ecfg.AutoCompactionRetention = "1h"
	ecfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(newEtcdLogger(s.log, &s.stopping))

	e, err := embed.StartEtcd(ecfg)
	if err != nil {
		return fmt.Errorf("clustermesh: start embedded etcd (client %s, peer %s, data %s): %w",
			s.cfg.ListenClient, s.cfg.ListenPeer, ecfg.Dir, err)
	}
	s.etcd = e
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		return fmt.Errorf("clustermesh: embedded etcd failed while starting: %w", err)
	case <-ctx.Done():
		return fmt.Errorf("clustermesh: waiting for the embedded etcd: %w", ctx.Err())
	}

	if len(s.cfg.AdvertiseClient) > 0 {
		s.endpoints = append([]string(nil), s.cfg.AdvertiseClient...)
	} else {
		ap := netip.MustParseAddrPort(s.cfg.ListenClient)
		if ap.Addr().IsUnspecified() {
			ap = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port())
		}
		s.endpoints = []string{"https://" + ap.String()}
	}

	// Bundle directories for the agents and for the CLI (root), rewritten
	// on every start so they always match the PKI.
	for _, user := range []string{UserAgents, UserRoot} {
		kp, err := s.pki.load(user)
		if err == nil {
			err = s.bundle(user, kp).WriteDir(s.BundleDir(user))
		}
		if err != nil {
			return fmt.Errorf("clustermesh: write %s bundle: %w", user, err)
		}
	}

	// The server's own client is root, by certificate.
	tc, err := s.clientTLS(root)
	if err != nil {
		return err
	}
	s.kv, err = kvstore.Connect(ctx, kvstore.Config{Endpoints: []string{clientURL.String()}, TLS: tc, Logger: s.log})
	if err != nil {
		return fmt.Errorf("clustermesh: connect to the embedded etcd: %w", err)
	}
	return s.setupAuth(ctx)
}

func (s *Server) clientTLS(kp keyPair) (*tls.Config, error) {
	cert, err := kp.tls()
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(s.pki.caCert)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool,
		ServerName: ServerName(s.cfg.ClusterName), MinVersion: tls.VersionTLS12}, nil
}

// setupAuth creates the roles and users and turns auth on. Every step is
// idempotent, so it runs on every start and repairs what is missing.
func (s *Server) setupAuth(ctx context.Context) error {
	if err := s.kv.EnsureRole(ctx, roleAgents, kvstore.Permission{Prefix: records.Root, Write: true}); err != nil {
		return fmt.Errorf("clustermesh: etcd auth: %w", err)
	}
	var perms []kvstore.Permission
	for _, p := range remotePrefixes {
		perms = append(perms, kvstore.Permission{Prefix: p})
	}
	if err := s.kv.EnsureRole(ctx, roleRemote, perms...); err != nil {
		return fmt.Errorf("clustermesh: etcd auth: %w", err)
	}
	// Users without password: they can only log in with a certificate of
	// this cluster's CA whose common name is the user name.
	if err := s.kv.EnsureUser(ctx, UserRoot, "", "root"); err != nil {
		return fmt.Errorf("clustermesh: etcd auth: %w", err)
	}
	if err := s.kv.EnsureUser(ctx, UserAgents, "", roleAgents); err != nil {
		return fmt.Errorf("clustermesh: etcd auth: %w", err)
	}
	if err := s.kv.EnableAuth(ctx); err != nil {
		return fmt.Errorf("clustermesh: etcd auth: %w", err)
	}
	return nil
}

// writeClusterConfig refuses an etcd that belongs to another cluster (a
// data dir or external etcd reused by mistake), then writes ours.
func (s *Server) writeClusterConfig(ctx context.Context) error {
	kvs, _, err := s.kv.GetPrefix(ctx, records.ClusterConfigPrefix)
	if err != nil {
		return fmt.Errorf("clustermesh: read cluster config: %w", err)
	}
	for _, kv := range kvs {
		name, _ := records.ParseClusterConfigKey(kv.Key)
		c, derr := records.DecodeClusterConfig(kv.Value)
		switch {
		case name != s.cfg.ClusterName:
			return fmt.Errorf("clustermesh: this etcd (%s) holds the config of cluster %q, not %q: refusing to share it",
				s.where(), name, s.cfg.ClusterName)
		case derr != nil:
			s.log.Warn("replacing unreadable cluster config", "key", kv.Key, "err", derr)
		case c.ID != s.cfg.ClusterID:
			return fmt.Errorf("clustermesh: cluster %q was created with cluster ID %d in %s, not %d: identities of the old ID would be misread",
				name, c.ID, s.where(), s.cfg.ClusterID)
		}
	}
	value, err := s.cfg.clusterConfig().Marshal()
	if err != nil {
		return err
	}
	if err := s.kv.Put(ctx, records.ClusterConfigKey(s.cfg.ClusterName), value); err != nil {
		return fmt.Errorf("clustermesh: write cluster config: %w", err)
	}
	return nil
}

func (s *Server) where() string {
	if s.etcd != nil {
		return "data dir " + s.cfg.DataDir
	}
	return fmt.Sprint("etcd ", s.cfg.EtcdEndpoints)
}

func (s *Server) heartbeat(ctx context.Context) {
	t := time.NewTicker(s.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		value, err := records.Stamp{Cluster: s.cfg.ClusterName, Time: time.Now().UTC()}.Marshal()
		if err == nil {
			err = s.kv.Put(ctx, records.HeartbeatKey(s.cfg.ClusterName), value)
		}
		if err != nil && ctx.Err() == nil {
			s.log.Warn("clustermesh: heartbeat write failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Client returns the server's own etcd client (root in embedded mode).
func (s *Server) Client() *kvstore.Client { return s.kv }

// Endpoints returns the client URLs put into bundles.
func (s *Server) Endpoints() []string { return append([]string(nil), s.endpoints...) }

// BundleDir returns the directory where the bundle of user (agents, root)
// is kept: <DataDir>/pki/bundles/<user>.
func (s *Server) BundleDir(user string) string {
	return filepath.Join(s.cfg.DataDir, "pki", "bundles", user)
}

// ExportBundle returns the bundle for the cluster's agents: the CA and the
// "agents" client certificate (created on first start, reused since).
func (s *Server) ExportBundle() (Bundle, error) {
	if s.pki == nil {
		return Bundle{}, errors.New("clustermesh: external etcd: agent credentials are managed by whoever runs that etcd")
	}
	kp, err := s.pki.load(UserAgents)
	if err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: %w", err)
	}
	return s.bundle(UserAgents, kp), nil
}

// ExportRemoteBundle creates (or keeps) the read-only etcd user of remote
// cluster and returns a bundle with a fresh certificate for it, for that
// cluster's server to mirror this one.
func (s *Server) ExportRemoteBundle(ctx context.Context, remote string) (Bundle, error) {
	if s.pki == nil {
		return Bundle{}, errors.New("clustermesh: external etcd: remote credentials are managed by whoever runs that etcd")
	}
	if err := records.ValidateClusterName(remote); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: remote cluster: %w", err)
	}
	if remote == s.cfg.ClusterName {
		return Bundle{}, fmt.Errorf("clustermesh: remote cluster %q is this cluster", remote)
	}
	user := RemoteUser(remote)
	if err := s.kv.EnsureUser(ctx, user, "", roleRemote); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: create user %s: %w", user, err)
	}
	kp, err := s.pki.issue(user, false, sans{})
	if err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: %w", err)
	}
	return s.bundle(user, kp), nil
}

// RemoveRemote deletes the etcd user of remote cluster: its certificates
// stay valid TLS-wise but no longer map to a user, so every request fails.
func (s *Server) RemoveRemote(ctx context.Context, remote string) error {
	if err := records.ValidateClusterName(remote); err != nil {
		return fmt.Errorf("clustermesh: remote cluster: %w", err)
	}
	return s.kv.DeleteUser(ctx, RemoteUser(remote))
}

func (s *Server) bundle(user string, kp keyPair) Bundle {
	return Bundle{
		Cluster: s.cfg.ClusterName, ClusterID: s.cfg.ClusterID,
		Endpoints: s.Endpoints(), User: user,
		CACert: s.pki.caPEM, Cert: kp.certPEM, Key: kp.keyPEM,
	}
}

// Close stops the heartbeat, the client and the embedded etcd.
func (s *Server) Close() error {
	s.once.Do(func() {
		if s.cancel != nil {
			s.cancel()
		}
		s.wg.Wait()
		if s.kv != nil {
			s.kv.Close()
		}
		if s.etcd != nil {
			s.stopping.Store(true)
			s.etcd.Close()
		}
	})
	return nil
}
