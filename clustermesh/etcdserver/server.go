package etcdserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
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

	"github.com/isthmus-mesh/isthmus/internal/atomicfile"

	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

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
	// CADir, in embedded mode, holds the cluster's CA (ca.crt, ca.key; see
	// CA) to use instead of creating one in DataDir/pki on first start: it
	// is copied there. A data dir with another CA is refused.
	CADir string

	// EtcdEndpoints selects external mode: use this etcd instead of an
	// embedded one. Its users and certificates are managed by whoever
	// runs it; EtcdTLS, EtcdUsername and EtcdPassword are the server's
	// credentials.
	EtcdEndpoints []string
	EtcdTLS       *tls.Config
	EtcdUsername  string
	EtcdPassword  string

	// Capabilities are announced in the cluster config (records.Cap*):
	// what this server does besides storing state, e.g. mirroring.
	Capabilities []string

	// HeartbeatInterval is how often the heartbeat key is written.
	// Default 5 s.
	HeartbeatInterval time.Duration
	// SharedAgentCredential creates the etcd user "agents", one credential
	// every agent may share, which writes everything under isthmus/ but
	// isthmus/remotes/. Insecure: a node holding it can rewrite every
	// other node's records. Off, the user is removed and each node gets
	// its own (ExportNodeBundle, `isthmus clustermesh certs --node`).
	SharedAgentCredential bool
	// UnsafeNoFsync turns off the embedded etcd's fsync. For tests and
	// throw-away labs only: a crash can lose or corrupt data.
	UnsafeNoFsync bool
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// KVMetrics, when set, counts the calls of the server's own etcd
	// client for Prometheus.
	KVMetrics *kvstore.Metrics
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

// NodeUser returns the etcd user (and role) of one node of the cluster,
// which may write only that node's records (nodePermissions).
func NodeUser(node string) string { return records.NodeUser(node) }

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
	// inproc calls the embedded etcd in this process as root (nil in
	// external mode): see InProcessClient.
	inproc *kvstore.Client

	endpoints []string // for bundles
	localURL  string   // a client URL that works on this host
	started   time.Time

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
		Version:      records.CurrentVersion,
		Name:         c.ClusterName,
		ID:           c.ClusterID,
		PodCIDRs:     c.PodCIDRs,
		Capabilities: c.Capabilities,
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
	select {
	case <-ctx.Done():
		return nil
	case err := <-s.Err():
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
			Metrics: cfg.KVMetrics,
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
	if err := s.writeInfo(ctx); err != nil {
		return nil, err
	}
	// The first heartbeat before Start returns: it also marks the cluster
	// config above as this cluster's own (see writeClusterConfig).
	if err := s.writeHeartbeat(ctx); err != nil {
		return nil, fmt.Errorf("clustermesh: write heartbeat: %w", err)
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
	if s.cfg.CADir != "" {
		if err := seedCA(s.cfg.CADir, filepath.Join(s.cfg.DataDir, "pki"), s.cfg.ClusterName); err != nil {
			return err
		}
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
	// The client port serves gRPC only, on gRPC's own HTTP/2 transport:
	// sharing the port with etcd's HTTP endpoints routes every call
	// through net/http's HTTP/2 server and grpc's ServeHTTP, which took
	// several times the CPU per message (mirror writes, agents' watches,
	// remotes' lists). Nothing of Isthmus uses those endpoints (health and
	// metrics are isthmus-clustermesh's own, --metrics-listen); they go to
	// a port of their own on loopback, with the same TLS and client
	// certificates. (ListenClient is never port 0, so the two never clash.)
	ecfg.ListenClientHttpUrls = []url.URL{{Scheme: "https", Host: "127.0.0.1:0"}}
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
	ecfg.UnsafeNoFsync = s.cfg.UnsafeNoFsync
	// The mirror writes remote clusters in large transactions (one raft
	// round and fsync each); etcd's default of 128 operations would make a
	// full sync of 100k endpoints take several times longer.
	ecfg.MaxTxnOps = MaxTxnOps

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
	lap := netip.MustParseAddrPort(s.cfg.ListenClient)
	if lap.Addr().IsUnspecified() {
		lap = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), lap.Port())
	}
	s.localURL = "https://" + lap.String()

	// Bundle directories for the CLI (root) and, when shared, the agents,
	// rewritten on every start so they always match the PKI.
	users := []string{UserRoot}
	if s.cfg.SharedAgentCredential {
		users = append(users, UserAgents)
	} else if err := os.RemoveAll(s.BundleDir(UserAgents)); err != nil {
		return fmt.Errorf("clustermesh: remove the shared agents bundle: %w", err)
	}
	for _, user := range users {
		kp, err := s.pki.load(user)
		if err == nil {
			err = s.bundle(user, kp).WriteDir(s.BundleDir(user))
		}
		if err != nil {
			return fmt.Errorf("clustermesh: write %s bundle: %w", user, err)
		}
	}

	// The server's own client is root, by certificate. It dials localURL:
	// with --listen-client 0.0.0.0 (the default, the chart's) the etcd
	// client would verify the address 0.0.0.0, which the certificate does
	// not name (it names 127.0.0.1).
	tc, err := s.clientTLS(root)
	if err != nil {
		return err
	}
	s.kv, err = kvstore.Connect(ctx, kvstore.Config{Endpoints: []string{s.localURL}, TLS: tc, Logger: s.log,
		Metrics: s.cfg.KVMetrics})
	if err != nil {
		return fmt.Errorf("clustermesh: connect to the embedded etcd: %w", err)
	}
	// The in-process client is root as the TLS client is: etcd takes the
	// user of a request from the verified certificate of its TLS peer, so
	// each request carries the root certificate as such. Nothing crosses
	// a process boundary: it is this process's own credential.
	rootPeer := &peer.Peer{Addr: inProcessAddr{}, AuthInfo: credentials.TLSInfo{
		State: tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{root.cert}}}}}
	s.inproc = kvstore.InProcess(v3client.New(e.Server), kvstore.Config{Endpoints: []string{"in-process"}, Logger: s.log,
		Metrics: s.cfg.KVMetrics}, func(ctx context.Context) context.Context {
		return metadata.NewIncomingContext(peer.NewContext(ctx, rootPeer), metadata.MD{})
	})
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
	if s.cfg.SharedAgentCredential {
		if err := s.kv.EnsureRole(ctx, roleAgents, agentPermissions()...); err != nil {
			return fmt.Errorf("clustermesh: etcd auth: %w", err)
		}
		if err := s.kv.EnsureUser(ctx, UserAgents, "", roleAgents); err != nil {
			return fmt.Errorf("clustermesh: etcd auth: %w", err)
		}
		s.log.Warn("the shared agents credential is on (--insecure-shared-agent-credential): a node holding it can rewrite every node's records")
	} else {
		// A data dir from before, or a server restarted without the
		// flag: the shared credential stops working.
		if err := s.kv.DeleteUser(ctx, UserAgents); err != nil {
			return fmt.Errorf("clustermesh: etcd auth: %w", err)
		}
		if err := s.kv.DeleteRole(ctx, roleAgents); err != nil {
			return fmt.Errorf("clustermesh: etcd auth: %w", err)
		}
	}
	if err := s.kv.EnableAuth(ctx); err != nil {
		return fmt.Errorf("clustermesh: etcd auth: %w", err)
	}
	return nil
}

// agentPermissions: read and write under isthmus/, except
// isthmus/remotes/, whose records hold the private keys this server uses to
// read remote clusters. Agents never need them. This is the shared
// "agents" credential, only created with Config.SharedAgentCredential:
// any node holding it can rewrite every other node's records, the mirrored
// state of remote clusters and the cluster config.
func agentPermissions() []kvstore.Permission {
	return []kvstore.Permission{
		{Prefix: records.Root, End: RemotesPrefix, Write: true},
		{Prefix: prefixEnd(RemotesPrefix), End: prefixEnd(records.Root), Write: true},
	}
}

// nodePermissions are what node's own credential may do: read everything
// under isthmus/ except isthmus/remotes/ (the mirror's private keys), and
// write only
//   - its node record, isthmus/state/nodes/v1/<cluster>/<node>;
//   - its endpoints' ipcache entries, isthmus/state/ip/v1/<cluster>/<node>/;
//   - identities, isthmus/state/identities/v1/ (allocation is shared
//     between the nodes of a cluster: a label set gets one ID whichever
//     node asks first; readers accept only IDs of the writer's cluster);
//   - the applied objects, isthmus/config/ and its guard key (`isthmus
//     apply` goes through any node's agent);
//   - its L2 announcement record, isthmus/l2/<cluster>/<node> (agent/l2:
//     its liveness lease and what it leads; another node's it only reads).
//
// Never the cluster config, heartbeats, sync canaries, the mirror's cache
// of remote clusters, services (the server's service syncer writes them)
// or another node's records.
func nodePermissions(cluster, node string) []kvstore.Permission {
	nodeKey := records.NodeKey(cluster, node)
	return []kvstore.Permission{
		{Prefix: records.Root, End: RemotesPrefix},
		{Prefix: prefixEnd(RemotesPrefix), End: prefixEnd(records.Root)},
		{Prefix: nodeKey, End: nodeKey + "\x00", Write: true},
		{Prefix: records.NodeIPCachePrefix(cluster, node), Write: true},
		{Prefix: records.StatePrefix(records.KindIdentities), Write: true},
		{Prefix: records.ConfigPrefix, Write: true},
		{Prefix: records.ConfigGuardKey, End: records.ConfigGuardKey + "\x00", Write: true},
		{Prefix: records.L2Key(cluster, node), End: records.L2Key(cluster, node) + "\x00", Write: true},
	}
}

// writeClusterConfig refuses an etcd that belongs to another cluster (a
// data dir or external etcd reused by mistake), then writes ours.
//
// The configs of remote clusters are there too: the mirror copies them for
// the agents. Such a copy has a remote record (isthmus/remotes/<c>) and no
// heartbeat (heartbeats are never mirrored); a config with neither is a
// copy left behind by a disconnect while the server was down, which the
// mirror removes. A config with a heartbeat of its own is a live cluster
// sharing this etcd.
func (s *Server) writeClusterConfig(ctx context.Context) error {
	if kv, found, err := s.kv.Get(ctx, InfoKey); err != nil {
		return fmt.Errorf("clustermesh: read server info: %w", err)
	} else if found {
		if in, err := DecodeInfo(kv.Value); err == nil && in.Cluster != s.cfg.ClusterName {
			return fmt.Errorf("clustermesh: this etcd (%s) belongs to the server of cluster %q, not %q: refusing to share it",
				s.where(), in.Cluster, s.cfg.ClusterName)
		}
	}
	kvs, _, err := s.kv.GetPrefix(ctx, records.ClusterConfigPrefix)
	if err != nil {
		return fmt.Errorf("clustermesh: read cluster config: %w", err)
	}
	for _, kv := range kvs {
		name, _ := records.ParseClusterConfigKey(kv.Key)
		if name != s.cfg.ClusterName {
			mirrored, err := s.mirroredConfig(ctx, name)
			if err != nil {
				return err
			}
			if mirrored {
				continue
			}
		}
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

// mirroredConfig reports whether the config of cluster name is a mirror's
// copy (see writeClusterConfig).
func (s *Server) mirroredConfig(ctx context.Context, name string) (bool, error) {
	if name == "" {
		return false, nil // an unparsable key: not ours to judge, refuse below
	}
	_, hasRemote, err := s.kv.Get(ctx, RemoteKey(name))
	if err != nil {
		return false, fmt.Errorf("clustermesh: read remote record: %w", err)
	}
	if hasRemote {
		return true, nil
	}
	_, hasHeartbeat, err := s.kv.Get(ctx, records.HeartbeatKey(name))
	if err != nil {
		return false, fmt.Errorf("clustermesh: read heartbeat: %w", err)
	}
	return !hasHeartbeat, nil
}

// Info returns what the server announces about itself.
func (s *Server) Info() Info {
	return Info{
		Version: InfoVersion, Cluster: s.cfg.ClusterName, ClusterID: s.cfg.ClusterID,
		PodCIDRs: s.cfg.PodCIDRs, Endpoints: s.Endpoints(), LocalURL: s.localURL,
		Embedded: s.etcd != nil, Started: s.started,
	}
}

// writeInfo stores Info in etcd and, in embedded mode, in the data dir.
func (s *Server) writeInfo(ctx context.Context) error {
	s.started = time.Now().UTC().Truncate(time.Second)
	data, err := json.MarshalIndent(s.Info(), "", "  ")
	if err != nil {
		return err
	}
	if err := s.kv.Put(ctx, InfoKey, data); err != nil {
		return fmt.Errorf("clustermesh: write server info: %w", err)
	}
	if s.etcd != nil {
		if err := atomicfile.Write(filepath.Join(s.cfg.DataDir, InfoFile), append(data, '\n'), 0o644); err != nil {
			return fmt.Errorf("clustermesh: write server info: %w", err)
		}
	}
	return nil
}

// Err reports a failure of the embedded etcd (nil channel in external
// mode: it never fires).
func (s *Server) Err() <-chan error {
	if s.etcd == nil {
		return nil
	}
	return s.etcd.Err()
}

// ClusterConfig returns the cluster config the server writes.
func (s *Server) ClusterConfig() records.ClusterConfig { return s.cfg.clusterConfig() }

// Logger returns the server's logger.
func (s *Server) Logger() *slog.Logger { return s.log }

func (s *Server) where() string {
	if s.etcd != nil {
		return "data dir " + s.cfg.DataDir
	}
	return fmt.Sprint("etcd ", s.cfg.EtcdEndpoints)
}

func (s *Server) writeHeartbeat(ctx context.Context) error {
	value, err := records.Stamp{Cluster: s.cfg.ClusterName, Time: time.Now().UTC()}.Marshal()
	if err == nil {
		err = s.kv.Put(ctx, records.HeartbeatKey(s.cfg.ClusterName), value)
	}
	return err
}

// heartbeat renews the heartbeat (the first one is written by Start).
func (s *Server) heartbeat(ctx context.Context) {
	t := time.NewTicker(s.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := s.writeHeartbeat(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("clustermesh: heartbeat write failed", "err", err)
		}
	}
}

// Client returns the server's own etcd client (root in embedded mode).
func (s *Server) Client() *kvstore.Client { return s.kv }

// InProcessClient returns a root client that calls the embedded etcd
// directly, without gRPC and TLS (kvstore.InProcess: requests only, no
// watches or leases), for the mirror's cache writes; in external mode, the
// TLS client.
func (s *Server) InProcessClient() *kvstore.Client {
	if s.inproc == nil {
		return s.kv
	}
	return s.inproc
}

// inProcessAddr is the peer address of in-process requests.
type inProcessAddr struct{}

func (inProcessAddr) Network() string { return "in-process" }
func (inProcessAddr) String() string  { return "in-process" }

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
	if !s.cfg.SharedAgentCredential {
		return Bundle{}, errors.New("clustermesh: the shared agents credential is off (--insecure-shared-agent-credential); give each node its own with ExportNodeBundle")
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
	return exportRemoteBundle(ctx, s.kv, s.pki, s.Info(), remote)
}

// ExportNodeBundle creates (or keeps) the etcd user of node, which may
// write only that node's records, and returns a bundle with a fresh
// certificate for it: the credential of that node's isthmus-agent.
func (s *Server) ExportNodeBundle(ctx context.Context, node string) (Bundle, error) {
	if s.pki == nil {
		return Bundle{}, errors.New("clustermesh: external etcd: node credentials are managed by whoever runs that etcd (docs/clustermesh.md lists the permissions of a node's user)")
	}
	return exportNodeBundle(ctx, s.kv, s.pki, s.Info(), node)
}

// exportNodeBundle creates the role and user of node (through kv, as
// root) and issues its certificate.
func exportNodeBundle(ctx context.Context, kv *kvstore.Client, p *pki, in Info, node string) (Bundle, error) {
	if err := records.ValidateNodeName(node); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: node: %w", err)
	}
	user := NodeUser(node)
	if err := kv.EnsureRole(ctx, user, nodePermissions(in.Cluster, node)...); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: create role %s: %w", user, err)
	}
	if err := kv.EnsureUser(ctx, user, "", user); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: create user %s: %w", user, err)
	}
	kp, err := p.issue(user, false, sans{})
	if err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: %w", err)
	}
	return newBundle(in, p, user, kp), nil
}

// RemoveNode deletes the etcd user and role of node: its certificates stay
// valid TLS-wise but no longer map to a user, so every request fails.
func (s *Server) RemoveNode(ctx context.Context, node string) error {
	return removeNode(ctx, s.kv, node)
}

func removeNode(ctx context.Context, kv *kvstore.Client, node string) error {
	if err := records.ValidateNodeName(node); err != nil {
		return fmt.Errorf("clustermesh: node: %w", err)
	}
	if err := kv.DeleteUser(ctx, NodeUser(node)); err != nil {
		return err
	}
	return kv.DeleteRole(ctx, NodeUser(node))
}

// exportRemoteBundle creates the user of remote (through kv, as root) and
// issues its certificate.
func exportRemoteBundle(ctx context.Context, kv *kvstore.Client, p *pki, in Info, remote string) (Bundle, error) {
	user := RemoteUser(remote)
	if err := kv.EnsureUser(ctx, user, "", roleRemote); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: create user %s: %w", user, err)
	}
	kp, err := p.issue(user, false, sans{})
	if err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: %w", err)
	}
	return newBundle(in, p, user, kp), nil
}

// RemoveRemote deletes the etcd user of remote cluster: its certificates
// stay valid TLS-wise but no longer map to a user, so every request fails.
func (s *Server) RemoveRemote(ctx context.Context, remote string) error {
	if err := records.ValidateClusterName(remote); err != nil {
		return fmt.Errorf("clustermesh: remote cluster: %w", err)
	}
	return s.kv.DeleteUser(ctx, RemoteUser(remote))
}

func (s *Server) bundle(user string, kp keyPair) Bundle { return newBundle(s.Info(), s.pki, user, kp) }

func newBundle(in Info, p *pki, user string, kp keyPair) Bundle {
	return Bundle{
		Cluster: in.Cluster, ClusterID: in.ClusterID,
		Endpoints: append([]string(nil), in.Endpoints...), User: user,
		CACert: p.caPEM, Cert: kp.certPEM, Key: kp.keyPEM,
	}
}

// Close stops the heartbeat, the client and the embedded etcd.
func (s *Server) Close() error {
	s.once.Do(func() {
		if s.cancel != nil {
			s.cancel()
		}
		s.wg.Wait()
		if s.inproc != nil {
			s.inproc.Close()
		}
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

// MaxTxnOps is the embedded etcd's limit of operations per transaction:
// what kvstore.Client.WriteOps writes at once (the mirror's batches, LB-IPAM).
const MaxTxnOps = kvstore.EmbeddedMaxTxnOps
