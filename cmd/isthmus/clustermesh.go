package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/meshctl"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// `isthmus clustermesh`: flags, help and output; the operations against
// the cluster's etcd are package meshctl's.

// Environment variables of the clustermesh verbs.
const (
	envKVStoreEndpoints = meshctl.EnvEndpoints
	envKVStoreBundle    = meshctl.EnvBundle
)

// mesh holds what the clustermesh verbs share: how to reach the local
// cluster's etcd as root.
type mesh struct {
	*cli
	conn meshctl.Conn
}

func (c *cli) clustermeshCommand() *cobra.Command {
	m := &mesh{cli: c, conn: meshctl.Conn{DataDirRoot: dataDirRoot}}
	cmd := &cobra.Command{
		Use:     "clustermesh",
		Aliases: []string{"mesh", "cm"},
		Short:   "Connect clusters and show the state of the mesh",
		Long: `The clustermesh verbs talk to the local cluster's etcd (its isthmus-clustermesh
server), not to the agent: with the cluster's root bundle (--kvstore-bundle,
on the server host <data-dir>/pki/bundles/root) at --kvstore-endpoints.

To connect clusters c1 and c2 both ways:

  on c2's server:  isthmus clustermesh certs --data-dir D2 --for-remote c1 --out c2-for-c1.json
  on c1's server:  isthmus clustermesh certs --data-dir D1 --for-remote c2 --out c1-for-c2.json
  on c1:           isthmus clustermesh connect --bundle c2-for-c1.json
  on c2:           isthmus clustermesh connect --bundle c1-for-c2.json

Each server then mirrors the other's nodes, endpoints, identities and
services into its own etcd; isthmus clustermesh status shows the progress.

On the server host, with exactly one server under ` + etcdserver.DefaultDataDirRoot + `,
--kvstore-bundle and --kvstore-endpoints are found without flags.`,
		Example: `  isthmus clustermesh status
  isthmus clustermesh status --kvstore-endpoints https://192.0.2.1:2379 --kvstore-bundle /etc/isthmus/root -o json
  isthmus clustermesh connect --bundle c2-for-c1.json --wait 1m`,
	}
	pf := cmd.PersistentFlags()
	defaultEndpoints := splitList(os.Getenv(envKVStoreEndpoints))
	if len(defaultEndpoints) == 0 {
		defaultEndpoints = []string{meshctl.DefaultEndpoint}
	}
	pf.StringSliceVar(&m.conn.Endpoints, "kvstore-endpoints", defaultEndpoints, "etcd client URLs of this cluster's isthmus-clustermesh (env "+envKVStoreEndpoints+")")
	pf.StringVar(&m.conn.Bundle, "kvstore-bundle", os.Getenv(envKVStoreBundle), "directory with the cluster's root bundle: ca.crt, client.crt, client.key (env "+envKVStoreBundle+"; on the server host <data-dir>/pki/bundles/root; default: that of the one server under "+etcdserver.DefaultDataDirRoot+", if there is exactly one)")
	_ = cmd.MarkPersistentFlagDirname("kvstore-bundle")
	cmd.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		m.conn.EndpointsSet = cmd.Flags().Changed("kvstore-endpoints") || os.Getenv(envKVStoreEndpoints) != ""
		m.conn.DataDirRoot = dataDirRoot
	}
	cmd.AddCommand(m.certsCommand(), m.connectCommand(), m.disconnectCommand(), m.statusCommand())
	return cmd
}

func splitList(s string) []string {
	var out []string
	for p := range strings.SplitSeq(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// dataDirRoot is where the verbs look for a server's data dir when no
// bundle is given (a variable for tests).
var dataDirRoot = etcdserver.DefaultDataDirRoot

func (m *mesh) certsCommand() *cobra.Command {
	var dataDir, node, forRemote, out string
	var sharedAgents bool
	var ks kubeSecrets
	cmd := &cobra.Command{
		Use:   "certs --data-dir DIR (--node NAME | --for-remote CLUSTER) --out FILE|DIR/",
		Short: "Export the bundle of one of this cluster's nodes, or for a remote cluster's server",
		Long: `Export credentials of this cluster's etcd. Run it on the server host: it reads
the server's --data-dir, and the server must be running.

--node NAME creates the etcd user node-NAME (if needed) and exports a bundle
with a new certificate for it, for that node's isthmus-agent
--kvstore-bundle. A node's credential writes only that node's records: its
node record, its endpoints' ipcache entries, identities and applied objects;
never another node's records, the cluster config, the mirror's cache of
remote clusters or canaries (docs/clustermesh.md).

--for-remote CLUSTER creates the read-only etcd user remote-CLUSTER (if
needed) and exports a bundle with a new certificate for it: give that to
CLUSTER, whose operator runs isthmus clustermesh connect --bundle with it.

--insecure-shared-agents exports the one credential every agent may share
(etcd user "agents", which may write everything but isthmus/remotes/), only
on a server started with --insecure-shared-agent-credential.

--kubernetes-secrets NAMESPACE (no --data-dir, no --out; before the server
first starts) keeps the cluster's PKI in Kubernetes Secrets, as the Helm
chart's hook job does: the CA Secret (--ca-secret, created if missing, never
replaced) that isthmus-clustermesh --ca-dir is seeded from, and the agents
Secret (--agents-secret: ca.crt, client.crt, client.key, etcd user "agents",
re-issued when missing, invalid or close to expiry), for a server started
with --insecure-shared-agent-credential. With the pod's service account
unless --kubeconfig.

--out - prints the JSON bundle (nothing else) on stdout.
--out FILE writes one JSON file (what connect takes); --out DIR/ (trailing
slash, or an existing directory) writes ca.crt, client.crt, client.key and
bundle.json into DIR. Bundles hold a private key: they are written readable
by the owner only.`,
		Example: `  isthmus clustermesh certs --data-dir /var/lib/isthmus-clustermesh/c1 --node n1 --out /etc/isthmus/n1/
  isthmus clustermesh certs --data-dir /var/lib/isthmus-clustermesh/c1 --for-remote c2 --out c1-for-c2.json
  isthmus clustermesh certs --kubernetes-secrets kube-system --cluster-name c1`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ks.namespace != "" {
				if dataDir != "" || out != "" || node != "" || forRemote != "" || sharedAgents {
					return errors.New("--kubernetes-secrets writes the CA and agents Secrets: drop --data-dir, --out, --node, --for-remote and --insecure-shared-agents")
				}
				return ks.run(cmd.Context(), m.out)
			}
			if dataDir == "" {
				return errors.New("certs needs --data-dir: the --data-dir of this cluster's isthmus-clustermesh (default /var/lib/isthmus-clustermesh/<cluster>)")
			}
			if out == "" {
				return errors.New("certs needs --out FILE (a JSON bundle) or --out DIR/ (ca.crt, client.crt, client.key and bundle.json)")
			}
			if n := btoi(node != "") + btoi(forRemote != "") + btoi(sharedAgents); n != 1 {
				return errors.New("certs needs one of --node NAME (a node's agent), --for-remote CLUSTER (a remote cluster's server) or --insecure-shared-agents")
			}
			d, err := etcdserver.OpenDataDir(dataDir)
			if err != nil {
				return err
			}
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			var eps []string
			if m.conn.EndpointsSet {
				eps = m.conn.Endpoints
			}
			var b etcdserver.Bundle
			switch {
			case node != "":
				b, err = meshctl.NodeBundle(ctx, d, node, eps)
			case forRemote != "":
				b, err = meshctl.RemoteBundle(ctx, d, forRemote, eps)
			default:
				b, err = d.Bundle(etcdserver.UserAgents)
			}
			if err != nil {
				return err
			}
			if out == "-" {
				// The JSON bundle alone on stdout (e.g. through kubectl exec
				// into an image without a shell).
				data, err := json.MarshalIndent(b, "", "  ")
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(m.out, "%s\n", data)
				return err
			}
			dir, err := meshctl.WriteBundle(b, out)
			if err != nil {
				return err
			}
			where := out
			if dir {
				where = strings.TrimSuffix(out, "/") + "/ (ca.crt, client.crt, client.key, " + meshctl.BundleFileInDir + ")"
			}
			switch {
			case node != "":
				fmt.Fprintf(m.out, "wrote the bundle of node %s of cluster %s (etcd user %s) to %s\n", node, b.Cluster, b.User, where)
				fmt.Fprintf(m.out, "on node %s, run: isthmus-agent --node-name %s --kvstore-endpoints %s --kvstore-bundle DIR\n", node, node, strings.Join(b.Endpoints, ","))
			case sharedAgents:
				fmt.Fprintf(m.out, "wrote the shared agents bundle of cluster %s to %s (insecure: any node holding it can rewrite every node's records)\n", b.Cluster, where)
				fmt.Fprintf(m.out, "agents use it with: isthmus-agent --kvstore-endpoints %s --kvstore-bundle DIR\n", strings.Join(b.Endpoints, ","))
			default:
				fmt.Fprintf(m.out, "wrote a bundle for cluster %s to read cluster %s (etcd user %s) to %s\n", forRemote, b.Cluster, b.User, where)
				fmt.Fprintf(m.out, "on cluster %s, run: isthmus clustermesh connect --bundle %s\n", forRemote, out)
			}
			if meshctl.LoopbackOnly(b.Endpoints) {
				fmt.Fprintf(m.out, "note: the bundle names %s, a loopback address; start isthmus-clustermesh with --advertise-client https://<reachable address>:<port>, or pass --endpoints to connect\n",
					strings.Join(b.Endpoints, ","))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data-dir", "", "the --data-dir of this cluster's isthmus-clustermesh")
	f.StringVar(&node, "node", "", "export the bundle of this node's agent (etcd user node-NAME, which writes only that node's records)")
	f.StringVar(&forRemote, "for-remote", "", "export a bundle for the server of this remote cluster (read-only etcd user remote-CLUSTER)")
	f.BoolVar(&sharedAgents, "insecure-shared-agents", false, "export the credential all agents share (etcd user agents); only on a server started with --insecure-shared-agent-credential")
	f.StringVar(&out, "out", "", "where to write: FILE (JSON), DIR/ (PEM files and bundle.json) or - (the JSON on stdout)")
	f.StringVar(&ks.namespace, "kubernetes-secrets", "", "keep the cluster's CA and the agents' shared credential in Secrets of this namespace (the Helm chart's PKI job)")
	f.StringVar(&ks.cluster, "cluster-name", "", "with --kubernetes-secrets: the cluster's name (its CA's)")
	f.StringVar(&ks.caSecret, "ca-secret", "isthmus-clustermesh-ca", "with --kubernetes-secrets: the CA Secret (ca.crt, ca.key)")
	f.StringVar(&ks.agentsSecret, "agents-secret", "isthmus-agents", "with --kubernetes-secrets: the agents Secret (ca.crt, client.crt, client.key)")
	f.StringVar(&ks.rootSecret, "root-secret", "", "with --kubernetes-secrets: also keep the cluster's root credential (etcd user root, for isthmus clustermesh connect) in this Secret")
	f.StringVar(&ks.kubeconfig, "kubeconfig", "", "with --kubernetes-secrets: kubeconfig of the cluster (default: the pod's service account)")
	_ = cmd.MarkFlagDirname("data-dir")
	return cmd
}

func (m *mesh) connectCommand() *cobra.Command {
	var name, bundle string
	var ko kubeConnect
	var endpoints []string
	var timeout, wait time.Duration
	cmd := &cobra.Command{
		Use:   "connect (--bundle FILE [--name CLUSTER] [--endpoints https://HOST:PORT] | --kubeconfig FILE --remote-kubeconfig FILE)",
		Short: "Make this cluster's server mirror a remote cluster",
		Long: `Connect a remote cluster: this cluster's server will mirror the remote's
nodes, endpoints, identities and services into this cluster's etcd, where
this cluster's agents find them.

FILE is the bundle the remote cluster exported for this one (on its server:
isthmus clustermesh certs --for-remote <this cluster>). Before anything is
written, the remote is dialled with it and its cluster config is read: a
remote that is not the cluster the bundle names, or whose cluster ID or name
is this cluster's or another connected cluster's, or whose pod CIDRs overlap,
is refused. Connecting a cluster again replaces its credentials (e.g. after
they were renewed).

The mirror is one-way: connect the other direction on the remote cluster.

Clusters installed with the Helm chart are connected both ways by one
command, with --kubeconfig and --remote-kubeconfig (admin credentials of
each): through the Kubernetes API it runs 'certs --for-remote' in each
cluster's server pod, keeps each bundle as the Secret isthmus-peer-<cluster>
(key bundle.json, the shape of the chart's mesh.peers) in the other
cluster's release namespace, and runs 'connect' with it in that cluster's
server pod, then waits (--wait, default 1m) until both mirrors are synced.
The servers must reach each other's advertised client URLs
(clustermesh.advertiseClient). Running it again renews the credentials.`,
		Example: `  isthmus clustermesh connect --bundle c2-for-c1.json
  isthmus clustermesh connect --kubeconfig c1.kubeconfig --remote-kubeconfig c2.kubeconfig
  isthmus clustermesh connect --name c2 --bundle c2-for-c1.json --endpoints https://198.51.100.2:2379 --wait 1m`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ko.kubeconfig != "" || ko.remoteKubeconfig != "" {
				if bundle != "" || len(endpoints) > 0 {
					return errors.New("with --kubeconfig the bundles come from the clusters' servers: drop --bundle and --endpoints")
				}
				ko.Timeout, ko.Wait = timeout, wait
				if ko.Wait == 0 {
					ko.Wait = time.Minute
				}
				return ko.run(cmd.Context(), m.out, name)
			}
			if bundle == "" {
				return errors.New("connect needs --bundle FILE: the bundle the remote cluster exported for this one (on its server: isthmus clustermesh certs --for-remote <this cluster>); or, for clusters installed with the Helm chart, --kubeconfig and --remote-kubeconfig")
			}
			b, err := readBundleArg(bundle, m.in)
			if err != nil {
				return fmt.Errorf("--bundle: %w", err)
			}
			if name != "" && name != b.Cluster {
				return fmt.Errorf("the bundle %s is for cluster %q, not %q", bundle, b.Cluster, name)
			}
			if eps := splitList(strings.Join(endpoints, ",")); len(eps) > 0 {
				b.Endpoints = eps
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), requestTimeout+timeout+wait)
			defer cancel()
			kv, err := m.conn.Dial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			done, err := meshctl.Connect(ctx, kv, b, timeout)
			if err != nil {
				return err
			}
			verb := "connected"
			if done.Updated {
				verb = "updated (new credentials or endpoints)"
			}
			fmt.Fprintf(m.out, "cluster %s (ID %d, pod CIDRs %s) %s: the server of %s mirrors it\n",
				done.Remote.Name, done.Config.ID, joinPrefixes(done.Config.PodCIDRs), verb, done.Local)
			if wait > 0 {
				st, err := meshctl.WaitSynced(ctx, kv, done.Remote.Name, wait)
				if err != nil {
					return err
				}
				fmt.Fprintf(m.out, "cluster %s synced: %d nodes, %d endpoints, %d identities, %d services\n",
					st.Cluster, st.Nodes, st.Endpoints, st.Identities, st.Services)
				return nil
			}
			fmt.Fprintln(m.out, "isthmus clustermesh status shows when it is synced")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&bundle, "bundle", "", "bundle exported by the remote cluster for this one: a JSON file, a directory with bundle.json, or - (the JSON on stdin)")
	f.StringVar(&ko.kubeconfig, "kubeconfig", "", "Kubernetes: kubeconfig of this cluster (Isthmus installed with the Helm chart); connects it and --remote-kubeconfig's cluster both ways")
	f.StringVar(&ko.remoteKubeconfig, "remote-kubeconfig", "", "Kubernetes: kubeconfig of the remote cluster")
	f.StringVar(&ko.namespace, "namespace", "kube-system", "Kubernetes: namespace of this cluster's Isthmus release")
	f.StringVar(&ko.remoteNamespace, "remote-namespace", "", "Kubernetes: namespace of the remote cluster's release (default: --namespace)")
	f.StringVar(&name, "name", "", "name of the remote cluster (default: the bundle's; must match it)")
	f.StringSliceVar(&endpoints, "endpoints", nil, "the remote server's client URLs, if not those in the bundle (https://host:port, comma-separated)")
	f.DurationVar(&timeout, "timeout", 10*time.Second, "how long to try to reach the remote before giving up")
	f.DurationVar(&wait, "wait", 0, "wait up to this long until the remote is mirrored (synced), or refused")
	return cmd
}

func (m *mesh) disconnectCommand() *cobra.Command {
	var name string
	var keepAccess bool
	cmd := &cobra.Command{
		Use:   "disconnect --name CLUSTER",
		Short: "Stop mirroring a remote cluster and delete its state from this cluster",
		Long: `Disconnect a remote cluster: this cluster's server stops mirroring it and
deletes everything it mirrored of it (its endpoints leave this cluster's
datapaths). Unless --keep-access is given, the remote's read access to this
cluster (etcd user remote-CLUSTER) is removed too: its mirror of this
cluster can no longer read anything, but it keeps serving its last copy
(state "unreachable") until its --cache-ttl passes or it disconnects this
cluster as well. Run disconnect on both sides.`,
		Example: `  isthmus clustermesh disconnect --name c2
  isthmus clustermesh disconnect --name c2 --keep-access`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				return errors.New("disconnect needs --name CLUSTER (isthmus clustermesh status lists the connected clusters)")
			}
			if err := records.ValidateClusterName(name); err != nil {
				return fmt.Errorf("--name: %w", err)
			}
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			kv, err := m.conn.Dial(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			if err := meshctl.Disconnect(ctx, kv, name); err != nil {
				return err
			}
			fmt.Fprintf(m.out, "cluster %s disconnected: the server deletes its mirrored state\n", name)
			if !keepAccess {
				if err := meshctl.RevokeAccess(ctx, kv, name); err != nil {
					return err
				}
				fmt.Fprintf(m.out, "cluster %s can no longer read this cluster (etcd user %s removed)\n", name, etcdserver.RemoteUser(name))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the remote cluster to disconnect")
	cmd.Flags().BoolVar(&keepAccess, "keep-access", false, "keep the remote's read access to this cluster (its etcd user remote-CLUSTER)")
	_ = cmd.RegisterFlagCompletionFunc("name", m.completeRemotes)
	return cmd
}

// completeRemotes completes --name with the connected clusters, read from
// the local etcd (nothing when it cannot be reached in time).
func (m *mesh) completeRemotes(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
	// PersistentPreRun does not run for completions.
	m.conn.EndpointsSet = cmd.Flags().Changed("kvstore-endpoints") || os.Getenv(envKVStoreEndpoints) != ""
	m.conn.DataDirRoot = dataDirRoot
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	kv, err := m.conn.Dial(ctx)
	if err != nil {
		cobra.CompDebugln(err.Error(), false)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	defer kv.Close()
	names, err := meshctl.Remotes(ctx, kv)
	if err != nil {
		cobra.CompDebugln(err.Error(), false)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	return filterPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
