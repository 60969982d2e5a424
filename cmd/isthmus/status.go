package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

func (c *cli) identityCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "identity",
		Aliases: []string{"identities", "id"},
		Short:   "Inspect security identities",
		Long: `A security identity is a number for a set of labels; policy is enforced
between identities. Every endpoint has the identity of its labels (with
isthmus.io/namespace and isthmus.io/cluster); reserved identities stand for
the host, the world and other special peers.`,
		Example: `  isthmus identity list
  isthmus id ls -o json`,
	}
	var format string
	list := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List reserved and allocated identities with their labels",
		Long: `List the reserved identities, then the allocated ones with their labels.
ENDPOINTS counts this node's endpoints that carry the identity. In cluster
mode the list holds the identities of this cluster and of every synced
remote cluster.`,
		Example: `  isthmus identity list
  isthmus identity list -o yaml`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, format, c.client().Identities, func(ids []api.Identity) error {
				t := newTable(c.out)
				fmt.Fprintln(t, "ID\tENDPOINTS\tLABELS")
				for _, id := range ids {
					eps := fmt.Sprint(id.Endpoints)
					if _, reserved := identity.ReservedName(id.ID); reserved {
						eps = "-"
					}
					fmt.Fprintf(t, "%d\t%s\t%s\n", id.ID, eps, identity.Labels(id.Labels).String())
				}
				return t.Flush()
			})
		},
	}
	addOutputFlag(list, &format)
	cmd.AddCommand(list)
	return cmd
}

func (c *cli) statusCommand() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the node, what it runs, and the datapath counters",
		Long: `Show this node's agent: node, cluster, pod CIDRs, attach mode, counts of
endpoints, identities, services, policies, ipcache and conntrack entries,
whether the datapath is in sync, and the datapath counters per reason. In
cluster mode also the connection to the cluster's etcd and a table of the
clusters of the mesh; with encryption the WireGuard device and its peers;
BIG TCP per path (same node, other nodes in the clear or through WireGuard,
the outside) and family, on or why not, with the external devices' and
every endpoint's GSO/GRO sizes.
-o json and -o yaml print the agent's status object whole.`,
		Example: `  isthmus status
  isthmus status -o json | jq .clustermesh`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return show(c, cmd, format, c.client().Status, func(st api.Status) error {
				cidrs := make([]string, len(st.PodCIDRs))
				for i, p := range st.PodCIDRs {
					cidrs[i] = p.String()
				}
				t := newTable(c.out)
				fmt.Fprintf(t, "Node:\t%s (cluster %s, ID %d)\n", st.Node, st.Cluster, st.ClusterID)
				fmt.Fprintf(t, "Pod CIDRs:\t%s\n", strings.Join(cidrs, ", "))
				fmt.Fprintf(t, "Attach mode:\t%s\n", orNone(st.AttachMode))
				fmt.Fprintf(t, "Up since:\t%s (%s)\n", st.Started.Local().Format(time.RFC3339), time.Since(st.Started).Round(time.Second))
				fmt.Fprintf(t, "Endpoints:\t%d\n", st.Endpoints)
				fmt.Fprintf(t, "Identities:\t%d allocated\n", st.Identities)
				fmt.Fprintf(t, "Services:\t%d (%d frontends in the datapath)\n", st.Services, st.Frontends)
				fmt.Fprintf(t, "Policies:\t%d (%d policy map entries)\n", st.NetworkPolicies, st.PolicyEntries)
				fmt.Fprintf(t, "IPCache:\t%d entries\n", st.IPCacheEntries)
				fmt.Fprintf(t, "Conntrack:\t%d entries\n", st.Conntrack)
				rec := "never ran"
				switch {
				case st.Reconcile.LastError != "":
					rec = "FAILING, retrying: " + st.Reconcile.LastError
				case !st.Reconcile.LastSuccess.IsZero():
					rec = fmt.Sprintf("in sync (%d runs, last %s ago)", st.Reconcile.Runs, time.Since(st.Reconcile.LastSuccess).Round(time.Second))
				}
				fmt.Fprintf(t, "Datapath:\t%s\n", rec)
				for _, e := range st.Errors {
					fmt.Fprintf(t, "Error:\t%s\n", e)
				}
				if m := st.ClusterMesh; m != nil {
					conn := "connected"
					if !m.Connected {
						conn = "NOT connected"
					}
					if m.LastError != "" {
						conn += " (last error: " + m.LastError + ")"
					}
					fmt.Fprintf(t, "Cluster mesh:\t%s to %s\n", conn, strings.Join(m.KVStoreEndpoints, ","))
					fmt.Fprintf(t, "Published:\t%v (%d records)\n", m.Published, m.PublishedRecords)
					if m.RouteError != "" {
						fmt.Fprintf(t, "Routes:\tFAILING: %s\n", m.RouteError)
					}
					if m.InvalidRecords > 0 {
						fmt.Fprintf(t, "Invalid records:\t%d skipped (last: %s)\n", m.InvalidRecords, m.LastInvalid)
					}
				}
				if err := t.Flush(); err != nil {
					return err
				}
				if m := st.ClusterMesh; m != nil && len(m.Clusters) > 0 {
					fmt.Fprintln(c.out, "\nClusters:")
					t = newTable(c.out)
					fmt.Fprintln(t, "  CLUSTER\tID\tSYNCED\tNODES\tENDPOINTS\tIDENTITIES\tSERVICES\tINVALID\tREFUSED\tERROR")
					for _, cl := range m.Clusters {
						name := cl.Name
						if cl.Local {
							name += " (local)"
						}
						fmt.Fprintf(t, "  %s\t%d\t%v\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", name, cl.ID, cl.Synced, cl.Nodes, cl.Endpoints, cl.Identities, cl.Services, cl.InvalidRecords,
							records.RefusedText(cl.Refused), orNone(cl.Error))
					}
					if err := t.Flush(); err != nil {
						return err
					}
				}
				if w := st.WireGuard; w != nil {
					fmt.Fprintln(c.out)
					if err := printWireGuard(c.out, w); err != nil {
						return err
					}
				}
				if b := st.BGP; b != nil {
					fmt.Fprintln(c.out)
					if err := printBGP(c.out, b); err != nil {
						return err
					}
				}
				if k := st.Kubernetes; k != nil {
					synced := "yes"
					if !k.Synced {
						synced = "no (serving the objects persisted by the previous run)"
					}
					fmt.Fprintf(c.out, "\nKubernetes: informers synced: %s; objects: %d; refused now: %d (refusals since start: %d)\n",
						synced, k.Objects, k.Refused, k.Refusals)
				}
				if b := st.BigTCP; b != nil {
					fmt.Fprintln(c.out)
					if err := printBigTCP(c.out, b); err != nil {
						return err
					}
				}
				if ns := st.NorthSouth; ns != nil {
					fmt.Fprintln(c.out)
					if err := printNorthSouth(c.out, ns); err != nil {
						return err
					}
				}
				fmt.Fprintln(c.out, "\nDatapath counters:")
				t = newTable(c.out)
				fmt.Fprintln(t, "  REASON\tPACKETS\tBYTES")
				for _, m := range st.Metrics {
					fmt.Fprintf(t, "  %s\t%d\t%d\n", m.Reason, m.Packets, m.Bytes)
				}
				return t.Flush()
			})
		},
	}
	addOutputFlag(cmd, &format)
	return cmd
}
