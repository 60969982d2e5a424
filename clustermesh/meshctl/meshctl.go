// Package meshctl holds the operations `isthmus clustermesh` performs
// against a cluster's etcd as its root user: finding and dialling the local
// etcd (Conn), exporting and reading bundles, connecting a remote cluster
// (dial it with its bundle, check its config, refuse conflicts, write its
// record, wait until the mirror has synced it), disconnecting it and
// revoking its access, and reading the mesh status the server writes. The
// CLI (cmd/isthmus) wires flags to these and prints what they return.
package meshctl

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
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/mirror"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Environment variables of the clustermesh verbs (named in errors).
const (
	EnvEndpoints = "ISTHMUS_KVSTORE_ENDPOINTS"
	EnvBundle    = "ISTHMUS_KVSTORE_BUNDLE"
)

// DefaultEndpoint is where the clustermesh verbs look for the cluster's
// etcd without flag or environment: the server on this host.
const DefaultEndpoint = "https://127.0.0.1:2379"

// BundleFileInDir is the JSON bundle WriteBundle writes next to the PEM
// files of a directory, so that a directory can be read as a bundle too.
const BundleFileInDir = "bundle.json"

// quietLog drops the kvstore's log lines: its errors come back as returned
// errors, which the CLI prints.
var quietLog = slog.New(slog.DiscardHandler)

// Conn says how to reach the local cluster's etcd as root.
type Conn struct {
	Endpoints []string
	// EndpointsSet: Endpoints were given (flag or environment), so the
	// address a found server recorded does not replace them.
	EndpointsSet bool
	// Bundle is the directory with the root bundle (ca.crt, client.crt,
	// client.key). Empty: the root bundle of the one server under
	// DataDirRoot, if there is exactly one.
	Bundle string
	// DataDirRoot is where servers' data dirs are looked for (default
	// etcdserver.DefaultDataDirRoot).
	DataDirRoot string
}

// Dial connects to the local cluster's etcd as root. Without a bundle, on a
// host that runs exactly one isthmus-clustermesh under DataDirRoot, it uses
// that server's root bundle and address (and remembers them in c).
func (c *Conn) Dial(ctx context.Context) (*kvstore.Client, error) {
	if c.Bundle == "" {
		root := c.DataDirRoot
		if root == "" {
			root = etcdserver.DefaultDataDirRoot
		}
		infos, _ := filepath.Glob(filepath.Join(root, "*", etcdserver.InfoFile))
		if len(infos) != 1 {
			return nil, fmt.Errorf("the clustermesh verbs need the cluster's root bundle: --kvstore-bundle DIR or %s (on the server host: <data-dir>/pki/bundles/root)", EnvBundle)
		}
		d, err := etcdserver.OpenDataDir(filepath.Dir(infos[0]))
		if err != nil {
			return nil, err
		}
		c.Bundle = filepath.Join(filepath.Dir(infos[0]), "pki", "bundles", etcdserver.UserRoot)
		if !c.EndpointsSet && d.Info().LocalURL != "" {
			c.Endpoints = []string{d.Info().LocalURL}
		}
	}
	tc, err := LoadBundleDir(c.Bundle)
	if err != nil {
		return nil, err
	}
	kv, err := kvstore.Connect(ctx, kvstore.Config{Endpoints: c.Endpoints, TLS: tc, DialTimeout: 5 * time.Second,
		RequestTimeout: 10 * time.Second, MaxRetries: 2, Logger: quietLog})
	if err != nil {
		return nil, fmt.Errorf("cannot reach this cluster's etcd at %s: %w (is isthmus-clustermesh running? --kvstore-endpoints or %s)",
			strings.Join(c.Endpoints, ","), err, EnvEndpoints)
	}
	return kv, nil
}

// LoadBundleDir reads ca.crt, client.crt and client.key.
func LoadBundleDir(dir string) (*tls.Config, error) {
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

// LocalCluster reads what the local server says about itself, and its
// cluster config.
func LocalCluster(ctx context.Context, kv *kvstore.Client) (etcdserver.Info, records.ClusterConfig, error) {
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

// RemoteBundle creates the read-only etcd user of remote (if needed) and
// returns a bundle with a new certificate for it, through the server's root
// client: at endpoints when given, else the address the server recorded in
// its data dir.
func RemoteBundle(ctx context.Context, d *etcdserver.DataDir, remote string, endpoints []string) (etcdserver.Bundle, error) {
	root, err := dialRoot(ctx, d, endpoints, etcdserver.RemoteUser(remote))
	if err != nil {
		return etcdserver.Bundle{}, err
	}
	defer root.Close()
	return d.RemoteBundle(ctx, root, remote)
}

// NodeBundle creates the etcd user of one node of the cluster (if needed),
// which may write only that node's records, and returns a bundle with a
// new certificate for it: that node's isthmus-agent --kvstore-bundle.
func NodeBundle(ctx context.Context, d *etcdserver.DataDir, node string, endpoints []string) (etcdserver.Bundle, error) {
	if err := records.ValidateNodeName(node); err != nil {
		return etcdserver.Bundle{}, fmt.Errorf("--node: %w", err)
	}
	root, err := dialRoot(ctx, d, endpoints, etcdserver.NodeUser(node))
	if err != nil {
		return etcdserver.Bundle{}, err
	}
	defer root.Close()
	return d.NodeBundle(ctx, root, node)
}

// dialRoot connects to the cluster's etcd as root, to create user: at
// endpoints when given, else the address the server recorded in its data
// dir.
func dialRoot(ctx context.Context, d *etcdserver.DataDir, endpoints []string, user string) (*kvstore.Client, error) {
	kc, err := d.RootKVConfig()
	if err != nil {
		return nil, err
	}
	if len(endpoints) > 0 {
		kc.Endpoints = endpoints
	}
	kc.DialTimeout, kc.MaxRetries, kc.Logger = 5*time.Second, 2, quietLog
	root, err := kvstore.Connect(ctx, kc)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the etcd of cluster %s at %s to create the user %s: %w (is isthmus-clustermesh running? --kvstore-endpoints)",
			d.Info().Cluster, strings.Join(kc.Endpoints, ","), user, err)
	}
	return root, nil
}

// WriteBundle writes b to out: a directory (the PEM files and
// BundleFileInDir) when out ends with "/" or is one, else a JSON file.
func WriteBundle(b etcdserver.Bundle, out string) (dir bool, err error) {
	if fi, err := os.Stat(out); (err == nil && fi.IsDir()) || strings.HasSuffix(out, "/") {
		if err := b.WriteDir(out); err != nil {
			return true, err
		}
		return true, b.WriteFile(filepath.Join(out, BundleFileInDir))
	}
	return false, b.WriteFile(out)
}

// ReadBundle reads a JSON bundle, or the BundleFileInDir of a directory.
func ReadBundle(path string) (etcdserver.Bundle, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		path = filepath.Join(path, BundleFileInDir)
	}
	return etcdserver.ReadBundle(path)
}

// LoopbackOnly reports whether every endpoint is a loopback address (a
// bundle naming them is of no use to another host).
func LoopbackOnly(endpoints []string) bool {
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

// Connected is what Connect did.
type Connected struct {
	Local   string                // this cluster
	Remote  mirror.Remote         // the record written
	Config  records.ClusterConfig // the remote's cluster config, as read from it
	Updated bool                  // it was connected before (new credentials or endpoints)
}

// Connect makes the local server mirror the cluster of bundle b: it dials
// the remote with b's credentials (for at most timeout), reads and checks
// its cluster config, refuses a remote that conflicts with this cluster or
// another connected one, and only then writes the remote's record.
func Connect(ctx context.Context, kv *kvstore.Client, b etcdserver.Bundle, timeout time.Duration) (Connected, error) {
	info, localCfg, err := LocalCluster(ctx, kv)
	if err != nil {
		return Connected{}, err
	}
	rec := mirror.RemoteFromBundle(b)
	if err := rec.Validate(info.Cluster); err != nil {
		return Connected{}, err
	}
	remoteCfg, err := DialRemote(ctx, rec, info.Cluster, timeout)
	if err != nil {
		return Connected{}, err
	}
	if err := CheckConflicts(ctx, kv, localCfg, remoteCfg); err != nil {
		return Connected{}, fmt.Errorf("refusing to connect cluster %s: %w (nothing was changed)", rec.Name, err)
	}
	value, err := rec.Marshal(info.Cluster)
	if err != nil {
		return Connected{}, err
	}
	_, existed, err := kv.Get(ctx, etcdserver.RemoteKey(rec.Name))
	if err != nil {
		return Connected{}, err
	}
	if err := kv.Put(ctx, etcdserver.RemoteKey(rec.Name), value); err != nil {
		return Connected{}, err
	}
	return Connected{Local: info.Cluster, Remote: rec, Config: remoteCfg, Updated: existed}, nil
}

// DialRemote reaches the remote with its record's credentials and returns
// its cluster config, checked against the record.
func DialRemote(ctx context.Context, rec mirror.Remote, local string, timeout time.Duration) (records.ClusterConfig, error) {
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

// CheckConflicts refuses a remote that conflicts with this cluster or with
// another connected one (whose config is the mirrored copy, or what its
// record says while there is none).
func CheckConflicts(ctx context.Context, kv *kvstore.Client, local, remote records.ClusterConfig) error {
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

// WaitSynced polls the mirror's status of name until it is ready (and
// returns it) or refused, for at most wait.
func WaitSynced(ctx context.Context, kv *kvstore.Client, name string, wait time.Duration) (mirror.Status, error) {
	deadline := time.Now().Add(wait)
	var last mirror.Status
	for {
		if got, found, err := kv.Get(ctx, etcdserver.RemoteStatusKey(name)); err == nil && found {
			if st, err := mirror.DecodeStatus(got.Value); err == nil {
				last = st
				switch {
				case st.Ready && st.Connected:
					return st, nil
				case st.State == mirror.StateRefused || st.State == mirror.StateInvalid:
					return st, fmt.Errorf("the server refused cluster %s: %s", name, st.LastError)
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
			return last, fmt.Errorf("cluster %s not synced after %s: %s", name, wait, msg)
		}
		select {
		case <-ctx.Done():
			return last, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ErrNotConnected: Disconnect of a cluster that has no record.
var ErrNotConnected = errors.New("not connected")

// Disconnect deletes the record of the remote cluster name: the server
// stops mirroring it and deletes what it mirrored of it.
func Disconnect(ctx context.Context, kv *kvstore.Client, name string) error {
	if err := records.ValidateClusterName(name); err != nil {
		return err
	}
	_, found, err := kv.Get(ctx, etcdserver.RemoteKey(name))
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("cluster %s is %w (isthmus clustermesh status lists the connected clusters)", name, ErrNotConnected)
	}
	return kv.Delete(ctx, etcdserver.RemoteKey(name))
}

// RevokeAccess removes the remote's read access to this cluster (its etcd
// user remote-<name>).
func RevokeAccess(ctx context.Context, kv *kvstore.Client, name string) error {
	if err := kv.DeleteUser(ctx, etcdserver.RemoteUser(name)); err != nil {
		return fmt.Errorf("remove the read access of %s (etcd user %s): %w", name, etcdserver.RemoteUser(name), err)
	}
	return nil
}

// Remotes lists the names of the connected clusters (their records).
func Remotes(ctx context.Context, kv *kvstore.Client) ([]string, error) {
	recs, _, err := kv.GetPrefix(ctx, etcdserver.RemotesPrefix)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, r := range recs {
		if name, err := mirror.ParseRemoteKey(r.Key); err == nil {
			names = append(names, name)
		}
	}
	return names, nil
}
