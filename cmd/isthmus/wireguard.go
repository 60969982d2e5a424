package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

func (c *cli) wireguardCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "wireguard",
		Aliases: []string{"wg"},
		Short:   "Inspect the node's WireGuard device and rotate its key",
		Long: `The agent started with --encryption=wireguard owns one WireGuard device; its
peers are the other nodes of the mesh that publish a key. wg(8) works on the
device too: wg show <device>.`,
		Example: `  isthmus wireguard status
  isthmus wireguard status -o json
  isthmus wireguard rotate-key`,
	}
	var format string
	status := &cobra.Command{
		Use:   "status",
		Short: "Show the device, its peers, their latest handshake and bytes",
		Long: `status shows the node's WireGuard device (name, engine, public key, port,
MTU), its peers with their endpoint, AllowedIPs, latest handshake and bytes,
and the mesh nodes it does not encrypt to (no key published, or refused:
a duplicate key).`,
		Example: `  isthmus wireguard status
  isthmus --socket /var/run/isthmus/n1.sock wireguard status -o yaml`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			wireguard := func(ctx context.Context) (*api.WireGuardStatus, error) {
				st, err := c.client().Status(ctx)
				if err != nil {
					return nil, err
				}
				if st.WireGuard == nil {
					return nil, fmt.Errorf("encryption is off on node %s (start isthmus-agent with --encryption=wireguard)", st.Node)
				}
				return st.WireGuard, nil
			}
			return show(c, cmd, format, wireguard, func(w *api.WireGuardStatus) error { return printWireGuard(c.out, w) })
		},
	}
	addOutputFlag(status, &format)
	var rotFormat string
	rotate := &cobra.Command{
		Use:   "rotate-key",
		Short: "Replace the node's WireGuard key and publish the new public key",
		Long: `rotate-key generates a new private key, applies it to the device, stores it
(0600) in the agent's state dir and publishes the public key in the node
record. Peers switch when the record reaches them; established flows pause
for about one handshake and carry on.`,
		Example: `  isthmus wireguard rotate-key`,
		Args:    withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, rotFormat, c.client().RotateWireGuardKey, func(st api.WireGuardStatus) error {
				fmt.Fprintf(c.out, "New public key of %s: %s\n", st.Device, st.PublicKey)
				return nil
			})
		},
	}
	addOutputFlag(rotate, &rotFormat)
	cmd.AddCommand(status, rotate)
	return cmd
}

// printWireGuard writes the WireGuard section of the status.
func printWireGuard(w io.Writer, s *api.WireGuardStatus) error {
	t := newTable(w)
	mode := "pod-to-pod"
	if s.NodeEncryption {
		mode = "pod-to-pod and node-to-node"
	}
	fmt.Fprintf(t, "WireGuard:\t%s (%s engine), port %d, MTU %d, encrypting %s\n", s.Device, s.Mode, s.ListenPort, s.MTU, mode)
	fmt.Fprintf(t, "Public key:\t%s\n", s.PublicKey)
	if len(s.Unencrypted) > 0 {
		fmt.Fprintf(t, "Unencrypted:\t%s (no key published: traffic to their pods is dropped)\n", strings.Join(s.Unencrypted, ", "))
	}
	for _, r := range s.Refused {
		fmt.Fprintf(t, "Refused:\t%s\n", r)
	}
	if s.LastError != "" {
		fmt.Fprintf(t, "Error:\t%s\n", s.LastError)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	t = newTable(w)
	fmt.Fprintln(t, "  PEER\tENDPOINT\tALLOWED IPS\tHANDSHAKE\tRX\tTX")
	for _, p := range s.Peers {
		hs := "never"
		if !p.LastHandshake.IsZero() {
			hs = time.Since(p.LastHandshake).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(t, "  %s\t%s\t%s\t%s\t%d\t%d\n", orNone(p.Node), orNone(p.Endpoint), prefixes(p.AllowedIPs), hs, p.RxBytes, p.TxBytes)
	}
	return t.Flush()
}

func prefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
