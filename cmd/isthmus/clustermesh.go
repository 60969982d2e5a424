package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Environment variables of the clustermesh verbs.
const (
	envKVStoreEndpoints = "ISTHMUS_KVSTORE_ENDPOINTS"
	envKVStoreBundle    = "ISTHMUS_KVSTORE_BUNDLE"
)

// defaultKVStoreEndpoint is where the clustermesh verbs look for the
// cluster's etcd without flag or environment: the server on this host.
const defaultKVStoreEndpoint = "https://127.0.0.1:2379"

// bundleFileInDir is the JSON bundle `certs --out DIR/` writes next to the
// PEM files, so that a directory can be passed to `connect --bundle` too.
const bundleFileInDir = "bundle.json"

// mesh holds what the clustermesh verbs share: how to reach the local
// cluster's etcd as root.
type mesh struct {
	*cli
	endpoints    []string
	endpointsSet bool // by flag or environment
	bundle       string
}

// quietLog drops the kvstore's log lines: its errors come back as returned
// errors, which the CLI prints.
var quietLog = slog.New(slog.DiscardHandler)

func (c *cli) clustermeshCommand() *cobra.Command {
	m := &mesh{cli: c}
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
		defaultEndpoints = []string{defaultKVStoreEndpoint}
	}
	pf.StringSliceVar(&m.endpoints, "kvstore-endpoints", defaultEndpoints, "etcd client URLs of this cluster's isthmus-clustermesh (env "+envKVStoreEndpoints+")")
	pf.StringVar(&m.bundle, "kvstore-bundle", os.Getenv(envKVStoreBundle), "directory with the cluster's root bundle: ca.crt, client.crt, client.key (env "+envKVStoreBundle+"; on the server host <data-dir>/pki/bundles/root; default: that of the one server under "+etcdserver.DefaultDataDirRoot+", if there is exactly one)")
	_ = cmd.MarkPersistentFlagDirname("kvstore-bundle")
	cmd.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		m.endpointsSet = cmd.Flags().Changed("kvstore-endpoints") || os.Getenv(envKVStoreEndpoints) != ""
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

// dataDirRoot is where local() looks for a server's data dir when no
// bundle is given (a variable for tests).
var dataDirRoot = etcdserver.DefaultDataDirRoot

// local connects to the local cluster's etcd as root. Without a bundle, on
// a host that runs exactly one isthmus-clustermesh with the default data
// dir root, it uses that server's root bundle and address.
func (m *mesh) local(ctx context.Context) (*kvstore.Client, error) {
	if m.bundle == "" {
		infos, _ := filepath.Glob(filepath.Join(dataDirRoot, "*", etcdserver.InfoFile))
		if len(infos) != 1 {
			return nil, fmt.Errorf("the clustermesh verbs need the cluster's root bundle: --kvstore-bundle DIR or %s (on the server host: <data-dir>/pki/bundles/root)", envKVStoreBundle)
		}
		d, err := etcdserver.OpenDataDir(filepath.Dir(infos[0]))
		if err != nil {
			return nil, err
		}
		m.bundle = filepath.Join(filepath.Dir(infos[0]), "pki", "bundles", etcdserver.UserRoot)
		if !m.endpointsSet && d.Info().LocalURL != "" {
			m.endpoints = []string{d.Info().LocalURL}
		}
	}
	tc, err := loadBundleDir(m.bundle)
	if err != nil {
		return nil, err
	}
	kv, err := kvstore.Connect(ctx, kvstore.Config{Endpoints: m.endpoints, TLS: tc, DialTimeout: 5 * time.Second,
		RequestTimeout: 10 * time.Second, MaxRetries: 2, Logger: quietLog})
	if err != nil {
		return nil, fmt.Errorf("cannot reach this cluster's etcd at %s: %w (is isthmus-clustermesh running? --kvstore-endpoints or %s)",
			strings.Join(m.endpoints, ","), err, envKVStoreEndpoints)
	}
	return kv, nil
}

// loadBundleDir reads ca.crt, client.crt and client.key.
func loadBundleDir(dir string) (*tls.Config, error) {
	ca, err := os.ReadFile(filepath.Join(dir, etcdserver.BundleCAFile))
	if err != nil {
		return nil, fmt.Errorf("--kvstore-bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("--kvstore-bundle: no PEM certificate in %s", filepath.Join(dir, etcdserver.BundleCAFile))
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, etcdserver.BundleCertFile), filepath.Join(dir, etcdserver.BundleKeyFile))
	if err != nil {
		return nil, fmt.Errorf("--kvstore-bundle: %w", err)
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// localCluster reads what the local server says about itself, and its
// cluster config.
func localCluster(ctx context.Context, kv *kvstore.Client) (etcdserver.Info, records.ClusterConfig, error) {
	got, found, err := kv.Get(ctx, etcdserver.InfoKey)
	if err != nil {
		return etcdserver.Info{}, records.ClusterConfig{}, err
	}
	if !found {
		return etcdserver.Info{}, records.ClusterConfig{}, fmt.Errorf("this etcd has no %s: is it run by isthmus-clustermesh (of this version)?", etcdserver.InfoKey)
	}
	in, err := etcdserver.DecodeInfo(got.Value)
	if err != nil {
		return etcdserver.Info{}, records.ClusterConfig{}, err
	}
	got, found, err = kv.Get(ctx, records.ClusterConfigKey(in.Cluster))
	if err != nil {
		return etcdserver.Info{}, records.ClusterConfig{}, err
	}
	if !found {
		return in, in.ClusterConfig(), nil
	}
	cfg, err := records.ValidateClusterConfig(got.Key, got.Value, in.Cluster, in.ClusterID)
	if err != nil {
		return etcdserver.Info{}, records.ClusterConfig{}, err
	}
	return in, cfg, nil
}

func (m *mesh) certsCommand() *cobra.Command {
	var dataDir, forRemote, out string
	cmd := &cobra.Command{
		Use:   "certs --data-dir DIR [--for-remote CLUSTER] --out FILE|DIR/",
		Short: "Export the bundle for this cluster's agents, or for a remote cluster's server",
		Long: `Export credentials of this cluster's etcd. Run it on the server host: it reads
the server's --data-dir.

Without --for-remote it exports the bundle of the cluster's agents (etcd user
"agents"), for isthmus-agent --kvstore-bundle. With --for-remote CLUSTER it
creates the read-only etcd user remote-CLUSTER (if needed) and exports a
bundle with a new certificate for it: give that to CLUSTER, whose operator
runs isthmus clustermesh connect --bundle with it.

--out FILE writes one JSON file (what connect takes); --out DIR/ (trailing
slash, or an existing directory) writes ca.crt, client.crt, client.key and
bundle.json into DIR. Bundles hold a private key: they are written readable
by the owner only.`,
		Example: `  isthmus clustermesh certs --data-dir /var/lib/isthmus-clustermesh/c1 --out /etc/isthmus/agents/
  isthmus clustermesh certs --data-dir /var/lib/isthmus-clustermesh/c1 --for-remote c2 --out c1-for-c2.json`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dataDir == "" {
				return errors.New("certs needs --data-dir: the --data-dir of this cluster's isthmus-clustermesh (default /var/lib/isthmus-clustermesh/<cluster>)")
			}
			if out == "" {
				return errors.New("certs needs --out FILE (a JSON bundle) or --out DIR/ (ca.crt, client.crt, client.key and bundle.json)")
			}
			d, err := etcdserver.OpenDataDir(dataDir)
			if err != nil {
				return err
			}
			ctx, cancel := m.ctx(cmd)
			defer cancel()
			var b etcdserver.Bundle
			if forRemote == "" {
				b, err = d.Bundle(etcdserver.UserAgents)
			} else {
				b, err = m.remoteBundle(ctx, cmd, d, forRemote)
			}
			if err != nil {
				return err
			}
			dir, err := writeBundle(b, out)
			if err != nil {
				return err
			}
			where := out
			if dir {
				where = strings.TrimSuffix(out, "/") + "/ (ca.crt, client.crt, client.key, " + bundleFileInDir + ")"
			}
			if forRemote == "" {
				fmt.Fprintf(m.out, "wrote the agents bundle of cluster %s to %s\n", b.Cluster, where)
				fmt.Fprintf(m.out, "agents use it with: isthmus-agent --kvstore-endpoints %s --kvstore-bundle DIR\n", strings.Join(b.Endpoints, ","))
			} else {
				fmt.Fprintf(m.out, "wrote a bundle for cluster %s to read cluster %s (etcd user %s) to %s\n", forRemote, b.Cluster, b.User, where)
				fmt.Fprintf(m.out, "on cluster %s, run: isthmus clustermesh connect --bundle %s\n", forRemote, out)
			}
			if loopbackOnly(b.Endpoints) {
				fmt.Fprintf(m.out, "note: the bundle names %s, a loopback address; start isthmus-clustermesh with --advertise-client https://<reachable address>:<port>, or pass --endpoints to connect\n",
					strings.Join(b.Endpoints, ","))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data-dir", "", "the --data-dir of this cluster's isthmus-clustermesh")
	f.StringVar(&forRemote, "for-remote", "", "export a bundle for the server of this remote cluster (read-only etcd user remote-CLUSTER)")
	f.StringVar(&out, "out", "", "where to write: FILE (JSON) or DIR/ (PEM files and bundle.json)")
	_ = cmd.MarkFlagDirname("data-dir")
	return cmd
}

// remoteBundle creates the remote user through the server's root client
// (at --kvstore-endpoints when given, else the address the server
// recorded in its data dir).
func (m *mesh) remoteBundle(ctx context.Context, cmd *cobra.Command, d *etcdserver.DataDir, remote string) (etcdserver.Bundle, error) {
	kc, err := d.RootKVConfig()
	if err != nil {
		return etcdserver.Bundle{}, err
	}
	if m.endpointsSet {
		kc.Endpoints = m.endpoints
	}
	kc.DialTimeout, kc.MaxRetries, kc.Logger = 5*time.Second, 2, quietLog
	root, err := kvstore.Connect(ctx, kc)
	if err != nil {
		return etcdserver.Bundle{}, fmt.Errorf("cannot reach the etcd of cluster %s at %s to create the user %s: %w (is isthmus-clustermesh running? --kvstore-endpoints)",
			d.Info().Cluster, strings.Join(kc.Endpoints, ","), etcdserver.RemoteUser(remote), err)
	}
	defer root.Close()
	return d.RemoteBundle(ctx, root, remote)
}

// writeBundle writes b to out: a directory when out ends with "/" or is
// one, else a JSON file.
func writeBundle(b etcdserver.Bundle, out string) (dir bool, err error) {
	if fi, err := os.Stat(out); (err == nil && fi.IsDir()) || strings.HasSuffix(out, "/") {
		if err := b.WriteDir(out); err != nil {
			return true, err
		}
		return true, b.WriteFile(filepath.Join(out, bundleFileInDir))
	}
	return false, b.WriteFile(out)
}

// readBundle reads a JSON bundle, or the bundle.json of a directory.
func readBundle(path string) (etcdserver.Bundle, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		path = filepath.Join(path, bundleFileInDir)
	}
	return etcdserver.ReadBundle(path)
}

func loopbackOnly(endpoints []string) bool {
	for _, ep := range endpoints {
		u, err := url.Parse(ep)
		if err != nil {
			return false
		}
		host := u.Hostname()
		if a, err := netip.ParseAddr(host); (err != nil || !a.IsLoopback()) && host != "localhost" {
			return false
		}
	}
	return len(endpoints) > 0
}

func (m *mesh) connectCommand() *cobra.Command {
	var name, bundle string
	var endpoints []string
	var timeout, wait time.Duration
	cmd := &cobra.Command{
		Use:   "connect --bundle FILE [--name CLUSTER] [--endpoints https://HOST:PORT]",
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

The mirror is one-way: connect the other direction on the remote cluster.`,
		Example: `  isthmus clustermesh connect --bundle c2-for-c1.json
  isthmus clustermesh connect --name c2 --bundle c2-for-c1.json --endpoints https://198.51.100.2:2379 --wait 1m`,
		Args: withUsage(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if bundle == "" {
				return errors.New("connect needs --bundle FILE: the bundle the remote cluster exported for this one (on its server: isthmus clustermesh certs --for-remote <this cluster>)")
			}
			b, err := readBundle(bundle)
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
			kv, err := m.local(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			info, localCfg, err := localCluster(ctx, kv)
			if err != nil {
				return err
			}
			rec := mirror.RemoteFromBundle(b)
			if err := rec.Validate(info.Cluster); err != nil {
				return err
			}
			remoteCfg, err := dialRemote(ctx, rec, info.Cluster, timeout)
			if err != nil {
				return err
			}
			if err := checkConflicts(ctx, kv, localCfg, remoteCfg); err != nil {
				return fmt.Errorf("refusing to connect cluster %s: %w (nothing was changed)", rec.Name, err)
			}
			value, err := rec.Marshal(info.Cluster)
			if err != nil {
				return err
			}
			_, existed, err := kv.Get(ctx, etcdserver.RemoteKey(rec.Name))
			if err != nil {
				return err
			}
			if err := kv.Put(ctx, etcdserver.RemoteKey(rec.Name), value); err != nil {
				return err
			}
			verb := "connected"
			if existed {
				verb = "updated (new credentials or endpoints)"
			}
			fmt.Fprintf(m.out, "cluster %s (ID %d, pod CIDRs %s) %s: the server of %s mirrors it\n",
				rec.Name, remoteCfg.ID, joinPrefixes(remoteCfg.PodCIDRs), verb, info.Cluster)
			if wait > 0 {
				return m.waitSynced(ctx, kv, rec.Name, wait)
			}
			fmt.Fprintln(m.out, "isthmus clustermesh status shows when it is synced")
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&bundle, "bundle", "", "bundle exported by the remote cluster for this one: a JSON file, or a directory with bundle.json")
	f.StringVar(&name, "name", "", "name of the remote cluster (default: the bundle's; must match it)")
	f.StringSliceVar(&endpoints, "endpoints", nil, "the remote server's client URLs, if not those in the bundle (https://host:port, comma-separated)")
	f.DurationVar(&timeout, "timeout", 10*time.Second, "how long to try to reach the remote before giving up")
	f.DurationVar(&wait, "wait", 0, "wait up to this long until the remote is mirrored (synced), or refused")
	return cmd
}

// dialRemote reaches the remote with its record's credentials and returns
// its cluster config, checked against the record.
func dialRemote(ctx context.Context, rec mirror.Remote, local string, timeout time.Duration) (records.ClusterConfig, error) {
	kc, err := rec.KVConfig(local)
	if err != nil {
		return records.ClusterConfig{}, err
	}
	kc.DialTimeout, kc.RequestTimeout, kc.MaxRetries, kc.Logger = timeout, timeout, 1, quietLog
	cli, err := kvstore.Connect(ctx, kc)
	if err != nil {
		return records.ClusterConfig{}, fmt.Errorf("cannot reach cluster %s at %s: %w\n(check that its isthmus-clustermesh runs and is reachable from this cluster's server; --endpoints overrides the bundle's addresses; the bundle must come from %s's server: isthmus clustermesh certs --for-remote %s)",
			rec.Name, strings.Join(rec.Endpoints, ","), err, rec.Name, local)
	}
	defer cli.Close()
	key := records.ClusterConfigKey(rec.Name)
	got, found, err := cli.Get(ctx, key)
	if err != nil {
		return records.ClusterConfig{}, fmt.Errorf("read the cluster config of %s: %w", rec.Name, err)
	}
	if !found {
		return records.ClusterConfig{}, fmt.Errorf("%s at %s has no %s: is that the isthmus-clustermesh server of cluster %s?", rec.Name, strings.Join(rec.Endpoints, ","), key, rec.Name)
	}
	cfg, err := records.ValidateClusterConfig(got.Key, got.Value, rec.Name, rec.ClusterID)
	if err != nil {
		return records.ClusterConfig{}, fmt.Errorf("refusing to connect cluster %s: it is not the cluster the bundle names: %w", rec.Name, err)
	}
	return cfg, nil
}

// checkConflicts refuses a remote that conflicts with this cluster or with
// another connected one (whose config is the mirrored copy, or what its
// record says while there is none).
func checkConflicts(ctx context.Context, kv *kvstore.Client, local, remote records.ClusterConfig) error {
	if err := records.CheckClusterConflicts(local, remote); err != nil {
		return fmt.Errorf("it conflicts with this cluster: %w", err)
	}
	recs, _, err := kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
	if err != nil {
		return err
	}
	for _, r := range recs {
		other, err := mirror.DecodeRemote(r.Key, r.Value, local.Name)
		if err != nil || other.Name == remote.Name {
			continue
		}
		cfg := records.ClusterConfig{Name: other.Name, ID: other.ClusterID}
		if got, found, err := kv.Get(ctx, records.ClusterConfigKey(other.Name)); err == nil && found {
			if c, err := records.ValidateClusterConfig(got.Key, got.Value, other.Name, other.ClusterID); err == nil {
				cfg = c
			}
		}
		if err := records.CheckClusterConflicts(cfg, remote); err != nil {
			return fmt.Errorf("it conflicts with connected cluster %s: %w", other.Name, err)
		}
	}
	return nil
}

// waitSynced polls the mirror's status of name until it is ready or
// refused.
func (m *mesh) waitSynced(ctx context.Context, kv *kvstore.Client, name string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	var last mirror.Status
	for {
		if got, found, err := kv.Get(ctx, etcdserver.RemoteStatusKey(name)); err == nil && found {
			if st, err := mirror.DecodeStatus(got.Value); err == nil {
				last = st
				switch {
				case st.Ready && st.Connected:
					fmt.Fprintf(m.out, "cluster %s synced: %d nodes, %d endpoints, %d identities, %d services\n",
						name, st.Nodes, st.Endpoints, st.Identities, st.Services)
					return nil
				case st.State == mirror.StateRefused || st.State == mirror.StateInvalid:
					return fmt.Errorf("the server refused cluster %s: %s", name, st.LastError)
				}
			}
		}
		if time.Now().After(deadline) {
			msg := "no status yet (is isthmus-clustermesh running?)"
			if last.Cluster != "" {
				msg = string(last.State)
				if last.LastError != "" {
					msg += ": " + last.LastError
				}
			}
			return fmt.Errorf("cluster %s not synced after %s: %s", name, wait, msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
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
			kv, err := m.local(ctx)
			if err != nil {
				return err
			}
			defer kv.Close()
			_, found, err := kv.Get(ctx, etcdserver.RemoteKey(name))
			if err != nil {
				return err
			}
			if !found {
				return fmt.Errorf("cluster %s is not connected (isthmus clustermesh status lists the connected clusters)", name)
			}
			if err := kv.Delete(ctx, etcdserver.RemoteKey(name)); err != nil {
				return err
			}
			fmt.Fprintf(m.out, "cluster %s disconnected: the server deletes its mirrored state\n", name)
			if !keepAccess {
				if err := kv.DeleteUser(ctx, etcdserver.RemoteUser(name)); err != nil {
					return fmt.Errorf("remove the read access of %s (etcd user %s): %w", name, etcdserver.RemoteUser(name), err)
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
	m.endpointsSet = cmd.Flags().Changed("kvstore-endpoints") || os.Getenv(envKVStoreEndpoints) != ""
	ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
	defer cancel()
	kv, err := m.local(ctx)
	if err != nil {
		cobra.CompDebugln(err.Error(), false)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	defer kv.Close()
	recs, _, err := kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
	if err != nil {
		cobra.CompDebugln(err.Error(), false)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []cobra.Completion
	for _, r := range recs {
		if name, err := mirror.ParseRemoteKey(r.Key); err == nil {
			names = append(names, name)
		}
	}
	return filterPrefix(names, toComplete), cobra.ShellCompDirectiveNoFileComp
}

// MeshStatus is what `isthmus clustermesh status` shows.
type MeshStatus struct {
	Cluster   string         `json:"cluster"`
	ClusterID uint32         `json:"clusterID"`
	PodCIDRs  []netip.Prefix `json:"podCIDRs,omitempty"`
	Endpoints []string       `json:"endpoints"`
	// Heartbeat is the server's last heartbeat: statuses are only as
	// fresh as it.
	Heartbeat time.Time       `json:"heartbeat,omitzero"`
	Remotes   []mirror.Status `json:"remotes"`
}

// heartbeatStale: older than this, the server is probably not running.
const heartbeatStale = 30 * time.Second

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
			status := func(ctx context.Context) (MeshStatus, error) {
				kv, err := m.local(ctx)
				if err != nil {
					return MeshStatus{}, err
				}
				defer kv.Close()
				return readMeshStatus(ctx, kv)
			}
			return show(m.cli, cmd, format, status, m.printMeshStatus)
		},
	}
	addOutputFlag(cmd, &format)
	return cmd
}

func readMeshStatus(ctx context.Context, kv *kvstore.Client) (MeshStatus, error) {
	info, cfg, err := localCluster(ctx, kv)
	if err != nil {
		return MeshStatus{}, err
	}
	st := MeshStatus{Cluster: info.Cluster, ClusterID: info.ClusterID, PodCIDRs: cfg.PodCIDRs, Endpoints: info.Endpoints, Remotes: []mirror.Status{}}
	if got, found, err := kv.Get(ctx, records.HeartbeatKey(info.Cluster)); err == nil && found {
		if stamp, err := records.DecodeStamp(got.Value); err == nil {
			st.Heartbeat = stamp.Time
		}
	}
	statuses, _, err := kv.GetPrefix(ctx, etcdserver.RemoteStatusPrefix)
	if err != nil {
		return MeshStatus{}, err
	}
	byName := map[string]mirror.Status{}
	for _, s := range statuses {
		if rs, err := mirror.DecodeStatus(s.Value); err == nil {
			byName[rs.Cluster] = rs
		}
	}
	recs, _, err := kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
	if err != nil {
		return MeshStatus{}, err
	}
	for _, r := range recs {
		name, err := mirror.ParseRemoteKey(r.Key)
		if err != nil {
			continue
		}
		rs, ok := byName[name]
		if !ok {
			// Connected a moment ago, or the server is not running.
			rs = mirror.Status{Cluster: name, State: mirror.StateConnecting}
			if rec, err := mirror.DecodeRemote(r.Key, r.Value, info.Cluster); err == nil {
				rs.ClusterID, rs.KVStoreEndpoints = rec.ClusterID, rec.Endpoints
			}
		}
		st.Remotes = append(st.Remotes, rs)
	}
	slices.SortFunc(st.Remotes, func(a, b mirror.Status) int { return strings.Compare(a.Cluster, b.Cluster) })
	return st, nil
}

func (m *mesh) printMeshStatus(st MeshStatus) error {
	t := newTable(m.out)
	fmt.Fprintf(t, "Cluster:\t%s (ID %d), pod CIDRs %s\n", st.Cluster, st.ClusterID, orNone(joinPrefixes(st.PodCIDRs)))
	hb := "none (is isthmus-clustermesh running?)"
	if !st.Heartbeat.IsZero() {
		age := time.Since(st.Heartbeat).Round(time.Second)
		hb = fmt.Sprintf("%s ago", age)
		if age > heartbeatStale {
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
