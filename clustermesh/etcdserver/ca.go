package etcdserver

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
)

// CA is a cluster's certificate authority as PEM, kept outside the
// server's data dir: in a secret store from which the server is seeded
// (Config.CADir), so that losing the data dir (an emptyDir in Kubernetes)
// does not invalidate the credentials issued from it. The Helm chart's PKI
// job creates it (`isthmus clustermesh certs --bootstrap-secrets`).
type CA struct {
	Cert []byte // PEM
	Key  []byte // PEM, secret
}

// CA file names in Config.CADir (and in <DataDir>/pki).
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// NewCA creates a CA for cluster, as a server does on its first start.
func NewCA(cluster string) (CA, error) {
	kp, err := newCAKeyPair(cluster)
	if err != nil {
		return CA{}, err
	}
	return CA{Cert: kp.certPEM, Key: kp.keyPEM}, nil
}

// pki parses the CA and checks it is cluster's.
func (ca CA) pki(cluster string) (*pki, error) {
	p := &pki{}
	kp, err := parseKeyPair(ca.Cert, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}
	if !kp.cert.IsCA {
		return nil, errors.New("CA: the certificate is not a CA certificate")
	}
	if cn := kp.cert.Subject.CommonName; cn != caCommonName(cluster) {
		return nil, fmt.Errorf("CA: the certificate %q is not the CA of cluster %q (%q)", cn, cluster, caCommonName(cluster))
	}
	if p.caKey, err = parseKey(kp.keyPEM); err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}
	p.caCert, p.caPEM = kp.cert, kp.certPEM
	return p, nil
}

// IssueClient issues a client certificate for the etcd user (e.g.
// UserAgents) of cluster, and returns the certificate and key as PEM.
func (ca CA) IssueClient(cluster, user string) (cert, key []byte, err error) {
	p, err := ca.pki(cluster)
	if err != nil {
		return nil, nil, err
	}
	kp, err := p.issue(user, false, sans{})
	if err != nil {
		return nil, nil, err
	}
	return kp.certPEM, kp.keyPEM, nil
}

// ClientUsable reports whether cert and key are a client certificate of
// user issued by ca that is not close to expiry (a server would keep it).
func (ca CA) ClientUsable(cluster, user string, cert, key []byte) bool {
	p, err := ca.pki(cluster)
	if err != nil {
		return false
	}
	kp, err := parseKeyPair(cert, key)
	return err == nil && p.usable(kp, user, false, sans{})
}

// ReadCA reads CACertFile and CAKeyFile from dir.
func ReadCA(dir string) (CA, error) {
	cert, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return CA{}, err
	}
	key, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return CA{}, err
	}
	return CA{Cert: cert, Key: key}, nil
}

func parseKeyPair(certPEM, keyPEM []byte) (keyPair, error) {
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return keyPair{}, err
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		return keyPair{}, errors.New("no PEM certificate")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return keyPair{}, err
	}
	return keyPair{cert: cert, certPEM: certPEM, keyPEM: keyPEM}, nil
}

// seedCA puts the CA of dir (Config.CADir) into pkiDir, where openPKI finds
// it. A pkiDir that has another CA is an error: its certificates (and the
// agents trusting it) would silently be replaced.
func seedCA(dir, pkiDir, cluster string) error {
	ca, err := ReadCA(dir)
	if err != nil {
		return fmt.Errorf("clustermesh: CA dir: %w", err)
	}
	if _, err := ca.pki(cluster); err != nil {
		return fmt.Errorf("clustermesh: CA dir %s: %w", dir, err)
	}
	if err := os.MkdirAll(pkiDir, 0o700); err != nil {
		return fmt.Errorf("clustermesh: %w", err)
	}
	have, err := os.ReadFile(filepath.Join(pkiDir, CACertFile))
	switch {
	case err == nil && bytes.Equal(have, ca.Cert):
		return nil
	case err == nil:
		return fmt.Errorf("clustermesh: the data dir's CA (%s) is not the one in the CA dir %s: remove the data dir's pki/ to take the new CA (every credential issued from the old one stops working)",
			filepath.Join(pkiDir, CACertFile), dir)
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("clustermesh: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(pkiDir, CAKeyFile), ca.Key, 0o600); err != nil {
		return fmt.Errorf("clustermesh: %w", err)
	}
	return atomicfile.Write(filepath.Join(pkiDir, CACertFile), ca.Cert, 0o644)
}
