package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/clustermesh/enroll"
	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/meshctl"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// `isthmus vm`: external workloads (docs/vms.md). Like the clustermesh
// verbs it talks to the cluster's etcd as root; the operations are
// package enroll's.

func (c *cli) vmCommand() *cobra.Command {
	m := &mesh{cli: c, conn: meshctl.Conn{DataDirRoot: dataDirRoot}}
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Enroll VMs and bare-metal hosts into the cluster (external workloads)",
		Long: `The vm verbs manage external workloads: hosts that are not pods but join
the cluster with isthmus-agent --join and a one-time token. They talk to the
cluster's etcd as root, like the clustermesh verbs (--kvstore-bundle,
--kvstore-endpoints).

  isthmus vm apply -f db1.yaml                 # kind: ExternalWorkload
  isthmus vm token create db1 --ttl 15m        # prints the token and the join command
  (on the host) isthmus-agent --join https://SERVER:8443 --token T --ca-fingerprint FP
  isthmus vm list
  isthmus vm revoke db1                        # cut off within seconds; a new token re-enrolls
  isthmus vm delete db1                        # revoke and forget (its addresses are freed)`,
	}
	pf := cmd.PersistentFlags()
	defaultEndpoints := splitList(os.Getenv(envKVStoreEndpoints))
	if len(defaultEndpoints) == 0 {
		defaultEndpoints = []string{meshctl.DefaultEndpoint}
	}
	pf.StringSliceVar(&m.conn.Endpoints, "kvstore-endpoints", defaultEndpoints, "etcd client URLs of this cluster's isthmus-clustermesh (env "+envKVStoreEndpoints+")")
	pf.StringVar(&m.conn.Bundle, "kvstore-bundle", os.Getenv(envKVStoreBundle), "directory with the cluster's root bundle (env "+envKVStoreBundle+")")
	cmd.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		m.conn.EndpointsSet = cmd.Flags().Changed("kvstore-endpoints") || os.Getenv(envKVStoreEndpoints) != ""
		m.conn.DataDirRoot = dataDirRoot
	}
	token := &cobra.Command{Use: "token", Short: "Enrollment tokens"}
	token.AddCommand(m.vmTokenCreateCommand())
	cmd.AddCommand(m.vmApplyCommand(), token, m.vmListCommand(), m.vmRevokeCommand(), m.vmDeleteCommand())
	return cmd
}

// vmDial connects as root and returns the cluster's name.
func (m *mesh) vmDial(ctx context.Context) (*kvstore.Client, string, error) {
	kv, err := m.conn.Dial(ctx)
	if err != nil {
		return nil, "", err
	}
	r, found, err := kv.Get(ctx, etcdserver.InfoKey)
	if err == nil && !found {
		err = errors.New("the server has not written its info yet")
	}
	var in etcdserver.Info
	if err == nil {
		in, err = etcdserver.DecodeInfo(r.Value)
	}
	if err != nil {
		kv.Close()
		return nil, "", fmt.Errorf("read the cluster's server info: %w", err)
	}
	return kv, in.Cluster, nil
}

func (m *mesh) vmApplyCommand() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create or change an ExternalWorkload (YAML or JSON; - is stdin)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(m.in)
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			w, err := objects.DecodeExternalWorkload(data)
			if err != nil {
				return err
			}
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			kv, _, err := m.vmDial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			if err := enroll.Apply(ctx, kv, w); err != nil {
				return err
			}
			fmt.Fprintf(m.out, "externalworkload/%s applied\n", w.Metadata.Name)
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "the ExternalWorkload (YAML or JSON; - for stdin)")
	_ = cmd.MarkFlagRequired("file")
	return cmd
}

func (m *mesh) vmTokenCreateCommand() *cobra.Command {
	var ttl time.Duration
	var format string
	cmd := &cobra.Command{
		Use:   "create NAME [--ttl 15m]",
		Short: "Print a single-use, expiring enrollment token for ExternalWorkload NAME",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			kv, cluster, err := m.vmDial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			r, found, err := kv.Get(ctx, enroll.ServerKey)
			if err != nil {
				return err
			}
			if !found {
				return errors.New("the cluster's server does not serve enrollment: start isthmus-clustermesh with --enroll-listen and --vm-cidr")
			}
			var ep enroll.Endpoint
			if err := json.Unmarshal(r.Value, &ep); err != nil {
				return fmt.Errorf("enrollment endpoint record: %w", err)
			}
			tok, exp, err := enroll.CreateToken(ctx, kv, cluster, args[0], ttl)
			if err != nil {
				return err
			}
			out := map[string]string{"token": tok, "server": ep.URL, "caFingerprint": ep.CAFingerprint,
				"expires": exp.Format(time.RFC3339), "cluster": cluster, "name": args[0]}
			if format == "json" {
				return printData(m.out, formatJSON, out)
			}
			fmt.Fprintf(m.out, "token:          %s\nserver:         %s\nca-fingerprint: %s\nexpires:        %s (single use)\n\non the host:\n  isthmus-agent --join %s --token %s --ca-fingerprint %s\n",
				tok, ep.URL, ep.CAFingerprint, out["expires"], ep.URL, tok, ep.CAFingerprint)
			return nil
		},
	}
	cmd.Flags().DurationVar(&ttl, "ttl", 15*time.Minute, "how long the token may be used (once)")
	cmd.Flags().StringVarP(&format, "output", "o", "", "json: print a JSON object")
	return cmd
}

func (m *mesh) vmListCommand() *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the external workloads and their status",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			kv, cluster, err := m.vmDial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			ws, err := enroll.List(ctx, kv)
			if err != nil {
				return err
			}
			if format == "json" {
				if ws == nil {
					ws = []objects.ExternalWorkload{}
				}
				return printData(m.out, formatJSON, ws)
			}
			tw := tabwriter.NewWriter(m.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tNAMESPACE\tSTATE\tADDRESSES\tNODE ADDRESSES\tONLINE\tLAST SEEN\tCERT EXPIRES")
			for _, w := range ws {
				state := "pending"
				switch {
				case w.Status.Enrolled:
					state = "enrolled"
				case w.Status.Revoked:
					state = "revoked"
				}
				_, online, _ := kv.Get(ctx, records.NodeKey(cluster, enroll.NodeName(w.Metadata.Name)))
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%v\t%s\t%s\n", w.Metadata.Name, w.Metadata.Namespace, state,
					joinAny(w.Status.Addresses), joinAny(w.Status.NodeAddresses), online, when(w.Status.LastSeen), when(w.Status.CertificateExpiry))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&format, "output", "o", "", "json: print the objects with their status")
	return cmd
}

func joinAny[T fmt.Stringer](xs []T) string {
	if len(xs) == 0 {
		return "-"
	}
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = x.String()
	}
	return strings.Join(s, ",")
}

func when(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func (m *mesh) vmRevokeCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke NAME",
		Short: "Cut an enrolled host off: its credential, node record, ipcache entries and tunnels go",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			kv, cluster, err := m.vmDial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			if _, rev, err := enroll.Get(ctx, kv, args[0]); err != nil {
				return err
			} else if rev == 0 {
				return fmt.Errorf("no ExternalWorkload %q", args[0])
			}
			if err := enroll.Revoke(ctx, kv, cluster, args[0]); err != nil {
				return err
			}
			fmt.Fprintf(m.out, "externalworkload/%s revoked\n", args[0])
			return nil
		},
	}
}

func (m *mesh) vmDeleteCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Revoke an external workload and delete it (its addresses are freed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			kv, cluster, err := m.vmDial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			if err := enroll.Delete(ctx, kv, cluster, args[0]); err != nil {
				return err
			}
			fmt.Fprintf(m.out, "externalworkload/%s deleted\n", args[0])
			return nil
		},
	}
}
