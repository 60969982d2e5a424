package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/enroll"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// EnrollConfig configures the enrollment endpoint of external workloads.
type EnrollConfig struct {
	// Listen is host:port of the HTTPS endpoint; "" turns enrollment off.
	Listen string
	// Advertise is the URL printed with tokens (default https://<Listen>).
	Advertise string
	// VMCIDRs are where hosts' addresses come from, inside the cluster's
	// pod CIDRs and outside every node's.
	VMCIDRs      []netip.Prefix
	TrustDomain  string
	CertValidity time.Duration
}

// EnrollAddr returns the address the enrollment endpoint listens on ("" if
// off).
func (a *APIServer) EnrollAddr() string { return a.enrollAddr }

func (a *APIServer) startEnroll(ctx context.Context, cfg EnrollConfig, local records.ClusterConfig) error {
	if cfg.Listen == "" {
		return nil
	}
	svc, err := enroll.New(enroll.Config{
		Cluster: local.Name, ClusterID: local.ID, PodCIDRs: local.PodCIDRs, VMCIDRs: cfg.VMCIDRs,
		TrustDomain: cfg.TrustDomain, CertValidity: cfg.CertValidity,
		KV: a.Server.Client(), Issuer: a.Server, Log: a.log,
	})
	if err != nil {
		return fmt.Errorf("clustermesh: enrollment: %w", err)
	}
	tc, err := a.Server.EnrollmentTLS()
	if err != nil {
		return fmt.Errorf("clustermesh: enrollment: %w", err)
	}
	fp, err := a.Server.CAFingerprint()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("clustermesh: enrollment endpoint (--enroll-listen %s): %w", cfg.Listen, err)
	}
	a.enrollAddr = ln.Addr().String()
	adv := cfg.Advertise
	if adv == "" {
		adv = "https://" + a.enrollAddr
	}
	data, _ := json.Marshal(enroll.Endpoint{URL: adv, CAFingerprint: fp, Cluster: local.Name})
	if err := a.Server.Client().Put(ctx, enroll.ServerKey, data); err != nil {
		ln.Close()
		return fmt.Errorf("clustermesh: enrollment: %w", err)
	}
	// The guard needs the server's lifetime, not Start's context.
	gctx, cancel := context.WithCancel(context.Background())
	a.stopGuard = cancel
	a.wg.Go(func() { enroll.Guard(gctx, a.Server.Client(), local.Name, a.log) })
	a.enrollSrv = &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 5 * time.Second}
	tln := tls.NewListener(ln, tc)
	a.wg.Go(func() {
		if err := a.enrollSrv.Serve(tln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.errc <- fmt.Errorf("enrollment endpoint: %w", err)
		}
	})
	a.log.Info("enrollment of external workloads on", "url", adv, "vmCIDRs", cfg.VMCIDRs, "caFingerprint", fp)
	return nil
}
