package etcdserver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// InfoFile is the name of the server's Info in its data dir.
const InfoFile = "cluster.json"

// DefaultDataDirRoot holds the data dirs of isthmus-clustermesh by
// default: <root>/<cluster>.
const DefaultDataDirRoot = "/var/lib/isthmus-clustermesh"

// DataDir is the data directory of an embedded-mode server, opened by
// another process on the same host (the CLI's `clustermesh certs`) while
// the server may be running. It reads the PKI and issues certificates but
// never creates a CA or rewrites the server's files.
type DataDir struct {
	dir  string
	info Info
	pki  *pki
}

// OpenDataDir opens dir, the --data-dir of an isthmus-clustermesh that has
// started at least once.
func OpenDataDir(dir string) (*DataDir, error) {
	data, err := os.ReadFile(filepath.Join(dir, InfoFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s has no %s: is it the --data-dir of an isthmus-clustermesh server that has started at least once?", dir, InfoFile)
	}
	if err != nil {
		return nil, err
	}
	in, err := DecodeInfo(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, InfoFile), err)
	}
	pkiDir := filepath.Join(dir, "pki")
	if _, err := os.Stat(filepath.Join(pkiDir, "ca.crt")); err != nil {
		return nil, fmt.Errorf("%s has no CA (%v): is the server in external-etcd mode? Its credentials are managed by whoever runs that etcd", dir, err)
	}
	p, err := openPKI(pkiDir, in.Cluster)
	if err != nil {
		return nil, err
	}
	return &DataDir{dir: dir, info: in, pki: p}, nil
}

// Info returns what the server wrote about itself at its last start.
func (d *DataDir) Info() Info { return d.info }

// Bundle returns the stored bundle of user (UserAgents or UserRoot).
func (d *DataDir) Bundle(user string) (Bundle, error) {
	if user != UserAgents && user != UserRoot {
		return Bundle{}, fmt.Errorf("clustermesh: no stored bundle for user %q (want %s or %s)", user, UserAgents, UserRoot)
	}
	if user == UserAgents {
		// The server writes this directory only while the shared
		// credential is on; without it the etcd user does not exist.
		if _, err := os.Stat(filepath.Join(d.dir, "pki", "bundles", UserAgents)); err != nil {
			return Bundle{}, errors.New("clustermesh: the server runs without --insecure-shared-agent-credential: export each node's own bundle (certs --node NAME)")
		}
	}
	kp, err := d.pki.load(user)
	if err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: %w", err)
	}
	return newBundle(d.info, d.pki, user, kp), nil
}

// RootKVConfig returns a kvstore configuration that reaches the server's
// etcd from this host as root.
func (d *DataDir) RootKVConfig() (kvstore.Config, error) {
	b, err := d.Bundle(UserRoot)
	if err != nil {
		return kvstore.Config{}, err
	}
	if d.info.LocalURL != "" {
		b.Endpoints = []string{d.info.LocalURL}
	}
	return b.KVConfig()
}

// NodeBundle does what Server.ExportNodeBundle does, for a running
// server: it creates the user node-<node> through root (a root client of
// this cluster's etcd, e.g. from RootKVConfig) and issues a certificate
// for it.
func (d *DataDir) NodeBundle(ctx context.Context, root *kvstore.Client, node string) (Bundle, error) {
	return exportNodeBundle(ctx, root, d.pki, d.info, node)
}

// RemoveNode does what Server.RemoveNode does, through root.
func (d *DataDir) RemoveNode(ctx context.Context, root *kvstore.Client, node string) error {
	return removeNode(ctx, root, node)
}

// RemoteBundle does what Server.ExportRemoteBundle does, for a running
// server: it creates the read-only user remote-<remote> through root (a
// root client of this cluster's etcd, e.g. from RootKVConfig) and issues
// a certificate for it.
func (d *DataDir) RemoteBundle(ctx context.Context, root *kvstore.Client, remote string) (Bundle, error) {
	if err := records.ValidateClusterName(remote); err != nil {
		return Bundle{}, fmt.Errorf("clustermesh: remote cluster: %w", err)
	}
	if remote == d.info.Cluster {
		return Bundle{}, fmt.Errorf("clustermesh: remote cluster %q is this cluster", remote)
	}
	return exportRemoteBundle(ctx, root, d.pki, d.info, remote)
}
