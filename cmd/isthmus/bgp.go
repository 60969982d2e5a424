package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

func (c *cli) bgpCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bgp",
		Short: "Inspect the node's BGP sessions and the routes it announces",
		Long: `The agent runs a BGP speaker when a BGPPeeringPolicy selects its node: it
dials the policy's neighbours and announces the node's pod CIDRs and the
addresses of the services the policy's advertisements select. It is export
only: routes the neighbours send are received and rejected.`,
		Example: `  isthmus bgp peers
  isthmus bgp routes -o json`,
	}
	var peersFormat, routesFormat string
	peers := &cobra.Command{
		Use:   "peers",
		Short: "Show each neighbour's session: state, uptime, last error, prefixes, flaps",
		Long: `peers lists the neighbours of the policy in use with their session state
(idle, connect, active, opensent, openconfirm, established), since when,
prefixes received (all rejected) and advertised, flaps, and the last error:
a NOTIFICATION with its reason (a wrong AS), a connect error (an
unreachable peer, or a wrong TCP MD5 password: the peer drops the
connection silently), an unreadable password file.`,
		Example: `  isthmus bgp peers
  isthmus --socket /var/run/isthmus/n1.sock bgp peers -o yaml`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			get := func(ctx context.Context) (api.BGPStatus, error) { return c.client().BGP(ctx, false) }
			return show(c, cmd, peersFormat, get, func(st api.BGPStatus) error { return printBGP(c.out, &st) })
		},
	}
	addOutputFlag(peers, &peersFormat)
	routes := &cobra.Command{
		Use:   "routes",
		Short: "List the prefixes the node announces, with communities and why",
		Long: `routes lists the speaker's RIB: every prefix the node announces (pod CIDRs,
load-balancer and external IPs of selected services) with its communities,
local preference and the advertisements it comes from. Nothing learned
from a neighbour appears here: the import policy rejects it all.`,
		Example: `  isthmus bgp routes
  isthmus bgp routes -o json`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			get := func(ctx context.Context) (api.BGPStatus, error) { return c.client().BGP(ctx, true) }
			return show(c, cmd, routesFormat, func(ctx context.Context) ([]api.BGPRoute, error) {
				st, err := get(ctx)
				if err == nil && st.Routes == nil {
					st.Routes = []api.BGPRoute{}
				}
				return st.Routes, err
			}, func(rs []api.BGPRoute) error {
				t := newTable(c.out)
				fmt.Fprintln(t, "PREFIX\tCOMMUNITIES\tLOCAL PREF\tSOURCES")
				for _, r := range rs {
					lp := "-"
					if r.LocalPref != 0 {
						lp = fmt.Sprint(r.LocalPref)
					}
					fmt.Fprintf(t, "%s\t%s\t%s\t%s\n", r.Prefix, orNone(strings.Join(r.Communities, ",")), lp, orNone(strings.Join(r.Sources, ", ")))
				}
				return t.Flush()
			})
		},
	}
	addOutputFlag(routes, &routesFormat)
	cmd.AddCommand(peers, routes)
	return cmd
}

// printBGP writes the BGP section of the status and `isthmus bgp peers`.
func printBGP(w io.Writer, s *api.BGPStatus) error {
	if s.Policy == "" {
		_, err := fmt.Fprintln(w, "BGP: no BGPPeeringPolicy selects this node")
		return err
	}
	t := newTable(w)
	fmt.Fprintf(t, "BGP:\tpolicy %s, AS %d, router ID %s, %d prefixes announced\n", s.Policy, s.LocalASN, orNone(s.RouterID), s.Advertised)
	if len(s.Ignored) > 0 {
		fmt.Fprintf(t, "Ignored:\t%s (they select this node too; one policy per node, the first by name wins)\n", strings.Join(s.Ignored, ", "))
	}
	if s.LastError != "" {
		fmt.Fprintf(t, "Error:\t%s\n", s.LastError)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	t = newTable(w)
	fmt.Fprintln(t, "  NEIGHBOR\tAS\tSTATE\tSINCE\tRECEIVED\tADVERTISED\tFLAPS\tMD5\tGR\tLAST ERROR")
	for _, p := range s.Peers {
		since := "-"
		if !p.Since.IsZero() {
			since = time.Since(p.Since).Round(time.Second).String()
		}
		gr := "off"
		if p.GracefulRestart {
			gr = fmt.Sprintf("%ds", p.RestartTime)
		}
		fmt.Fprintf(t, "  %s\t%d\t%s\t%s\t%d\t%d\t%d\t%v\t%s\t%s\n", p.Address, p.PeerASN, p.State, since, p.Received, p.Advertised, p.Flaps, p.MD5, gr, orNone(p.LastError))
	}
	return t.Flush()
}
