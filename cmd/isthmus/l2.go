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

func (c *cli) l2Command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "l2",
		Short: "Inspect L2 announcements (ARP/NDP answers for service addresses)",
		Long: `L2AnnouncementPolicy objects make one node at a time answer ARP (IPv4) and
NDP (IPv6) for the external and load-balancer addresses of the services
they select, on the interfaces they name.`,
		Example: `  isthmus l2 status
  isthmus l2 status -o json`,
	}
	var format string
	status := &cobra.Command{
		Use:   "status",
		Short: "Show who leads each announced address, on which interface, since when",
		Long: `status shows, as this node sees it: every address the policies select, the
node that leads (answers for) it and how many nodes could, the interfaces
and the time this node leads its own since; the nodes it counts as alive
candidates; whether it holds its L2 lease (cluster mode); each policy on
this node (selected, interfaces with carrier, problems such as an interface
pattern matching nothing); and the answers it sent.`,
		Example: `  isthmus l2 status
  isthmus --socket /var/run/isthmus/n1.sock l2 status -o yaml`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			get := func(ctx context.Context) (*api.L2Status, error) {
				st, err := c.client().Status(ctx)
				if err != nil {
					return nil, err
				}
				if st.L2 == nil {
					return nil, fmt.Errorf("node %s does not report L2 announcements (an older agent?)", st.Node)
				}
				return st.L2, nil
			}
			return show(c, cmd, format, get, func(s *api.L2Status) error { return printL2(c.out, s) })
		},
	}
	addOutputFlag(status, &format)
	cmd.AddCommand(status)
	return cmd
}

// printL2 writes the L2 announcements as a table.
func printL2(w io.Writer, s *api.L2Status) error {
	lease := "held"
	if !s.LeaseHeld {
		lease = "NOT held: answering nothing"
		if s.LeaseErr != "" {
			lease += " (" + s.LeaseErr + ")"
		}
	}
	fmt.Fprintf(w, "Mode: %s, lease %s\n", s.Mode, lease)
	if s.Heartbeat != "" {
		fmt.Fprintf(w, "Heartbeats: %s\n", s.Heartbeat)
	}
	fmt.Fprintf(w, "Members: %s\n", orNone(strings.Join(s.Members, ", ")))
	fmt.Fprintf(w, "Leading %d of %d addresses; takeovers %d; sent %d ARP replies, %d neighbour advertisements, %d announcements\n",
		s.Leaderships, len(s.Addresses), s.Takeovers, s.ARPReplies, s.NAReplies, s.Gratuitous)
	t := newTable(w)
	fmt.Fprintln(t, "ADDRESS\tSERVICE\tPOLICY\tLEADER\tCANDIDATES\tINTERFACES\tSINCE")
	for _, a := range s.Addresses {
		since := ""
		if a.Since != nil {
			since = a.Since.Format(time.RFC3339Nano)
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", a.Address, a.Service, a.Policy, orNone(a.Leader), a.Candidates,
			orNone(strings.Join(a.Interfaces, ",")), orNone(since))
	}
	if err := t.Flush(); err != nil {
		return err
	}
	t = newTable(w)
	fmt.Fprintln(t, "POLICY\tNODE SELECTED\tINTERFACES\tSERVICES\tADDRESSES\tPROBLEM")
	for _, p := range s.Policies {
		fmt.Fprintf(t, "%s\t%v\t%s\t%d\t%d\t%s\n", p.Name, p.Selected, orNone(strings.Join(p.Interfaces, ",")), p.Services, p.Addresses, orNone(p.Problem))
	}
	for _, e := range s.Errors {
		fmt.Fprintf(t, "Error:\t%s\n", e)
	}
	return t.Flush()
}
