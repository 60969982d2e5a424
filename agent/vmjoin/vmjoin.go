// Package vmjoin is the host side of an external workload
// (isthmus-agent --join, docs/vms.md): enrolling with a one-time token,
// keeping the credential in the state dir, and renewing the certificate
// before it expires. The agent then runs as a node of the cluster.
package vmjoin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/clustermesh/enroll"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
)

// Files under <state-dir>/vm/.
const (
	dirName        = "vm"
	enrollmentFile = "enrollment.json"
	bundleDir      = "bundle"
)

// State is what the host keeps of its enrollment (the key and certificate
// are files of the bundle directory, mode 0600).
type State struct {
	Server        string            `json:"server"`
	CAFingerprint string            `json:"caFingerprint"`
	Enrollment    enroll.Enrollment `json:"enrollment"` // Cert is in the bundle, not here
	dir           string
}

// BundleDir is the kvstore bundle of the host (ca.crt, client.crt,
// client.key), as --kvstore-bundle takes it.
func (s *State) BundleDir() string { return filepath.Join(s.dir, bundleDir) }

// Load reads the enrollment kept in stateDir; found is false when the host
// never enrolled.
func Load(stateDir string) (*State, bool, error) {
	dir := filepath.Join(stateDir, dirName)
	data, err := os.ReadFile(filepath.Join(dir, enrollmentFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	s := &State{dir: dir}
	if err := json.Unmarshal(data, s); err != nil {
		return nil, false, fmt.Errorf("%s: %w (remove %s and enroll again with a new token)", filepath.Join(dir, enrollmentFile), err, dir)
	}
	if _, err := tls.LoadX509KeyPair(filepath.Join(s.BundleDir(), meshsync.BundleCert), filepath.Join(s.BundleDir(), meshsync.BundleKey)); err != nil {
		return nil, false, fmt.Errorf("the stored credential in %s: %w (remove %s and enroll again with a new token)", s.BundleDir(), err, dir)
	}
	return s, true, nil
}

// Join enrolls the host at server with token, pinning the CA fingerprint
// fp, and stores the result in stateDir. Nothing is stored when the
// server refuses.
func Join(ctx context.Context, stateDir, server, token, fp string, nodeIPs []netip.Addr) (*State, error) {
	fp, err := enroll.NormalizeFingerprint(fp)
	if err != nil {
		return nil, err
	}
	keyPEM, csrPEM, err := enroll.NewKey()
	if err != nil {
		return nil, err
	}
	e, err := enroll.Join(ctx, server, token, fp, enroll.EnrollRequest{CSR: string(csrPEM), NodeIPs: nodeIPs})
	if err != nil {
		return nil, err
	}
	s := &State{Server: server, CAFingerprint: fp, Enrollment: *e, dir: filepath.Join(stateDir, dirName)}
	if err := s.save(keyPEM); err != nil {
		return nil, err
	}
	return s, nil
}

// save writes the bundle (key and certificate first, 0600) and then the
// enrollment, whose presence says the host is enrolled.
func (s *State) save(keyPEM []byte) error {
	if err := os.MkdirAll(s.BundleDir(), 0o700); err != nil {
		return err
	}
	e := s.Enrollment
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{meshsync.BundleCA, []byte(e.CACert), 0o644},
		{meshsync.BundleKey, keyPEM, 0o600},
		{meshsync.BundleCert, []byte(e.Cert), 0o600},
	}
	for _, f := range files {
		if err := atomicfile.Write(filepath.Join(s.BundleDir(), f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	kept := *s
	kept.Enrollment.Cert = ""
	data, err := json.MarshalIndent(kept, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(s.dir, enrollmentFile), append(data, '\n'), 0o600)
}

// CertExpiry returns the NotAfter of the stored certificate and its
// lifetime.
func (s *State) CertExpiry() (notAfter time.Time, lifetime time.Duration, err error) {
	data, err := os.ReadFile(filepath.Join(s.BundleDir(), meshsync.BundleCert))
	if err != nil {
		return time.Time{}, 0, err
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return time.Time{}, 0, errors.New("no PEM certificate")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return time.Time{}, 0, err
	}
	return c.NotAfter, c.NotAfter.Sub(c.NotBefore), nil
}

// Renew gets a new certificate (from a new key) with the current one.
// The kvstore client picks it up at its next connection
// (meshsync.LoadBundle reloads the files).
func (s *State) Renew(ctx context.Context) error {
	cert, err := tls.LoadX509KeyPair(filepath.Join(s.BundleDir(), meshsync.BundleCert), filepath.Join(s.BundleDir(), meshsync.BundleKey))
	if err != nil {
		return err
	}
	keyPEM, csrPEM, err := enroll.NewKey()
	if err != nil {
		return err
	}
	e, err := enroll.Renew(ctx, s.Server, s.Enrollment.Cluster, s.CAFingerprint, cert, csrPEM)
	if err != nil {
		return err
	}
	s.Enrollment.Cert, s.Enrollment.Expires = e.Cert, e.Expires
	return s.save(keyPEM)
}

// RenewLoop renews the certificate at two thirds of its lifetime, retrying
// every minute (at most a tenth of the lifetime) after a failure, until ctx
// ends.
func (s *State) RenewLoop(ctx context.Context, log *slog.Logger) {
	for {
		notAfter, life, err := s.CertExpiry()
		wait := time.Minute
		if err == nil {
			wait = time.Until(notAfter.Add(-life / 3))
		} else {
			log.Error("vm: cannot read the host certificate", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(wait, 0)):
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = s.Renew(rctx)
		cancel()
		if err != nil {
			log.Warn("vm: certificate renewal failed; retrying", "err", err, "expires", notAfter)
			retry := min(time.Minute, max(life/10, time.Second))
			select {
			case <-ctx.Done():
				return
			case <-time.After(retry):
			}
			continue
		}
		n, _, _ := s.CertExpiry()
		log.Info("vm: certificate renewed", "expires", n)
	}
}
