// Command isthmus-agent runs the Isthmus node agent: it plumbs pods, loads
// the eBPF datapath and serves the local API that the isthmus CLI talks to.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/agent/api"
)

func main() {
	if err := newCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	var (
		cfg      agent.Config
		podCIDRs []string
		logLevel string
	)
	cmd := &cobra.Command{
		Use:   "isthmus-agent --pod-cidr CIDR [--pod-cidr CIDR] [flags]",
		Short: "Run the Isthmus node agent",
		Long: `isthmus-agent runs one Isthmus node: it creates pod interfaces (veth pairs)
with addresses from the node's pod CIDRs, loads the eBPF datapath (policy,
service load balancing, conntrack) onto them, and serves the local API used by
the isthmus CLI on a unix socket.

Maps and program links are pinned in bpffs, so pods keep their traffic while
the agent is stopped or restarting; a restarted agent picks up where it left.
Needs root.`,
		Example: `  isthmus-agent --pod-cidr 10.200.0.0/24 --pod-cidr fd00:200::/64
  isthmus-agent --node-name n1 --cluster-name lab --cluster-id 7 --pod-cidr 10.7.1.0/24`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level, err := parseLevel(logLevel)
			if err != nil {
				return err
			}
			slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))

			for _, s := range podCIDRs {
				p, err := parseCIDR(s)
				if err != nil {
					return err
				}
				cfg.PodCIDRs = append(cfg.PodCIDRs, p)
			}
			if cfg.StateDir == "" {
				cfg.StateDir = filepath.Join("/var/lib/isthmus", cfg.NodeName)
			}
			if cfg.SocketPath == "" {
				cfg.SocketPath = api.DefaultSocketPath(cfg.NodeName)
			}
			if os.Geteuid() != 0 {
				return errors.New("isthmus-agent needs root (it creates network interfaces and loads eBPF programs)")
			}
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			// SIGTERM and SIGINT stop the agent gracefully; programs stay
			// attached and maps pinned, so traffic keeps flowing.
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return a.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.NodeName, "node-name", api.DefaultNodeName(), "name of this node, unique in the cluster (a DNS label)")
	f.StringVar(&cfg.ClusterName, "cluster-name", "default", "name of the cluster this node belongs to (a DNS label); part of every identity")
	f.Uint32Var(&cfg.ClusterID, "cluster-id", 1, "numeric cluster ID, 1-4095, unique in the mesh; the high bits of every identity")
	f.StringSliceVar(&podCIDRs, "pod-cidr", nil, "pod address range of this node; repeat for dual stack (one IPv4 and one IPv6 CIDR)")
	f.StringVar(&cfg.StateDir, "state-dir", "", "directory for the agent's state: endpoints, applied objects, IPAM, identities (default /var/lib/isthmus/<node-name>)")
	f.StringVar(&cfg.SocketPath, "socket", "", "unix socket of the local API (default /var/run/isthmus/<node-name>.sock)")
	f.StringVar(&cfg.BPFFSRoot, "bpffs", "/sys/fs/bpf", "bpffs mount point; maps and links are pinned under <bpffs>/isthmus/<node-name> (mounted if needed)")
	f.IntVar(&cfg.MTU, "mtu", 1500, "MTU of pod interfaces")
	f.BoolVar(&cfg.ResetDatapath, "reset-datapath", false, "remove this node's pinned maps and links before starting (drops all tracked flows; for a datapath version whose maps changed layout)")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	_ = cmd.MarkFlagRequired("pod-cidr")
	return cmd
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

func parseCIDR(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("--pod-cidr %q: not a CIDR (want e.g. 10.200.0.0/24 or fd00:200::/64)", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("--pod-cidr %s has host bits set: did you mean %s?", p, p.Masked())
	}
	return p, nil
}
