package etcdserver

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// MeshDomain is the DNS suffix of server certificates. Every server
// certificate carries *.mesh.isthmus.io, and clients verify the name
// <cluster>.mesh.isthmus.io whatever address they dial, so a server can be
// reached through NAT, node ports or load balancers without re-issuing.
const MeshDomain = "mesh.isthmus.io"

// ServerName returns the TLS server name clients verify for cluster.
func ServerName(cluster string) string { return cluster + "." + MeshDomain }

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 365 * 24 * time.Hour
	// renewBefore: a server or client certificate closer than this to
	// expiry is re-issued at start (from the same CA, so nothing else has
	// to change for the server's own certificate).
	renewBefore = 30 * 24 * time.Hour
)

// pki is the cluster's certificate authority and the certificates the
// server keeps on disk.
type pki struct {
	dir    string
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caPEM  []byte
}

// keyPair is a certificate and key, parsed and as PEM.
type keyPair struct {
	cert    *x509.Certificate
	certPEM []byte
	keyPEM  []byte
}

func (kp keyPair) tls() (tls.Certificate, error) { return tls.X509KeyPair(kp.certPEM, kp.keyPEM) }

// openPKI loads the CA from dir, creating it on first use. A half-present
// CA (certificate without key or the reverse) is an error: silently making
// a new one would lock out every agent that trusts the old one.
func openPKI(dir, cluster string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	p := &pki{dir: dir}
	kp, err := p.load("ca")
	switch {
	case errors.Is(err, fs.ErrNotExist):
		kp, err = p.createCA(cluster)
		if err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	if !kp.cert.IsCA {
		return nil, fmt.Errorf("pki: %s is not a CA certificate", filepath.Join(dir, "ca.crt"))
	}
	// Checked before anything is issued from it: a data dir reused for
	// another cluster must not get certificates of the new name.
	if cn := kp.cert.Subject.CommonName; cn != caCommonName(cluster) {
		return nil, fmt.Errorf("pki: the CA in %s was created for cluster %q, not %q",
			dir, strings.TrimSuffix(strings.TrimPrefix(cn, "isthmus "), " CA"), cluster)
	}
	key, err := parseKey(kp.keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: %s: %w", filepath.Join(dir, "ca.key"), err)
	}
	p.caCert, p.caKey, p.caPEM = kp.cert, key, kp.certPEM
	return p, nil
}

func caCommonName(cluster string) string { return "isthmus " + cluster + " CA" }

func (p *pki) paths(name string) (string, string) {
	return filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
}

// load reads name.crt and name.key; fs.ErrNotExist only if both are missing.
func (p *pki) load(name string) (keyPair, error) {
	certPath, keyPath := p.paths(name)
	certPEM, errC := os.ReadFile(certPath)
	keyPEM, errK := os.ReadFile(keyPath)
	switch {
	case errors.Is(errC, fs.ErrNotExist) && errors.Is(errK, fs.ErrNotExist):
		return keyPair{}, fs.ErrNotExist
	// %v, not %w: half a key pair must not look like "not created yet".
	case errC != nil:
		return keyPair{}, fmt.Errorf("pki: %v (but its key %s exists; restore the certificate or remove both)", errC, keyPath)
	case errK != nil:
		return keyPair{}, fmt.Errorf("pki: %v (but its certificate %s exists; restore the key or remove both)", errK, certPath)
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return keyPair{}, fmt.Errorf("pki: %s and %s do not form a key pair: %w", certPath, keyPath, err)
	}
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %s: %w", certPath, err)
	}
	return keyPair{cert: cert, certPEM: certPEM, keyPEM: keyPEM}, nil
}

func (p *pki) save(name string, kp keyPair) error {
	certPath, keyPath := p.paths(name)
	if err := atomicfile.Write(keyPath, kp.keyPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := atomicfile.Write(certPath, kp.certPEM, 0o644); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

func parseKey(keyPEM []byte) (*ecdsa.PrivateKey, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, errors.New("no PEM key")
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	return key, nil
}

func newSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func (p *pki) createCA(cluster string) (keyPair, error) {
	kp, err := newCAKeyPair(cluster)
	if err != nil {
		return keyPair{}, err
	}
	return kp, p.save("ca", kp)
}

func newCAKeyPair(cluster string) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: caCommonName(cluster), Organization: []string{"isthmus"}},
		NotBefore:             now.Add(-time.Hour), // tolerate clock skew
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: create CA: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %w", err)
	}
	cert, _ := x509.ParseCertificate(der)
	return keyPair{cert: cert, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM: keyPEM}, nil
}

// sans are the names a server certificate must carry.
type sans struct {
	dns []string
	ips []net.IP
}

// issue signs a new leaf certificate. Client certificates carry the etcd
// user name as common name; server certificates are also client
// certificates because etcd peers dial each other with them.
func (p *pki) issue(commonName string, server bool, names sans) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: commonName, Organization: []string{"isthmus"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(leafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if tmpl.NotAfter.After(p.caCert.NotAfter) {
		tmpl.NotAfter = p.caCert.NotAfter // never outlive the CA
	}
	if server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		tmpl.DNSNames, tmpl.IPAddresses = names.dns, names.ips
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: issue %s: %w", commonName, err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return keyPair{}, fmt.Errorf("pki: %w", err)
	}
	cert, _ := x509.ParseCertificate(der)
	return keyPair{cert: cert, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM: keyPEM}, nil
}

// ensure returns the stored certificate name, issuing (and storing) a new
// one when it is missing, not signed by this CA, close to expiry, or (for
// a server certificate) lacking one of the required names.
func (p *pki) ensure(name, commonName string, server bool, names sans) (keyPair, error) {
	kp, err := p.load(name)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return keyPair{}, err
	}
	if err == nil && p.usable(kp, commonName, server, names) {
		return kp, nil
	}
	kp, err = p.issue(commonName, server, names)
	if err != nil {
		return keyPair{}, err
	}
	return kp, p.save(name, kp)
}

func (p *pki) usable(kp keyPair, commonName string, server bool, names sans) bool {
	if kp.cert.Subject.CommonName != commonName || time.Until(kp.cert.NotAfter) < renewBefore {
		return false
	}
	if kp.cert.CheckSignatureFrom(p.caCert) != nil {
		return false
	}
	if !server {
		return true
	}
	for _, d := range names.dns {
		if !slices.Contains(kp.cert.DNSNames, d) {
			return false
		}
	}
	for _, ip := range names.ips {
		if !slices.ContainsFunc(kp.cert.IPAddresses, ip.Equal) {
			return false
		}
	}
	return true
}
