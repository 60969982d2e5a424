package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/agent/vmjoin"
)

// defaultVMStateDir is an external workload's state dir unless --state-dir.
const defaultVMStateDir = "/var/lib/isthmus/vm"

// joinFlags are --join, --token and --ca-fingerprint (docs/vms.md).
type joinFlags struct {
	server, token, fingerprint string
}

// configure enrolls the host (first start) or loads its enrollment, and
// makes cfg the configuration of a node of its cluster whose only address
// is the host's own.
func (j joinFlags) configure(cfg *agent.Config) error {
	if cfg.StateDir == "" {
		cfg.StateDir = defaultVMStateDir
	}
	st, found, err := vmjoin.Load(cfg.StateDir)
	if err != nil {
		return err
	}
	if found {
		if j.token != "" {
			slog.Info("vm: already enrolled; the stored credential is used and --token ignored", "stateDir", cfg.StateDir, "name", st.Enrollment.Name)
		}
	} else {
		if j.token == "" || j.fingerprint == "" {
			return errors.New("--join needs --token and --ca-fingerprint the first time (isthmus vm token create NAME prints them)")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		st, err = vmjoin.Join(ctx, cfg.StateDir, j.server, j.token, j.fingerprint, cfg.NodeIPs)
		cancel()
		if err != nil {
			return fmt.Errorf("enroll at %s: %w", j.server, err)
		}
		slog.Info("vm: enrolled", "name", st.Enrollment.Name, "cluster", st.Enrollment.Cluster, "addresses", st.Enrollment.Addresses, "spiffeID", st.Enrollment.SPIFFEID)
	}
	e := st.Enrollment
	cfg.NodeName, cfg.ClusterName, cfg.ClusterID = e.Node, e.Cluster, e.ClusterID
	cfg.PodCIDRs = nil
	for _, a := range e.Addresses {
		cfg.PodCIDRs = append(cfg.PodCIDRs, netip.PrefixFrom(a, a.BitLen()))
	}
	cfg.KVStoreEndpoints, cfg.KVStoreBundle = e.Endpoints, st.BundleDir()
	cfg.Encryption, cfg.NodeEncryption = agent.EncryptionWireGuard, true
	cfg.ExternalWorkload = &agent.ExternalWorkload{
		Name: e.Name, Namespace: e.Namespace, Labels: e.Labels, Addresses: e.Addresses,
		Background: func(ctx context.Context) { st.RenewLoop(ctx, slog.Default()) },
	}
	return nil
}
