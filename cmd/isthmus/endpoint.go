package main

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

func (c *cli) endpointCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "endpoint",
		Aliases: []string{"endpoints", "ep"},
		Short:   "Add, delete and list endpoints (pods plumbed into the datapath)",
		Long: `An endpoint is a pod's network namespace plumbed into this node: a veth pair,
addresses from the node's pod CIDRs, the datapath programs and the security
identity of its labels. Endpoints are per node: list shows this node's.`,
		Example: `  isthmus endpoint add web1 --netns /var/run/netns/web1 --labels app=web
  isthmus endpoint list -o json
  isthmus endpoint del web1`,
	}
	cmd.AddCommand(c.endpointAddCommand(), c.endpointDelCommand(), c.endpointListCommand())
	return cmd
}

func (c *cli) endpointAddCommand() *cobra.Command {
	var req api.EndpointRequest
	var labels string
	cmd := &cobra.Command{
		Use:   "add NAME --netns PATH [--namespace NS] [--labels k=v,k2=v2]",
		Short: "Plumb a pod: veth, addresses, routes, datapath, identity",
		Long: `Plumb the network namespace of a pod into the node: the agent creates a veth
pair (eth0 inside the pod), gives it an IPv4 and/or IPv6 address from the
node's pod CIDRs, sets the pod's default routes, attaches the datapath and
allocates the security identity of the pod's labels.`,
		Example: `  ip netns add web1
  isthmus endpoint add web1 --netns /var/run/netns/web1 --labels app=web
  isthmus endpoint add db1 -n shop --netns /proc/4242/ns/net --labels app=db,tier=back`,
		Args: withUsage(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := identity.ParseLabels(labels)
			if err != nil {
				return fmt.Errorf("--labels: %w", err)
			}
			req.Name, req.Labels = args[0], l
			ctx, cancel := c.ctx(cmd)
			defer cancel()
			ep, err := c.client().AddEndpoint(ctx, req)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "endpoint %s/%s added: %s, identity %d, interface %s\n",
				ep.Namespace, ep.Name, joinAddrs(ep.IPs), ep.Identity, ep.Interface)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Netns, "netns", "", "path of the pod's network namespace (e.g. /var/run/netns/NAME or /proc/PID/ns/net)")
	f.StringVarP(&req.Namespace, "namespace", "n", "default", "namespace of the endpoint")
	f.StringVar(&labels, "labels", "", "labels of the endpoint, k=v,k2=v2 (they select it in Services and NetworkPolicies)")
	_ = cmd.MarkFlagRequired("netns")
	return cmd
}

func (c *cli) endpointDelCommand() *cobra.Command {
	var ns string
	cmd := &cobra.Command{
		Use:     "del NAME [--namespace NS]",
		Aliases: []string{"delete", "rm"},
		Short:   "Remove an endpoint: datapath entries, veth, address and identity",
		Long: `Remove an endpoint from this node: its datapath entries, the veth pair (the
pod's eth0 goes with it), its addresses and its reference on the identity.
The network namespace itself stays.`,
		Example: `  isthmus endpoint del web1
  isthmus endpoint rm db1 -n shop`,
		Args:              withUsage(cobra.ExactArgs(1)),
		ValidArgsFunction: c.completeEndpoints,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := c.ctx(cmd)
			defer cancel()
			if err := c.client().DeleteEndpoint(ctx, ns, args[0]); err != nil {
				if api.IsNotFound(err) {
					return fmt.Errorf("%w (isthmus endpoint list shows the endpoints)", err)
				}
				return err
			}
			fmt.Fprintf(c.out, "endpoint %s/%s deleted\n", ns, args[0])
			return nil
		},
	}
	cmd.Flags().StringVarP(&ns, "namespace", "n", "default", "namespace of the endpoint")
	return cmd
}

func (c *cli) endpointListCommand() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the endpoints of the node",
		Long: `List this node's endpoints: namespace, name, addresses, identity, labels,
host-side interface and network namespace. -o json and -o yaml print the
agent's endpoint objects whole.`,
		Example: `  isthmus endpoint list
  isthmus ep ls -o yaml`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, format, c.client().ListEndpoints, func(eps []api.Endpoint) error {
				if len(eps) == 0 {
					fmt.Fprintln(c.out, "No endpoints. Add one with: isthmus endpoint add NAME --netns PATH")
					return nil
				}
				t := newTable(c.out)
				fmt.Fprintln(t, "NAMESPACE\tNAME\tIPS\tIDENTITY\tLABELS\tINTERFACE\tNETNS")
				for _, e := range eps {
					fmt.Fprintf(t, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", e.Namespace, e.Name, joinAddrs(e.IPs), e.Identity,
						orNone(identity.Labels(e.Labels).String()), e.Interface, e.Netns)
				}
				return t.Flush()
			})
		},
	}
	addOutputFlag(cmd, &format)
	return cmd
}

// completeEndpoints completes NAME of `endpoint del` with this node's
// endpoints in the -n namespace.
func (c *cli) completeEndpoints(cmd *cobra.Command, args []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ns, _ := cmd.Flags().GetString("namespace")
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	eps, err := c.client().ListEndpoints(ctx)
	if err != nil {
		cobra.CompDebugln(err.Error(), false)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []cobra.Completion
	for _, e := range eps {
		if e.Namespace == ns {
			names = append(names, cobra.CompletionWithDesc(e.Name, joinAddrs(e.IPs)))
		}
	}
	return filterPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

func joinAddrs(ips []netip.Addr) string {
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ",")
}

func orNone(s string) string {
	if s == "" {
		return "<none>"
	}
	return s
}
