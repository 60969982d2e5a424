package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/lab"
)

// `isthmus connectivity test`: the flags and the output of package
// connectivity (which runs the checks, see its doc) against the lab of
// `isthmus lab up` or, with --agent, any agents on this host.

type connectivityFlags struct {
	agents    []string
	namespace string
	vips      []string
	run       connectivity.Options
	format    string
	verbose   bool
}

func (c *cli) connectivityCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "connectivity",
		Short: "Check pod, service, policy and encryption connectivity end to end",
	}
	cmd.AddCommand(c.connectivityTestCommand(), c.connectivityPauseCommand(), c.connectivityKubeAPICommand())
	return cmd
}

func (c *cli) connectivityTestCommand() *cobra.Command {
	o := connectivityFlags{}
	cmd := &cobra.Command{
		Use:   "test [--agent SOCKET ...]",
		Short: "Run real traffic through the mesh and check every path; non-zero exit on a failure",
		Long: `Run real TCP (HTTP) connections through the mesh and check:

  pod to pod on one node, across nodes, across clusters (IPv4 and IPv6)
  the global service from every cluster: backends of every cluster answer
    (requests until every cluster answered, at most for --timeout)
  a pod the policy does not admit is denied over IPv4 and IPv6: every
    connection attempt to echo pods and VIPs times out (an answer, a refusal,
    an unreachable route or any other error fails the check), after the same
    targets answered an admitted pod and the denied pod's own network was
    proven over the same family (it reaches another denied pod, or an
    admitted pod reaches it)
  with WireGuard: on a node's underlay interface, cross-node traffic shows
    WireGuard UDP and no packet with a pod address in the clear

Without --agent it checks the lab of 'isthmus lab up' (read from its state
file, ` + lab.DefaultStateFile + ` or $` + lab.EnvStateFile + `). With --agent it checks the
agents behind the given sockets (on this host, as root): it creates two echo
pods per node and one denied pod per cluster (network namespaces
isthmus-ct-*), a global Service "echo" and a NetworkPolicy in --namespace,
and removes all of them afterwards (also on Ctrl-C).

Every verdict carries its evidence: the requests sent (from which pod to
which address), who answered them and what failed, and for the encryption
check what the capture counted. -v prints it after the table; -o json and
-o yaml always include it ("evidence").`,
		Example: `  isthmus connectivity test
  isthmus connectivity test -v
  isthmus connectivity test -o json
  isthmus connectivity test --agent /var/run/isthmus/n1.sock --agent /var/run/isthmus/n2.sock`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkFormat(o.format); err != nil {
				return err
			}
			logf := func(format string, args ...any) { fmt.Fprintf(cmd.ErrOrStderr(), format+"\n", args...) }
			rep, err := runConnectivity(cmd.Context(), o, logf)
			if err != nil {
				return err
			}
			if o.format != formatTable {
				if err := printData(c.out, o.format, rep); err != nil {
					return err
				}
			} else if err := rep.WriteTable(c.out, o.verbose); err != nil {
				return err
			}
			if rep.Failed > 0 {
				return fmt.Errorf("connectivity test: %d of %d checks failed", rep.Failed, len(rep.Results))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&o.agents, "agent", nil, "API socket of an agent to test (repeat or comma-separate); default: the lab of 'isthmus lab up'")
	f.StringVar(&o.namespace, "namespace", "isthmus-connectivity", "with --agent: namespace of the test's pods, service and policy")
	f.StringSliceVar(&o.vips, "service-vip", []string{"10.96.255.100", "fd00:96::ff:100"}, "with --agent: VIPs of the test's global service (at most one per family)")
	f.DurationVar(&o.run.Timeout, "timeout", 30*time.Second, "how long a connection that must work may take to start working")
	f.DurationVar(&o.run.DenyTimeout, "deny-timeout", 2*time.Second, "how long a connection that must be denied is given to answer")
	f.BoolVarP(&o.verbose, "verbose", "v", false, "print the evidence of every verdict after the table: requests sent, who answered, what was captured")
	addOutputFlag(cmd, &o.format)
	return cmd
}

// runConnectivity picks the target, runs the checks and removes what the
// target created.
func runConnectivity(ctx context.Context, o connectivityFlags, logf func(string, ...any)) (connectivity.Report, error) {
	var t *connectivity.Target
	var err error
	if len(o.agents) > 0 {
		ao := connectivity.AgentsOptions{Sockets: o.agents, Namespace: o.namespace}
		for _, v := range o.vips {
			a, perr := netip.ParseAddr(strings.TrimSpace(v))
			if perr != nil {
				return connectivity.Report{}, fmt.Errorf("--service-vip %q: %w", v, perr)
			}
			ao.VIPs = append(ao.VIPs, a)
		}
		t, err = connectivity.NewAgentsTarget(ctx, ao, logf)
	} else {
		var st *lab.State
		st, err = lab.ReadState(lab.StateFile())
		if errors.Is(err, os.ErrNotExist) {
			return connectivity.Report{}, fmt.Errorf("no lab is up (no %s) and no --agent given: run 'isthmus lab up', or name the agents with --agent SOCKET", lab.StateFile())
		}
		if err == nil {
			t, err = st.ConnectivityTarget(ctx)
		}
	}
	if t != nil {
		defer func() {
			// Also after Ctrl-C: the cleanup gets a fresh context.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if cerr := t.Cleanup(cctx); cerr != nil {
				logf("cleanup: %v", cerr)
			}
		}()
	}
	if err != nil {
		return connectivity.Report{}, err
	}
	logf("connectivity test of %s: %d nodes, %d pods", t.Name, len(t.Nodes), len(t.Pods))
	return connectivity.Run(ctx, t, o.run), nil
}

// labEchoServerCommand is what package lab starts in every echo pod of
// `lab up` (hidden: users have no use for it).
func (c *cli) labEchoServerCommand() *cobra.Command {
	var listen, pod, node, cluster string
	cmd := &cobra.Command{
		Use:    "echo-server --pod NAME --node NAME --cluster NAME [--listen :8080]",
		Short:  "Answer every HTTP request with the pod, node and cluster name",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ln, err := connectivity.ListenIn("", listen)
			if err != nil {
				return err
			}
			return connectivity.ServeEcho(cmd.Context(), ln, pod, node, cluster)
		},
	}
	f := cmd.Flags()
	f.StringVar(&listen, "listen", ":8080", "address to listen on (both families for :PORT)")
	f.StringVar(&pod, "pod", "", "pod name to answer with")
	f.StringVar(&node, "node", "", "node name to answer with")
	f.StringVar(&cluster, "cluster", "", "cluster name to answer with")
	return cmd
}
