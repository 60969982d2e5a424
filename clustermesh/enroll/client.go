package enroll

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
)

// NewKey returns a fresh P-256 key (PEM) and a CSR for it (PEM).
func NewKey() (keyPEM, csrPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "isthmus-vm"}}, key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}), nil
}

// NormalizeFingerprint accepts hex with or without colons, any case,
// optionally prefixed "sha256:".
func NormalizeFingerprint(fp string) (string, error) {
	fp = strings.ToLower(strings.TrimSpace(fp))
	fp = strings.TrimPrefix(fp, "sha256:")
	fp = strings.ReplaceAll(fp, ":", "")
	if b, err := hex.DecodeString(fp); err != nil || len(b) != sha256.Size {
		return "", errors.New("CA fingerprint: want the hex SHA-256 of the CA certificate (64 hex digits), as isthmus vm token create prints it")
	}
	return fp, nil
}

// pinnedTLS trusts exactly the CA whose fingerprint is fp, which the
// server sends at the end of its chain; the server certificate must be
// signed by it for <cluster>.mesh.isthmus.io.
func pinnedTLS(fp, cluster string, client *tls.Certificate) *tls.Config {
	c := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The chain is verified below, against the pinned CA only.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			var ca *x509.Certificate
			for _, c := range cs.PeerCertificates {
				if c.IsCA && etcdserver.Fingerprint(c) == fp {
					ca = c
				}
			}
			if ca == nil {
				return errors.New("the server's CA does not match the pinned fingerprint (--ca-fingerprint): wrong server, or a man in the middle")
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			roots := x509.NewCertPool()
			roots.AddCert(ca)
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, DNSName: etcdserver.ServerName(cluster)})
			if err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			return nil
		},
	}
	if client != nil {
		c.Certificates = []tls.Certificate{*client}
	}
	return c
}

// Join enrolls this host at server (https://host:port) with token,
// trusting only the CA of fingerprint fp.
func Join(ctx context.Context, server, token, fp string, req EnrollRequest) (*Enrollment, error) {
	fp, err := NormalizeFingerprint(fp)
	if err != nil {
		return nil, err
	}
	cluster, _, err := ParseToken(token)
	if err != nil {
		return nil, err
	}
	req.Token = token
	var e Enrollment
	if err := post(ctx, pinnedTLS(fp, cluster, nil), server, "/v1/enroll", req, &e); err != nil {
		return nil, err
	}
	return &e, nil
}

// Renew asks server for a new certificate, authenticating with the current
// one (cert), trusting only the CA of fingerprint fp.
func Renew(ctx context.Context, server, cluster, fp string, cert tls.Certificate, csrPEM []byte) (*Enrollment, error) {
	var e Enrollment
	if err := post(ctx, pinnedTLS(fp, cluster, &cert), server, "/v1/renew", RenewRequest{CSR: string(csrPEM)}, &e); err != nil {
		return nil, err
	}
	return &e, nil
}

func post(ctx context.Context, tc *tls.Config, server, path string, body, out any) error {
	u, err := url.Parse(server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("enrollment server %q: want https://host:port", server)
	}
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{TLSClientConfig: tc, Proxy: nil}}
	defer hc.CloseIdleConnections()
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(server, "/")+path, bytes.NewReader(data))
	if err != nil {
		return err
	}
	r.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(r)
	if err != nil {
		return fmt.Errorf("enrollment server %s: %w", server, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e Error
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("enrollment refused (%s): %s", resp.Status, e.Error)
		}
		return fmt.Errorf("enrollment server %s: %s", server, resp.Status)
	}
	return json.Unmarshal(b, out)
}
