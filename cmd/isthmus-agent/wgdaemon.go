package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent"
	"github.com/isthmus-mesh/isthmus/gateway/wireguard"
)

// wireguardDaemonCommand is `isthmus-agent wireguard-daemon`: the
// userspace WireGuard device of a node whose agent runs with
// --wireguard-daemon, in its own process so that the agent's restarts (a
// rolling update) leave the tunnels and their sessions running.
func wireguardDaemonCommand() *cobra.Command {
	var device, cluster, node, logLevel string
	cmd := &cobra.Command{
		Use:   "wireguard-daemon (--device NAME | --cluster-name C --node-name N)",
		Short: "Serve the node's userspace WireGuard device for an agent run with --wireguard-daemon",
		Long: `Without a WireGuard kernel module the agent embeds a userspace WireGuard
engine, which dies with the agent: every restart (a rolling update) stops
the node's encrypted traffic until the new agent has its device and new
handshakes. This daemon runs the engine in its own process instead: it
creates the TUN device and its UAPI socket (/var/run/wireguard/NAME.sock)
and serves them until SIGTERM; the agent, started with --wireguard-daemon,
adopts the device and configures its key, port and peers through the
socket as it would a kernel device. The device is named like the agent's:
--device, or isthwg<hash> of the cluster and node names. Where the kernel
can create WireGuard devices the agent uses one, and this daemon only waits.
Stopping it removes the device: the agent's fail-closed routes then drop
the node's traffic to other nodes until it is back.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("wireguard-daemon needs root (it creates a network interface)")
			}
			if device == "" {
				if cluster == "" || node == "" {
					return errors.New("wireguard-daemon needs --device, or --cluster-name and --node-name (the agent's, from which it names its device)")
				}
				device = agent.DefaultWireGuardDevice(cluster, node)
			}
			level, err := parseLevel(logLevel)
			if err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "wireguard-daemon")
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return wireguard.ServeUserspace(ctx, device, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&device, "device", "", "name of the device (the agent's --wireguard-device)")
	f.StringVar(&cluster, "cluster-name", "", "without --device: the agent's --cluster-name")
	f.StringVar(&node, "node-name", "", "without --device: the agent's --node-name")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}
