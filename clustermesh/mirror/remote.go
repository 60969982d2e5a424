package mirror

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// RemoteVersion is the version of Remote records this build writes and
// reads.
const RemoteVersion = 1

// maxEndpoints bounds the endpoints of a remote record.
const maxEndpoints = 16

// Remote is the record isthmus/remotes/<cluster> in the local etcd: how
// this cluster's server reaches a remote cluster's server. It is a
// etcdserver.Bundle issued by the remote cluster for the etcd user
// remote-<local>, plus a version.
type Remote struct {
	Version   int    `json:"version"`
	Name      string `json:"name"`
	ClusterID uint32 `json:"clusterID"`
	// Endpoints are the remote server's client URLs (https://host:port).
	Endpoints []string `json:"endpoints"`
	// CACert is the remote cluster's CA (PEM); Cert and Key (PEM) are the
	// client certificate of the read-only user remote-<local>.
	CACert string `json:"caCert"`
	Cert   string `json:"cert"`
	Key    string `json:"key"`
}

// RemoteFromBundle turns a bundle that a remote cluster exported for this
// one (`isthmus clustermesh certs --for-remote <local>`) into a record.
func RemoteFromBundle(b etcdserver.Bundle) Remote {
	return Remote{
		Version: RemoteVersion, Name: b.Cluster, ClusterID: b.ClusterID,
		Endpoints: append([]string(nil), b.Endpoints...),
		CACert:    string(b.CACert), Cert: string(b.Cert), Key: string(b.Key),
	}
}

// bundle returns the record as a etcdserver.Bundle.
func (r Remote) bundle(local string) etcdserver.Bundle {
	return etcdserver.Bundle{
		Cluster: r.Name, ClusterID: r.ClusterID, Endpoints: r.Endpoints,
		User: etcdserver.RemoteUser(local), CACert: []byte(r.CACert), Cert: []byte(r.Cert), Key: []byte(r.Key),
	}
}

// KVConfig returns a kvstore configuration that reaches the remote with
// the record's credentials (TLS server name <cluster>.mesh.isthmus.io).
func (r Remote) KVConfig(local string) (kvstore.Config, error) {
	return r.bundle(local).KVConfig()
}

// Validate checks the record of a remote of cluster local: a valid name
// other than local, a valid ID, https endpoints, a CA, and a client
// certificate of that CA for the user remote-<local> that is valid now.
func (r Remote) Validate(local string) error {
	if r.Version != RemoteVersion {
		return fmt.Errorf("remote record: version %d not supported (this build reads %d)", r.Version, RemoteVersion)
	}
	if err := records.ValidateClusterName(r.Name); err != nil {
		return fmt.Errorf("remote record: %w", err)
	}
	if r.Name == local {
		return fmt.Errorf("remote record: cluster %q is this cluster", r.Name)
	}
	if err := records.ValidateClusterID(r.ClusterID); err != nil {
		return fmt.Errorf("remote record %s: %w", r.Name, err)
	}
	if len(r.Endpoints) == 0 || len(r.Endpoints) > maxEndpoints {
		return fmt.Errorf("remote record %s: want 1-%d endpoints, got %d", r.Name, maxEndpoints, len(r.Endpoints))
	}
	for _, ep := range r.Endpoints {
		if err := ValidateEndpoint(ep); err != nil {
			return fmt.Errorf("remote record %s: %w", r.Name, err)
		}
	}
	return r.checkCerts(local, time.Now())
}

// ValidateEndpoint checks an etcd client URL: https://host:port, nothing
// else.
func ValidateEndpoint(ep string) error {
	u, err := url.Parse(ep)
	if err != nil {
		return fmt.Errorf("endpoint %q: %v", ep, err)
	}
	if u.Scheme != "https" || u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("endpoint %q: want https://host:port", ep)
	}
	if _, port, err := net.SplitHostPort(u.Host); err != nil || port == "" {
		return fmt.Errorf("endpoint %q: want https://host:port (with a port)", ep)
	}
	return nil
}

func (r Remote) checkCerts(local string, now time.Time) error {
	pool := x509.NewCertPool()
	rest := []byte(r.CACert)
	n := 0
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		ca, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return fmt.Errorf("remote record %s: CA certificate: %w", r.Name, err)
		}
		if !ca.IsCA {
			return fmt.Errorf("remote record %s: caCert %q is not a CA certificate", r.Name, ca.Subject.CommonName)
		}
		pool.AddCert(ca)
		n++
	}
	if n == 0 {
		return fmt.Errorf("remote record %s: no CA certificate in caCert", r.Name)
	}
	pair, err := tls.X509KeyPair([]byte(r.Cert), []byte(r.Key))
	if err != nil {
		return fmt.Errorf("remote record %s: client certificate and key: %w", r.Name, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Errorf("remote record %s: client certificate: %w", r.Name, err)
	}
	if want := etcdserver.RemoteUser(local); leaf.Subject.CommonName != want {
		return fmt.Errorf("remote record %s: the client certificate is for etcd user %q, not %q: make the bundle on cluster %s's server with `isthmus clustermesh certs --for-remote %s`",
			r.Name, leaf.Subject.CommonName, want, r.Name, local)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("remote record %s: client certificate does not verify against its CA: %w", r.Name, err)
	}
	return nil
}

// Marshal validates the record (for a remote of cluster local) and
// encodes it.
func (r Remote) Marshal(local string) ([]byte, error) {
	r.Version = RemoteVersion
	if err := r.Validate(local); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// DecodeRemote decodes the record read at key strictly (unknown fields,
// trailing data, a name other than the key's are errors) and validates it
// for a remote of cluster local.
func DecodeRemote(key string, value []byte, local string) (Remote, error) {
	name, err := ParseRemoteKey(key)
	if err != nil {
		return Remote{}, err
	}
	if len(value) > records.MaxRecordSize {
		return Remote{}, fmt.Errorf("%s: %d bytes, more than %d", key, len(value), records.MaxRecordSize)
	}
	var r Remote
	if err := strictjson.Decode(value, &r); err != nil {
		return Remote{}, fmt.Errorf("%s: %w", key, err)
	}
	if r.Name != name {
		return Remote{}, fmt.Errorf("%s: record names cluster %q", key, r.Name)
	}
	if err := r.Validate(local); err != nil {
		return Remote{}, fmt.Errorf("%s: %w", key, err)
	}
	return r, nil
}

// ParseRemoteKey returns the cluster of isthmus/remotes/<cluster>.
func ParseRemoteKey(key string) (string, error) {
	name, ok := strings.CutPrefix(key, etcdserver.RemotesPrefix)
	if !ok {
		return "", fmt.Errorf("key %q is not under %s", key, etcdserver.RemotesPrefix)
	}
	if err := records.ValidateClusterName(name); err != nil {
		return "", fmt.Errorf("key %q: %w", key, err)
	}
	return name, nil
}

// equal reports whether two records are the same.
func (r Remote) equal(o Remote) bool {
	if r.Version != o.Version || r.Name != o.Name || r.ClusterID != o.ClusterID ||
		r.CACert != o.CACert || r.Cert != o.Cert || r.Key != o.Key || len(r.Endpoints) != len(o.Endpoints) {
		return false
	}
	for i := range r.Endpoints {
		if r.Endpoints[i] != o.Endpoints[i] {
			return false
		}
	}
	return true
}

var errNoConfig = errors.New("no cluster config")
