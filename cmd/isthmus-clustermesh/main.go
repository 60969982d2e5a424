// Command isthmus-clustermesh runs a cluster's clustermesh API server: the
// cluster's etcd (embedded, or an external one), its certificates and
// users, the mirror of connected remote clusters and the service syncer.
package main

import (
	"github.com/isthmus-mesh/isthmus/k8s/kubeclient"

	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server"
)

func main() {
	// SIGTERM and SIGINT stop the server cleanly: background work ends,
	// the etcd is closed; mirrored caches stay for the next start.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := newCommand(server.Run).ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}

type options struct {
	enrollListen       string   // issue 16: external workloads
	enrollAdvertise    string   // issue 16
	vmCIDRs            []string // issue 16
	trustDomain        string   // issue 16
	vmCertValidity     time.Duration
	kubernetes         bool
	kubeconfig         string
	cluster            string
	clusterID          uint32
	podCIDRs           []string
	dataDir            string
	caDir              string
	listenClient       string
	listenPeer         string
	advertiseClient    []string
	tlsSANs            []string
	etcdEndpoints      []string
	etcdCA             string
	etcdCert           string
	etcdKey            string
	cacheTTL           time.Duration
	sharedAgents       bool
	maxRemoteIPCache   int // issue 10: per-remote ipcache cap
	identityGCInterval time.Duration
	identityGCGrace    time.Duration
	healthListen       string
	metricsAddr        string
	logLevel           string
	logFormat          string
}

// newCommand parses the flags into an server.Config and hands it to run.
func newCommand(run func(context.Context, server.Config) error) *cobra.Command {
	var o options
	cmd := &cobra.Command{
		Use:   "isthmus-clustermesh --cluster-name NAME --cluster-id ID --pod-cidr CIDR [flags]",
		Short: "Run a cluster's clustermesh API server (etcd, mirror of remote clusters, service syncer)",
		Long: `isthmus-clustermesh runs one per cluster. It owns the cluster's etcd, where
the cluster's agents publish their nodes, endpoints and identities and read
everything back:

  - by default an embedded single-member etcd with its data under --data-dir,
    mutual TLS on both ports and etcd users per client certificate. On first
    start it creates the cluster's CA and certificates under <data-dir>/pki and
    writes the bundles agents and the CLI use to <data-dir>/pki/bundles/{agents,root}
    (` + "`isthmus clustermesh certs`" + ` exports them);
  - with --etcd-endpoints an external etcd instead (credentials via --etcd-ca,
    --etcd-cert, --etcd-key; its users are managed by whoever runs it).

It writes isthmus/cluster-config/<cluster> (name, ID, pod CIDRs) and a
heartbeat, publishes the cluster's Services for other clusters
(isthmus/state/services/v1/<cluster>/...), and mirrors every connected remote
cluster (` + "`isthmus clustermesh connect`" + `) into isthmus/cache/... of its own etcd,
with sync canaries, so agents never talk to a remote etcd. A remote whose
name or ID does not match, or that duplicates the ID of this or another
connected cluster, or whose pod CIDRs overlap, is refused with a logged error
and nothing of it is mirrored.

--cache-ttl: how long the last state of an unreachable remote cluster keeps
serving. 0 (the default, as in Cilium) keeps it forever, so an outage of a
remote server never removes its endpoints; with a TTL, a remote unreachable
for longer than that has its cache and canaries deleted (and is mirrored
afresh when it returns).

--metrics-addr (on by default) serves Prometheus metrics, /healthz and
/readyz; --health-listen serves those and GET /status (JSON). Both are plain
HTTP without authentication.

SIGTERM or SIGINT stops it cleanly.`,
		Example: `  isthmus-clustermesh --cluster-name c1 --cluster-id 1 --pod-cidr 10.1.0.0/16 \
      --advertise-client https://192.0.2.1:2379
  isthmus-clustermesh --cluster-name c2 --cluster-id 2 --pod-cidr 10.2.0.0/16 --pod-cidr fd00:2::/48 \
      --data-dir /srv/mesh/c2 --listen-client 192.0.2.2:2379 --cache-ttl 30m --health-listen 127.0.0.1:9879
  isthmus-clustermesh --cluster-name c3 --cluster-id 3 --pod-cidr 10.3.0.0/16 \
      --etcd-endpoints https://e1:2379,https://e2:2379,https://e3:2379 --etcd-ca ca.crt --etcd-cert c.crt --etcd-key c.key`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := o.config()
			if err != nil {
				return err
			}
			return run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.cluster, "cluster-name", "", "name of this cluster, unique in the mesh (a DNS label of at most 32 characters)")
	f.Uint32Var(&o.clusterID, "cluster-id", 0, "numeric cluster ID, 1-4095, unique in the mesh (the high bits of every identity)")
	f.StringSliceVar(&o.podCIDRs, "pod-cidr", nil, "pod address range of the cluster (every node's pod CIDR lies inside); repeat or comma-separate for several / dual stack")
	f.StringVar(&o.dataDir, "data-dir", "", "directory for the embedded etcd and the PKI (default "+etcdserver.DefaultDataDirRoot+"/<cluster-name>)")
	f.StringVar(&o.caDir, "ca-dir", "", "embedded etcd: take the cluster's CA (ca.crt, ca.key) from this directory instead of creating one in <data-dir>/pki (e.g. a mounted Secret of the Helm chart, so a lost data dir keeps the credentials issued from it)")
	f.StringVar(&o.listenClient, "listen-client", "0.0.0.0:2379", "IP:port the embedded etcd serves clients on (agents, the CLI, remote clusters)")
	f.StringVar(&o.listenPeer, "listen-peer", "127.0.0.1:2380", "IP:port of the embedded etcd's peer port (single member: nothing connects to it)")
	f.StringSliceVar(&o.advertiseClient, "advertise-client", nil, "client URL(s) written into exported bundles, e.g. https://192.0.2.1:2379 (default https://<listen-client>, 127.0.0.1 for 0.0.0.0); their hosts go into the server certificate")
	f.StringSliceVar(&o.tlsSANs, "tls-san", nil, "more DNS names or IPs for the server certificate (e.g. a load balancer's)")
	f.StringSliceVar(&o.etcdEndpoints, "etcd-endpoints", nil, "use this external etcd instead of the embedded one (client URLs, comma-separated)")
	f.StringVar(&o.etcdCA, "etcd-ca", "", "external etcd: CA certificate file (PEM)")
	f.StringVar(&o.etcdCert, "etcd-cert", "", "external etcd: client certificate file (PEM); its common name is the etcd user, which needs write access to isthmus/")
	f.StringVar(&o.etcdKey, "etcd-key", "", "external etcd: client key file (PEM)")
	f.BoolVar(&o.sharedAgents, "insecure-shared-agent-credential", false, "also create the etcd user \"agents\", one credential all agents may share, which writes every node's records (insecure; by default each node gets its own: isthmus clustermesh certs --node NAME)")
	f.IntVar(&o.maxRemoteIPCache, "max-remote-ipcache", records.DefaultMaxIPCacheEntries, "ipcache entries mirrored per remote cluster at most (past it, those whose keys sort last are refused); -1: no cap")
	f.DurationVar(&o.cacheTTL, "cache-ttl", 0, "drop the mirrored state of a remote cluster unreachable for longer than this (e.g. 30m); 0 keeps it forever")
	f.DurationVar(&o.identityGCInterval, "identity-gc-interval", 10*time.Minute, "how often identities that no node references are deleted; 0 turns it off")
	f.DurationVar(&o.identityGCGrace, "identity-gc-grace", 5*time.Minute, "how long an identity stays unreferenced before it is deleted (several agent lease TTLs, so nodes cut off from etcd get their identities back); 0 deletes at the first pass")
	f.StringVar(&o.healthListen, "health-listen", "", "serve GET /status (JSON), /healthz, /readyz and /metrics on this host:port, e.g. 127.0.0.1:9879 (default off)")
	f.StringVar(&o.metricsAddr, "metrics-addr", server.DefaultMetricsListen, `serve GET /metrics (Prometheus), /healthz and /readyz over plain HTTP on this host:port; "" turns it off`)
	f.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	f.BoolVar(&o.kubernetes, "kubernetes", false, "the cluster runs Kubernetes: its global Services (annotated isthmus.io/global, or with a ServiceExport) come from the API server, and isthmus.io NetworkPolicies get their status; with the pod's service account unless --kubeconfig")
	f.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster's API server (implies --kubernetes)")
	f.StringVar(&o.enrollListen, "enroll-listen", "", "serve the enrollment of external workloads (VMs, bare-metal hosts: isthmus-agent --join) over HTTPS on this host:port, e.g. 0.0.0.0:8443 (default off; embedded etcd only)")
	f.StringVar(&o.enrollAdvertise, "enroll-advertise", "", "URL of the enrollment endpoint printed with tokens (default https://<enroll-listen>)")
	f.StringSliceVar(&o.vmCIDRs, "vm-cidr", nil, "address range(s) of external workloads, one IPv4 and/or one IPv6, inside the cluster's --pod-cidr and outside every node's pod CIDR")
	f.StringVar(&o.trustDomain, "trust-domain", "isthmus.io", "SPIFFE trust domain of external workloads' certificates (spiffe://<trust-domain>/cluster/<cluster>/vm/<name>)")
	f.DurationVar(&o.vmCertValidity, "vm-cert-validity", 24*time.Hour, "validity of an external workload's certificate; the host renews it at two thirds")
	return cmd
}

// config checks the options and builds the configuration, with errors that
// name the flag to fix.
func (o *options) config() (server.Config, error) {
	var cfg server.Config
	log, err := o.logger()
	if err != nil {
		return cfg, err
	}
	slog.SetDefault(log)
	if o.cluster == "" {
		return cfg, errors.New("--cluster-name is required (a DNS label, unique in the mesh)")
	}
	if err := records.ValidateClusterName(o.cluster); err != nil {
		return cfg, fmt.Errorf("--cluster-name: %w", err)
	}
	if o.clusterID == 0 {
		return cfg, fmt.Errorf("--cluster-id is required (1-%d, unique in the mesh)", records.MaxClusterID)
	}
	if err := records.ValidateClusterID(o.clusterID); err != nil {
		return cfg, fmt.Errorf("--cluster-id: %w", err)
	}
	if o.cacheTTL < 0 {
		return cfg, fmt.Errorf("--cache-ttl %s: want 0 (keep forever) or a positive duration", o.cacheTTL)
	}
	if o.identityGCInterval < 0 {
		return cfg, fmt.Errorf("--identity-gc-interval %s: want 0 (off) or a positive duration", o.identityGCInterval)
	}
	if o.identityGCGrace < 0 {
		return cfg, fmt.Errorf("--identity-gc-grace %s: want 0 or a positive duration", o.identityGCGrace)
	}
	if o.kubeconfig != "" || o.kubernetes {
		if cfg.Kubernetes, err = kubeclient.RESTConfig(o.kubeconfig); err != nil {
			return cfg, err
		}
	}
	sc := &cfg.Server
	sc.ClusterName, sc.ClusterID, sc.Logger = o.cluster, o.clusterID, log
	for _, s := range o.podCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(s))
		if err != nil || p != p.Masked() {
			return cfg, fmt.Errorf("--pod-cidr %q: not a CIDR without host bits (want e.g. 10.1.0.0/16 or fd00:1::/48)", s)
		}
		sc.PodCIDRs = append(sc.PodCIDRs, p)
	}
	if len(sc.PodCIDRs) == 0 {
		return cfg, errors.New("--pod-cidr is required: the cluster's pod address range(s); remote clusters are refused if theirs overlap")
	}
	sc.ListenClient, sc.ListenPeer = o.listenClient, o.listenPeer
	sc.SharedAgentCredential = o.sharedAgents
	sc.AdvertiseClient = trimAll(o.advertiseClient)
	sc.ExtraSANs = trimAll(o.tlsSANs)
	if eps := trimAll(o.etcdEndpoints); len(eps) > 0 {
		sc.EtcdEndpoints = eps
		if sc.EtcdTLS, err = o.etcdTLS(); err != nil {
			return cfg, err
		}
		if o.caDir != "" {
			return cfg, errors.New("--ca-dir is for the embedded etcd: an external etcd's certificates are managed by whoever runs it")
		}
	} else {
		if o.etcdCA != "" || o.etcdCert != "" || o.etcdKey != "" {
			return cfg, errors.New("--etcd-ca, --etcd-cert and --etcd-key are for an external etcd: add --etcd-endpoints, or drop them to use the embedded etcd")
		}
		sc.DataDir = o.dataDir
		sc.CADir = o.caDir
		if sc.DataDir == "" {
			sc.DataDir = filepath.Join(etcdserver.DefaultDataDirRoot, o.cluster)
		}
		if len(sc.AdvertiseClient) == 0 {
			if ap, err := netip.ParseAddrPort(sc.ListenClient); err == nil && ap.Addr().IsUnspecified() {
				log.Warn("bundles will name https://127.0.0.1 as the server's address: set --advertise-client to an address agents and remote clusters can reach",
					"listenClient", sc.ListenClient)
			}
		}
	}
	cfg.Mirror.CacheTTL = o.cacheTTL
	cfg.Mirror.MaxIPCachePerRemote = o.maxRemoteIPCache // issue 10
	cfg.IdentityGCInterval = o.identityGCInterval
	cfg.IdentityGCGrace = o.identityGCGrace
	cfg.HealthListen = o.healthListen
	cfg.MetricsListen = o.metricsAddr
	cfg.Enroll = server.EnrollConfig{Listen: o.enrollListen, Advertise: o.enrollAdvertise, TrustDomain: o.trustDomain, CertValidity: o.vmCertValidity}
	for _, s := range trimAll(o.vmCIDRs) {
		p, err := netip.ParsePrefix(s)
		if err != nil || p != p.Masked() {
			return cfg, fmt.Errorf("--vm-cidr %q: not a CIDR without host bits", s)
		}
		cfg.Enroll.VMCIDRs = append(cfg.Enroll.VMCIDRs, p)
	}
	return cfg, nil
}

func (o *options) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", o.logLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch o.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
}

// etcdTLS builds the client TLS configuration of an external etcd. Without
// any file the connection is plain (http:// endpoints).
func (o *options) etcdTLS() (*tls.Config, error) {
	if o.etcdCA == "" && o.etcdCert == "" && o.etcdKey == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.etcdCA != "" {
		pem, err := os.ReadFile(o.etcdCA)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-ca %s: no PEM certificate in it", o.etcdCA)
		}
	}
	if (o.etcdCert == "") != (o.etcdKey == "") {
		return nil, errors.New("--etcd-cert and --etcd-key go together")
	}
	if o.etcdCert != "" {
		cert, err := tls.LoadX509KeyPair(o.etcdCert, o.etcdKey)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

func trimAll(ss []string) []string {
	var out []string
	for _, s := range ss {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}
