package lab

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// An external etcd cluster for a lab cluster (ClusterOptions.ExternalEtcd):
// Debian's etcd-server (/usr/bin/etcd, etcd 3.4), one real process per
// member, each member in its own small namespace "<cluster>-etcd<k>" on the
// cluster's bridge at 10.(100+i).0.(1+k) (hosts 2..8: below the nodes' .11+).
//
// Mutual TLS on client and peer ports with a CA the lab generates. etcd auth
// is on, with users by client certificate common name, as the server's
// embedded etcd has them: "root" (role root; isthmus-clustermesh's
// --etcd-cert and the CLI's clustermesh verbs) and "agents" (read-write on
// isthmus/ except isthmus/remotes/). Their bundles are written to
// <dir>/bundles/{root,agents}/{ca.crt,client.crt,client.key}.

// EtcdBinary and EtcdctlBinary are Debian's etcd-server and etcd-client.
var (
	EtcdBinary    = "/usr/bin/etcd"
	EtcdctlBinary = "/usr/bin/etcdctl"
)

// maxEtcdMembers keeps member addresses below the nodes' (.11 and up).
const maxEtcdMembers = 7

// EtcdCluster is an external etcd cluster run by the lab.
type EtcdCluster struct {
	Dir     string // certificates and bundles
	CAFile  string
	Members []*EtcdMember
	cluster *Cluster
}

// EtcdMember is one etcd process.
type EtcdMember struct {
	Name      string // "m<k>"
	Node      *Node  // its namespace
	IP        netip.Addr
	DataDir   string
	ClientURL string
	PeerURL   string
	Proc      *Proc
	certFile  string
	keyFile   string
}

// BundleDir returns the bundle directory (ca.crt, client.crt, client.key)
// of user "root" or "agents".
func (e *EtcdCluster) BundleDir(user string) string { return filepath.Join(e.Dir, "bundles", user) }

// Endpoints returns every member's client URL.
func (e *EtcdCluster) Endpoints() []string {
	var out []string
	for _, m := range e.Members {
		out = append(out, m.ClientURL)
	}
	return out
}

// Running returns the members whose process has not exited.
func (e *EtcdCluster) Running() []*EtcdMember {
	var out []*EtcdMember
	for _, m := range e.Members {
		if m.Proc != nil && !m.Proc.Exited() {
			out = append(out, m)
		}
	}
	return out
}

// Kill sends SIGKILL to the member's process and waits for it to exit.
func (m *EtcdMember) Kill() error { return m.Proc.Kill() }

// Ctl runs etcdctl as root (by certificate) in the cluster router's
// namespace against members (all running members when none are given).
func (e *EtcdCluster) Ctl(ctx context.Context, members []*EtcdMember, args ...string) ([]byte, error) {
	if len(members) == 0 {
		members = e.Running()
	}
	var eps []string
	for _, m := range members {
		eps = append(eps, m.ClientURL)
	}
	b := e.BundleDir("root")
	full := append([]string{EtcdctlBinary, "--endpoints", strings.Join(eps, ","),
		"--cacert", filepath.Join(b, "ca.crt"), "--cert", filepath.Join(b, "client.crt"), "--key", filepath.Join(b, "client.key"),
		"--dial-timeout", "3s", "--command-timeout", "10s"}, args...)
	cmd := e.cluster.Router.Command(ctx, full...)
	cmd.Env = append(cmd.Env, "ETCDCTL_API=3")
	out, err := CombinedOutput(cmd)
	if err != nil {
		return out, fmt.Errorf("etcdctl %s (members %s): %v: %s", strings.Join(args, " "), strings.Join(eps, ","), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Leader returns the member that currently leads, as the running members
// see it.
func (e *EtcdCluster) Leader(ctx context.Context) (*EtcdMember, error) {
	out, err := e.Ctl(ctx, nil, "endpoint", "status", "-w", "json")
	if err != nil {
		return nil, err
	}
	var sts []struct {
		Endpoint string `json:"Endpoint"`
		Status   struct {
			Header struct {
				MemberID uint64 `json:"member_id"`
			} `json:"header"`
			Leader uint64 `json:"leader"`
		} `json:"Status"`
	}
	if err := json.Unmarshal(out, &sts); err != nil {
		return nil, fmt.Errorf("etcdctl endpoint status: %w: %s", err, out)
	}
	for _, st := range sts {
		if st.Status.Leader != 0 && st.Status.Leader == st.Status.Header.MemberID {
			for _, m := range e.Members {
				if m.ClientURL == st.Endpoint {
					return m, nil
				}
			}
		}
	}
	return nil, fmt.Errorf("no member leads: %s", out)
}

// MoveLeader hands the leadership to member to (etcdctl move-leader).
func (e *EtcdCluster) MoveLeader(ctx context.Context, to *EtcdMember) error {
	leader, err := e.Leader(ctx)
	if err != nil || leader == to {
		return err
	}
	out, err := e.Ctl(ctx, nil, "member", "list", "-w", "json")
	if err != nil {
		return err
	}
	var ml struct {
		Members []struct {
			ID   uint64 `json:"ID"`
			Name string `json:"name"`
		} `json:"members"`
	}
	if err := json.Unmarshal(out, &ml); err != nil {
		return fmt.Errorf("etcdctl member list: %w: %s", err, out)
	}
	for _, m := range ml.Members {
		if m.Name == to.Name {
			_, err := e.Ctl(ctx, []*EtcdMember{leader}, "move-leader", strconv.FormatUint(m.ID, 16))
			return err
		}
	}
	return fmt.Errorf("etcd member %s not in the member list: %s", to.Name, out)
}

// startEtcd builds and starts an n-member external etcd cluster on c's
// bridge, turns auth on, and writes the bundles.
func (c *Cluster) startEtcd(ctx context.Context, n int) (*EtcdCluster, error) {
	if n < 1 || n > maxEtcdMembers {
		return nil, fmt.Errorf("lab: ExternalEtcd %d: want 1..%d members", n, maxEtcdMembers)
	}
	for _, b := range []string{EtcdBinary, EtcdctlBinary} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("lab: external etcd needs %s (Debian's etcd-server and etcd-client; run `make deps`): %w", b, err)
		}
	}
	e := &EtcdCluster{Dir: filepath.Join(c.lab.dir, c.Name+"-etcd"), cluster: c}
	if err := os.MkdirAll(e.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	for k := 1; k <= n; k++ {
		ip := c.underlay4(1 + k)
		e.Members = append(e.Members, &EtcdMember{
			Name:      fmt.Sprintf("m%d", k),
			IP:        ip,
			ClientURL: "https://" + ip.String() + ":2379",
			PeerURL:   "https://" + ip.String() + ":2380",
		})
	}
	if err := e.writePKI(); err != nil {
		return nil, err
	}
	var initial []string
	for _, m := range e.Members {
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for k, m := range e.Members {
		node, err := c.lab.AddNode(fmt.Sprintf("%s-etcd%d", c.Name, k+1))
		if err != nil {
			return nil, err
		}
		m.Node = node
		m.DataDir = filepath.Join(node.Dir(), "data")
		if err := c.attachToBridge(node, fmt.Sprintf("e%d", k+1), netip.PrefixFrom(m.IP, 24)); err != nil {
			return nil, err
		}
		if err := node.AddRoute(netip.Prefix{}, c.underlay4(1)); err != nil {
			return nil, err
		}
		args := []string{EtcdBinary,
			"--name", m.Name,
			"--data-dir", m.DataDir,
			"--listen-client-urls", m.ClientURL,
			"--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.PeerURL,
			"--initial-advertise-peer-urls", m.PeerURL,
			"--initial-cluster", strings.Join(initial, ","),
			"--initial-cluster-token", c.lab.prefix + "-" + c.Name,
			"--initial-cluster-state", "new",
			"--client-cert-auth", "--trusted-ca-file", e.CAFile, "--cert-file", m.certFile, "--key-file", m.keyFile,
			"--peer-client-cert-auth", "--peer-trusted-ca-file", e.CAFile, "--peer-cert-file", m.certFile, "--peer-key-file", m.keyFile,
			"--logger", "zap", "--log-outputs", "stderr",
		}
		if m.Proc, err = node.Start(context.WithoutCancel(ctx), args...); err != nil {
			return nil, err
		}
	}
	// Healthy when every member answers through the cluster (a quorum read).
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := e.Ctl(ctx, nil, "endpoint", "health", "--cluster")
		if err == nil {
			break
		}
		for _, m := range e.Members {
			if m.Proc.Exited() {
				return nil, fmt.Errorf("lab: etcd member %s of %s exited: %v\n%s", m.Name, c.Name, m.Proc.Wait(), tail(m.Proc.Log(), 4000))
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lab: etcd cluster of %s not healthy within 30s: %v", c.Name, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err := e.setupAuth(ctx); err != nil {
		return nil, err
	}
	c.lab.logf("external etcd of %s: %d members at %s", c.Name, n, strings.Join(e.Endpoints(), ","))
	return e, nil
}

// setupAuth creates the users root and agents (certificate auth, no
// password) and turns auth on.
func (e *EtcdCluster) setupAuth(ctx context.Context) error {
	const root, remotes = "isthmus/", "isthmus/remotes/"
	for _, args := range [][]string{
		{"role", "add", "root"},
		{"user", "add", "root", "--no-password"},
		{"user", "grant-role", "root", "root"},
		{"role", "add", "agents"},
		// isthmus/ minus isthmus/remotes/ (the server's credentials for
		// remote clusters), as the embedded etcd's agents role.
		{"role", "grant-permission", "agents", "readwrite", root, remotes},
		{"role", "grant-permission", "agents", "readwrite", prefixEnd(remotes), prefixEnd(root)},
		{"user", "add", "agents", "--no-password"},
		{"user", "grant-role", "agents", "agents"},
		{"auth", "enable"},
	} {
		if _, err := e.Ctl(ctx, nil, args...); err != nil {
			return fmt.Errorf("lab: external etcd auth: %w", err)
		}
	}
	return nil
}

func prefixEnd(p string) string {
	b := []byte(p)
	b[len(b)-1]++
	return string(b)
}

// attachToBridge links node's eth0 (addr) to a port named port on the
// cluster router's bridge.
func (c *Cluster) attachToBridge(node *Node, port string, addr netip.Prefix) error {
	lk, err := c.lab.LinkWith(LinkOptions{A: node, B: c.Router, AName: "eth0", BName: port, AAddrs: []netip.Prefix{addr}})
	if err != nil {
		return err
	}
	h, err := c.Router.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	pl, err := h.LinkByName(lk.BName)
	if err == nil {
		var br netlink.Link
		if br, err = h.LinkByName("br0"); err == nil {
			err = h.LinkSetMaster(pl, br)
		}
	}
	if err != nil {
		return fmt.Errorf("lab: attach %s to the bridge of %s: %w", lk.BName, c.Name, err)
	}
	return nil
}

// writePKI creates the CA, a certificate per member (server and peer, with
// its IP) and the client certificates of root and agents.
func (e *EtcdCluster) writePKI() error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: e.cluster.Name + " external etcd CA (isthmus lab)"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	e.CAFile = filepath.Join(e.Dir, "ca.crt")
	if err := os.WriteFile(e.CAFile, caPEM, 0o644); err != nil {
		return err
	}
	issue := func(cn string, server bool, ips []net.IP, dns []string) (certPEM, keyPEM []byte, err error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			IPAddresses:  ips,
			DNSNames:     dns,
		}
		if server {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, err
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
	}
	for _, m := range e.Members {
		// Only what an etcd operator would put there: the member's
		// addresses (no <cluster>.mesh.isthmus.io name of the server's
		// own PKI).
		crt, key, err := issue(m.Name, true, []net.IP{net.IP(m.IP.AsSlice()), net.IPv4(127, 0, 0, 1).To4()}, []string{"localhost"})
		if err != nil {
			return err
		}
		m.certFile, m.keyFile = filepath.Join(e.Dir, m.Name+".crt"), filepath.Join(e.Dir, m.Name+".key")
		if err := errors.Join(os.WriteFile(m.certFile, crt, 0o644), os.WriteFile(m.keyFile, key, 0o600)); err != nil {
			return err
		}
	}
	for _, user := range []string{"root", "agents"} {
		crt, key, err := issue(user, false, nil, nil)
		if err != nil {
			return err
		}
		dir := e.BundleDir(user)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		if err := errors.Join(
			os.WriteFile(filepath.Join(dir, "ca.crt"), caPEM, 0o644),
			os.WriteFile(filepath.Join(dir, "client.crt"), crt, 0o644),
			os.WriteFile(filepath.Join(dir, "client.key"), key, 0o600),
		); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}
