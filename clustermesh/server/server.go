// Package server is the whole isthmus-clustermesh process: the
// cluster's etcd server (package etcdserver), the mirror of remote clusters
// (package mirror), the service syncer (package servicesync), LB-IPAM
// (package lbipamsync), the garbage
// collector of unused identities, Prometheus metrics and probes
// (metrics.go), and an optional health endpoint. The
// command in cmd/isthmus-clustermesh only parses flags and calls Run; tests
// start the same thing in-process with Start.
package server

import (
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/clustermesh/kubesync"

	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipamsync"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/servicesync"
)

// Config configures the process.
type Config struct {
	Server etcdserver.Config
	// Mirror tunes the mirror; Local, Client and Logger are filled in.
	// Mirror.CacheTTL is the --cache-ttl (0 keeps an unreachable remote's
	// state forever).
	Mirror mirror.Config
	// ServiceSync tunes the service syncer; Cluster, ClusterID, PodCIDRs,
	// Client and Logger are filled in.
	ServiceSync servicesync.Config
	// IdentityGCInterval is how often identities no node references are
	// deleted; 0 turns the collector off.
	IdentityGCInterval time.Duration
	// IdentityGCGrace is how long an identity must stay unreferenced
	// before the collector deletes it (several agent lease TTLs), so that
	// nodes cut off from etcd get their identities back when they return.
	IdentityGCGrace time.Duration
	// HealthListen is an address (host:port) for GET /status and the
	// probes of MetricsListen; empty turns it off.
	HealthListen string
	// MetricsListen is an address (host:port) for GET /metrics, /healthz
	// and /readyz; empty turns it off.
	MetricsListen string
	// Kubernetes, when set, is the API server of the cluster: its global
	// Services (and ServiceExports) are the cluster's global services, and
	// isthmus.io NetworkPolicies get their status (package kubesync).
	Kubernetes *rest.Config
	// Enroll, when its Listen is set, serves the enrollment of external
	// workloads (VMs, bare-metal hosts) over HTTPS (package enroll).
	Enroll EnrollConfig
}

// APIServer is a running isthmus-clustermesh.
type APIServer struct {
	Server   *etcdserver.Server
	Mirror   *mirror.Manager
	Services *servicesync.Syncer
	LBIPAM   *lbipamsync.Syncer

	log        *slog.Logger
	cancel     context.CancelFunc
	wg         sync.WaitGroup
	errc       chan error
	health     *http.Server
	healthAddr string
	metrics    http.Handler
	metricsSrv *http.Server
	metricsLn  net.Listener
	enrollSrv  *http.Server
	enrollAddr string
	stopGuard  context.CancelFunc // of enroll.Guard
	once       sync.Once
}

// Start starts everything and returns once the etcd serves and the
// background work runs. Close stops it.
func Start(ctx context.Context, cfg Config) (*APIServer, error) {
	if cfg.Server.Capabilities == nil {
		cfg.Server.Capabilities = []string{records.CapSyncCanaries, records.CapMirror}
	}
	a := &APIServer{errc: make(chan error, 4)}
	log := cmp.Or(cfg.Server.Logger, slog.Default())
	a.metrics, cfg.Server.KVMetrics = newMetrics(a, len(cfg.Server.EtcdEndpoints) == 0, log)
	// The metrics address is bound before etcd starts: a port in use is a
	// startup error, not a silently missing endpoint.
	if cfg.MetricsListen != "" {
		ln, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			return nil, fmt.Errorf("clustermesh: metrics endpoint (--metrics-addr %s): %w", cfg.MetricsListen, err)
		}
		a.metricsLn = ln
	}
	srv, err := etcdserver.Start(ctx, cfg.Server)
	if err != nil {
		if a.metricsLn != nil {
			a.metricsLn.Close()
		}
		return nil, err
	}
	a.Server, a.log = srv, srv.Logger()
	ok := false
	defer func() {
		if !ok {
			a.Close()
		}
	}()
	local := srv.ClusterConfig()

	mc := cfg.Mirror
	mc.Local, mc.Client, mc.Writer, mc.Logger = local, srv.Client(), srv.InProcessClient(), a.log
	if a.Mirror, err = mirror.New(mc); err != nil {
		return nil, err
	}
	// The two syncers watch the same applied services: each value is
	// decoded once for both.
	decoded := &objects.DecodeCache{}
	sc := cfg.ServiceSync
	sc.Cluster, sc.ClusterID, sc.Client, sc.Logger, sc.Decoded = local.Name, local.ID, srv.Client(), a.log, decoded
	sc.PodCIDRs = local.PodCIDRs
	if a.Services, err = servicesync.New(sc); err != nil {
		return nil, err
	}
	if a.LBIPAM, err = lbipamsync.New(lbipamsync.Config{Client: srv.Client(), Logger: a.log, Decoded: decoded}); err != nil {
		return nil, err
	}
	var gc *identity.Etcd
	if cfg.IdentityGCInterval > 0 {
		gc, err = identity.NewEtcd(srv.Client(), local.Name, local.ID, "isthmus-clustermesh", identity.WithLogger(a.log))
		if err != nil {
			return nil, err
		}
	}
	if cfg.HealthListen != "" {
		ln, err := net.Listen("tcp", cfg.HealthListen)
		if err != nil {
			return nil, fmt.Errorf("clustermesh: health endpoint: %w", err)
		}
		a.healthAddr = ln.Addr().String()
		a.health = &http.Server{Handler: a.handler(), ReadHeaderTimeout: 5 * time.Second}
		a.wg.Go(func() {
			if err := a.health.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				a.errc <- fmt.Errorf("health endpoint: %w", err)
			}
		})
	}
	if a.metricsLn != nil {
		a.metricsSrv = &http.Server{Handler: a.probeMux(), ReadHeaderTimeout: 5 * time.Second}
		a.wg.Go(func() {
			if err := a.metricsSrv.Serve(a.metricsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				a.errc <- fmt.Errorf("metrics endpoint: %w", err)
			}
		})
	}

	bctx, cancel := context.WithCancel(context.Background())
	a.cancel = cancel
	a.wg.Go(func() {
		if err := a.Mirror.Run(bctx); err != nil {
			a.errc <- fmt.Errorf("mirror: %w", err)
		}
	})
	a.wg.Go(func() {
		if err := a.Services.Run(bctx); err != nil {
			a.errc <- fmt.Errorf("service syncer: %w", err)
		}
	})
	a.wg.Go(func() {
		if err := a.LBIPAM.Run(bctx); err != nil {
			a.errc <- fmt.Errorf("lbipam: %w", err)
		}
	})
	if gc != nil {
		a.wg.Go(func() { a.collectIdentities(bctx, gc, cfg.IdentityGCInterval, cfg.IdentityGCGrace) })
	}
	if cfg.Kubernetes != nil {
		ks, err := kubesync.New(kubesync.Config{REST: cfg.Kubernetes, Cluster: local.Name, KV: srv.Client(), Log: a.log})
		if err != nil {
			return nil, err
		}
		a.wg.Go(func() {
			if err := ks.Run(bctx); err != nil {
				a.errc <- fmt.Errorf("kubernetes: %w", err)
			}
		})
	}
	if err := a.startEnroll(ctx, cfg.Enroll, local); err != nil {
		return nil, err
	}
	ok = true
	a.log.Info("isthmus-clustermesh running", "cacheTTL", mc.CacheTTL, "health", a.healthAddr, "metrics", a.MetricsAddr())
	return a, nil
}

// Run starts the process and serves until ctx ends or something fails.
func Run(ctx context.Context, cfg Config) error {
	a, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Wait(ctx)
}

// Wait returns nil when ctx ends, or the error of a failed part (the
// embedded etcd, the mirror, the syncer, the health endpoint).
func (a *APIServer) Wait(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return nil
	case err := <-a.Server.Err():
		return fmt.Errorf("embedded etcd failed: %w", err)
	case err := <-a.errc:
		return err
	}
}

// HealthAddr returns the address the health endpoint listens on ("" if
// off).
func (a *APIServer) HealthAddr() string { return a.healthAddr }

// MetricsAddr returns the address the metrics endpoint listens on ("" if
// off).
func (a *APIServer) MetricsAddr() string {
	if a.metricsLn == nil {
		return ""
	}
	return a.metricsLn.Addr().String()
}

// Close stops everything (the mirrored caches stay in etcd).
func (a *APIServer) Close() error {
	a.once.Do(func() {
		for _, h := range []*http.Server{a.health, a.metricsSrv, a.enrollSrv} {
			if h != nil {
				sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				h.Shutdown(sctx)
				cancel()
			}
		}
		if a.metricsSrv == nil && a.metricsLn != nil {
			a.metricsLn.Close() // bound, never served
		}
		if a.cancel != nil {
			a.cancel()
		}
		if a.stopGuard != nil {
			a.stopGuard()
		}
		a.wg.Wait()
		a.Server.Close()
	})
	return nil
}

func (a *APIServer) collectIdentities(ctx context.Context, gc *identity.Etcd, every, grace time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := gc.GC(ctx, grace)
		if err != nil && ctx.Err() == nil {
			a.log.Warn("identity garbage collection failed", "err", err)
		}
		if n > 0 {
			a.log.Info("identity garbage collection", "deleted", n)
		}
	}
}

// StatusReport is what GET /status returns.
type StatusReport struct {
	Server   etcdserver.Info   `json:"server"`
	Remotes  []mirror.Status   `json:"remotes"`
	Services servicesync.Stats `json:"services"`
	LBIPAM   lbipamsync.Stats  `json:"lbipam"`
}

// handler serves the health address: the probes and /metrics, and /status.
func (a *APIServer) handler() http.Handler {
	mux := a.probeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		rep := StatusReport{Server: a.Server.Info(), Remotes: a.Mirror.Status(), Services: a.Services.Stats(), LBIPAM: a.LBIPAM.Stats()}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
	})
	return mux
}
