package etcdserver

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// What the enrollment of external workloads (clustermesh/enroll) needs
// from the PKI and the etcd users: a certificate per host, signed from the
// host's own key (a CSR: the private key never leaves the host), and an
// etcd user that may write only that host's records.

// CAFingerprint returns the hex SHA-256 of the CA certificate (DER): what
// an enrolling host pins.
func (s *Server) CAFingerprint() (string, error) {
	if s.pki == nil {
		return "", errors.New("clustermesh: external etcd: no CA of this server")
	}
	return Fingerprint(s.pki.caCert), nil
}

// Fingerprint is the hex SHA-256 of a certificate's DER.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// EnrollmentTLS is the TLS configuration of the enrollment endpoint: the
// server certificate with the CA appended to the chain (a host that has
// only the CA's fingerprint gets the CA from the handshake and checks it
// against the pin), and client certificates of this CA accepted but not
// required (renewal authenticates with the current certificate).
func (s *Server) EnrollmentTLS() (*tls.Config, error) {
	if s.pki == nil {
		return nil, errors.New("clustermesh: external etcd: enrollment needs the server's own CA (embedded mode)")
	}
	kp, err := s.pki.load("server")
	if err != nil {
		return nil, err
	}
	cert, err := kp.tls()
	if err != nil {
		return nil, err
	}
	cert.Certificate = append(cert.Certificate, s.pki.caCert.Raw)
	pool := x509.NewCertPool()
	pool.AddCert(s.pki.caCert)
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
		ClientAuth: tls.VerifyClientCertIfGiven, MinVersion: tls.VersionTLS12}, nil
}

// VerifyClient checks that cert was issued by this cluster's CA.
func (s *Server) VerifyClient(cert *x509.Certificate) error {
	if s.pki == nil {
		return errors.New("no CA")
	}
	pool := x509.NewCertPool()
	pool.AddCert(s.pki.caCert)
	_, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	return err
}

// IssueVMCredential makes (or keeps) the etcd user and role user of the
// external workload whose node name is node (records.EnrollmentUser), which
// may write only that node's records (VMPermissions), and signs csrPEM for
// it: common name the etcd user, spiffe the URI SAN, valid for validity. It
// returns the bundle without a key (the host has it).
func (s *Server) IssueVMCredential(ctx context.Context, node, user string, csrPEM []byte, spiffe *url.URL, validity time.Duration) (Bundle, *x509.Certificate, error) {
	if s.pki == nil {
		return Bundle{}, nil, errors.New("clustermesh: external etcd: enrollment needs the server's own CA (embedded mode)")
	}
	if err := records.ValidateNodeName(node); err != nil {
		return Bundle{}, nil, fmt.Errorf("clustermesh: node: %w", err)
	}
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return Bundle{}, nil, errors.New("no PEM certificate request")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return Bundle{}, nil, fmt.Errorf("certificate request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return Bundle{}, nil, fmt.Errorf("certificate request: %w", err)
	}
	if !records.IsEnrollmentUser(user, node) {
		return Bundle{}, nil, fmt.Errorf("clustermesh: %q is not an enrollment user of node %s", user, node)
	}
	if err := s.kv.EnsureRole(ctx, user, VMPermissions(s.cfg.ClusterName, node)...); err != nil {
		return Bundle{}, nil, fmt.Errorf("clustermesh: create role %s: %w", user, err)
	}
	if err := s.kv.EnsureUser(ctx, user, "", user); err != nil {
		return Bundle{}, nil, fmt.Errorf("clustermesh: create user %s: %w", user, err)
	}
	serial, err := newSerial()
	if err != nil {
		return Bundle{}, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: user, Organization: []string{"isthmus"}},
		// Backdated for clock skew, but by little of a short validity:
		// the host renews at two thirds of NotAfter-NotBefore.
		NotBefore:   now.Add(-min(5*time.Minute, validity/4)),
		NotAfter:    now.Add(validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{spiffe},
	}
	if tmpl.NotAfter.After(s.pki.caCert.NotAfter) {
		tmpl.NotAfter = s.pki.caCert.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.pki.caCert, csr.PublicKey, s.pki.caKey)
	if err != nil {
		return Bundle{}, nil, fmt.Errorf("clustermesh: sign the certificate of %s: %w", node, err)
	}
	cert, _ := x509.ParseCertificate(der)
	b := newBundle(s.Info(), s.pki, user, keyPair{cert: cert, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})})
	return b, cert, nil
}

// VMPermissions are what an external workload's own credential may do:
// read what a node reads (everything under isthmus/ except
// isthmus/remotes/), and write only its node record, its ipcache entries
// and identities (its own is allocated from its labels like a pod's).
// Unlike a node it may not change the applied objects.
func VMPermissions(cluster, node string) []kvstore.Permission {
	nodeKey := records.NodeKey(cluster, node)
	return []kvstore.Permission{
		{Prefix: records.Root, End: RemotesPrefix},
		{Prefix: prefixEnd(RemotesPrefix), End: prefixEnd(records.Root)},
		{Prefix: nodeKey, End: nodeKey + "\x00", Write: true},
		{Prefix: records.NodeIPCachePrefix(cluster, node), Write: true},
		{Prefix: records.StatePrefix(records.KindIdentities), Write: true},
	}
}
