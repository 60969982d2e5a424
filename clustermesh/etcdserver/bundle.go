package etcdserver

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"os"
	"path/filepath"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Bundle is everything a client needs to reach a cluster's etcd: where,
// which CA to trust, and a client certificate whose common name is its
// etcd user. It is what `isthmus clustermesh certs` hands to agents and to
// remote clusters.
type Bundle struct {
	Cluster   string   `json:"cluster"`
	ClusterID uint32   `json:"clusterID"`
	Endpoints []string `json:"endpoints"`
	User      string   `json:"user"`
	CACert    []byte   `json:"caCert"` // PEM
	Cert      []byte   `json:"cert"`   // PEM
	Key       []byte   `json:"key"`    // PEM, secret
}

// TLSConfig returns the client TLS configuration: the bundle's CA as the
// only root, its certificate, and ServerName <cluster>.mesh.isthmus.io so
// that any address of the server verifies.
func (b Bundle) TLSConfig() (*tls.Config, error) {
	cert, err := tls.X509KeyPair(b.Cert, b.Key)
	if err != nil {
		return nil, fmt.Errorf("bundle for cluster %q: client certificate: %w", b.Cluster, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b.CACert) {
		return nil, fmt.Errorf("bundle for cluster %q: no CA certificate in PEM", b.Cluster)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   ServerName(b.Cluster),
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// KVConfig returns a kvstore configuration that connects with the bundle.
func (b Bundle) KVConfig() (kvstore.Config, error) {
	tc, err := b.TLSConfig()
	if err != nil {
		return kvstore.Config{}, err
	}
	return kvstore.Config{Endpoints: append([]string(nil), b.Endpoints...), TLS: tc}, nil
}

// Validate checks that the bundle is complete and usable.
func (b Bundle) Validate() error {
	if err := records.ValidateClusterName(b.Cluster); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	if err := records.ValidateClusterID(b.ClusterID); err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	if len(b.Endpoints) == 0 {
		return errors.New("bundle: no endpoints")
	}
	_, err := b.TLSConfig()
	return err
}

// WriteFile stores the bundle as JSON, readable by the owner only (it
// holds a private key).
func (b Bundle) WriteFile(path string) error {
	data, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(data, '\n'), 0o600)
}

// Files of a bundle directory (docs/internal-contracts.md): what agents
// and the CLI load with --kvstore-bundle DIR.
const (
	BundleCAFile   = "ca.crt"
	BundleCertFile = "client.crt"
	BundleKeyFile  = "client.key"
)

// WriteDir stores the bundle as a directory of PEM files: ca.crt,
// client.crt and client.key (the key readable by the owner only).
func (b Bundle) WriteDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{BundleKeyFile, b.Key, 0o600},
		{BundleCertFile, b.Cert, 0o644},
		{BundleCAFile, b.CACert, 0o644},
	} {
		if err := atomicfile.Write(filepath.Join(dir, f.name), f.data, f.perm); err != nil {
			return fmt.Errorf("bundle %s: %w", dir, err)
		}
	}
	return nil
}

// ReadBundle reads and validates a bundle written by WriteFile.
func ReadBundle(path string) (Bundle, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Bundle{}, err
	}
	return ParseBundle(path, data)
}

// ParseBundle decodes and validates a JSON bundle; name says where it came
// from, for the error.
func ParseBundle(name string, data []byte) (Bundle, error) {
	var b Bundle
	if err := json.Unmarshal(data, &b); err != nil {
		return Bundle{}, fmt.Errorf("bundle %s: %w", name, err)
	}
	if err := b.Validate(); err != nil {
		return Bundle{}, fmt.Errorf("bundle %s: %w", name, err)
	}
	return b, nil
}
