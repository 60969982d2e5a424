package main

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/clustermesh/meshctl"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
)

// `isthmus clustermesh status` and its table.

func (m *mesh) statusCommand() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show each connected cluster: connected, synced, what is mirrored, last error",
		Long: `Show what this cluster's server reports about each connected remote cluster:
its state (connecting, connected, unreachable, dropped after the cache TTL,
refused, invalid record), whether every kind is synced (its canary written),
how many nodes, endpoints, identities and services are mirrored, how many of
its records are skipped as invalid, and the last error. The statuses are
written by the server: a stale heartbeat means they may be old.

-o json and -o yaml print everything, including the whole last error, the
last invalid record, the time of last contact and when the cache expires.`,
		Example: `  isthmus clustermesh status
  isthmus clustermesh status -o json | jq '.remotes[] | {cluster, state, ready}'`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			status := func(ctx context.Context) (meshctl.Status, error) {
				kv, err := m.conn.Dial(ctx)
				if err != nil {
					return meshctl.Status{}, err
				}
				defer kv.Close()
				return meshctl.ReadStatus(ctx, kv)
			}
			return show(m.cli, cmd, format, status, m.printMeshStatus)
		},
	}
	addOutputFlag(cmd, &format)
	return cmd
}

func (m *mesh) printMeshStatus(st meshctl.Status) error {
	t := newTable(m.out)
	fmt.Fprintf(t, "Cluster:\t%s (ID %d), pod CIDRs %s\n", st.Cluster, st.ClusterID, orNone(joinPrefixes(st.PodCIDRs)))
	hb := "none (is isthmus-clustermesh running?)"
	if !st.Heartbeat.IsZero() {
		age := time.Since(st.Heartbeat).Round(time.Second)
		hb = fmt.Sprintf("%s ago", age)
		if age > meshctl.HeartbeatStale {
			hb += " — STALE: is isthmus-clustermesh running? The statuses below may be old"
		}
	}
	fmt.Fprintf(t, "Server:\t%s, heartbeat %s\n", strings.Join(st.Endpoints, ","), hb)
	if err := t.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(m.out)
	if len(st.Remotes) == 0 {
		fmt.Fprintln(m.out, "No remote clusters connected. Connect one with: isthmus clustermesh connect --bundle FILE")
		return nil
	}
	t = newTable(m.out)
	fmt.Fprintln(t, "CLUSTER\tID\tSTATE\tCONNECTED\tSYNCED\tNODES\tENDPOINTS\tIDENTITIES\tSERVICES\tINVALID\tREFUSED\tLAST ERROR")
	for _, r := range st.Remotes {
		fmt.Fprintf(t, "%s\t%d\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", r.Cluster, r.ClusterID, r.State, yesNo(r.Connected),
			syncedText(r.Synced), r.Nodes, r.Endpoints, r.Identities, r.Services, r.Invalid, r.RefusedText(), lastError(r))
	}
	return t.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func syncedText(s mirror.Synced) string {
	n := 0
	for _, b := range []bool{s.Nodes, s.Endpoints, s.Identities, s.Services} {
		if b {
			n++
		}
	}
	switch n {
	case 4:
		return "yes"
	case 0:
		return "no"
	}
	return fmt.Sprintf("%d/4", n)
}

// lastError shortens the last error for the table (-o json has it whole);
// one from before the current connection is resolved and not shown.
func lastError(r mirror.Status) string {
	msg := r.CurrentError()
	if msg == "" {
		return "-"
	}
	if len(msg) > 120 {
		msg = msg[:117] + "..."
	}
	if !r.LastErrorTime.IsZero() {
		msg += fmt.Sprintf(" (%s ago)", time.Since(r.LastErrorTime).Round(time.Second))
	}
	return msg
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
