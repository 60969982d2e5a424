package kube

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/isthmus-mesh/isthmus/lab"
)

// Ports of the control plane inside its namespace (one cluster per
// ControlPlane namespace). etcd uses ports off the usual 2379/2380 so it
// can share a namespace with a clustermesh server.
const (
	APIServerPort = 6443
	etcdClientURL = "http://127.0.0.1:12379"
	etcdPeerURL   = "http://127.0.0.1:12380"
)

// ClusterOptions describe a cluster's control plane.
type ClusterOptions struct {
	// Name is a DNS label, e.g. "c1"; it names the cluster's dir
	// (<lab dir>/kube-<name>) and its etcd member.
	Name string
	// ControlPlane is the namespace etcd, kube-apiserver,
	// kube-controller-manager and kube-scheduler run in (e.g. the cluster's
	// router). Its 127.0.0.1 ports are private to it.
	ControlPlane *lab.Node
	// AdvertiseAddr is the apiserver's address as the nodes reach it: an
	// address of ControlPlane.
	AdvertiseAddr netip.Addr
	// ClusterCIDRs are the pod ranges, at most one per family
	// (kube-controller-manager --cluster-cidr); default 10.244.0.0/16 and
	// fd00:10:244::/56.
	ClusterCIDRs []netip.Prefix
	// NodeMaskV4 and NodeMaskV6 are the sizes of the node pod CIDRs the
	// controller manager allocates; default 24 and 64 (at most 16 bits
	// longer than the IPv6 cluster CIDR, as kcm requires).
	NodeMaskV4, NodeMaskV6 int
	// ServiceCIDRs default to 10.96.0.0/16 and fd00:10:96::/112.
	ServiceCIDRs []netip.Prefix
	// NodeCIDRsFromCaller turns the controller manager's node IPAM off:
	// the caller sets each Node's spec.podCIDRs (a lab mesh gives every
	// node the pod CIDRs its routers route to it).
	NodeCIDRsFromCaller bool
	// Binaries default to FindBinaries.
	Binaries *Binaries
}

// Cluster is a running control plane and its nodes.
type Cluster struct {
	Name          string
	Dir           string // <lab dir>/kube-<name>: pki/, etcd/, kubeconfigs
	ControlPlane  *lab.Node
	AdvertiseAddr netip.Addr
	// Server is the apiserver's URL from the lab's namespaces,
	// https://<AdvertiseAddr>:6443.
	Server string
	// AdminKubeconfig (system:masters) points at Server: use it inside the
	// lab's namespaces (Kubectl does).
	AdminKubeconfig string
	// Config and Client reach the apiserver from the calling process, as
	// admin, through a relay into ControlPlane (lab.Netns.Forward) that
	// lives until the lab closes.
	Config *rest.Config
	Client kubernetes.Interface
	// CACert is the path of the cluster CA (ca.crt; it signs every
	// certificate of the cluster); CAData its PEM.
	CACert string
	CAData []byte

	ClusterCIDRs, ServiceCIDRs []netip.Prefix
	Binaries                   Binaries
	Etcd, APIServer            *lab.Proc
	ControllerManager          *lab.Proc
	Scheduler                  *lab.Proc

	lab           *lab.Lab
	cpCtx         context.Context // the control plane's processes live as long as it
	apiServerArgs []string
	ca            *ca
	pkiDir        string

	mu    sync.Mutex
	nodes map[string]*Node
}

func (o *ClusterOptions) defaults() error {
	if o.Name == "" {
		o.Name = "kube"
	}
	if o.ControlPlane == nil {
		return errors.New("kube: ClusterOptions.ControlPlane is required")
	}
	if !o.AdvertiseAddr.IsValid() {
		return errors.New("kube: ClusterOptions.AdvertiseAddr is required")
	}
	if len(o.ClusterCIDRs) == 0 {
		o.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/56")}
	}
	if len(o.ServiceCIDRs) == 0 {
		o.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:10:96::/112")}
	}
	if o.NodeMaskV4 == 0 {
		o.NodeMaskV4 = 24
	}
	if o.NodeMaskV6 == 0 {
		o.NodeMaskV6 = 64
		for _, p := range o.ClusterCIDRs {
			if p.Addr().Is6() && 64-p.Bits() > 16 {
				o.NodeMaskV6 = p.Bits() + 16
			}
		}
	}
	if o.Binaries == nil {
		b, err := FindBinaries()
		if err != nil {
			return err
		}
		o.Binaries = &b
	}
	return nil
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.Masked().String()
	}
	return strings.Join(s, ",")
}

// firstServiceIP is the first address of the first IPv4 (else first)
// service CIDR: the ClusterIP of the "kubernetes" Service.
func firstServiceIP(ps []netip.Prefix) netip.Addr {
	for _, p := range ps {
		if p.Addr().Is4() {
			return p.Masked().Addr().Next()
		}
	}
	return ps[0].Masked().Addr().Next()
}

// Start starts a control plane in o.ControlPlane: etcd, kube-apiserver,
// kube-controller-manager and kube-scheduler, with a fresh PKI, and returns
// when the apiserver is ready (/readyz). Everything is removed when the
// lab closes.
func Start(ctx context.Context, l *lab.Lab, o ClusterOptions) (*Cluster, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	c := &Cluster{
		Name:          o.Name,
		Dir:           filepath.Join(l.Dir(), "kube-"+o.Name),
		ControlPlane:  o.ControlPlane,
		AdvertiseAddr: o.AdvertiseAddr,
		Server:        "https://" + net.JoinHostPort(o.AdvertiseAddr.String(), strconv.Itoa(APIServerPort)),
		ClusterCIDRs:  o.ClusterCIDRs,
		ServiceCIDRs:  o.ServiceCIDRs,
		Binaries:      *o.Binaries,
		lab:           l,
		nodes:         map[string]*Node{},
	}
	c.pkiDir = filepath.Join(c.Dir, "pki")
	if err := os.MkdirAll(c.pkiDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(c.Dir, "kubeconfigs"), 0o700); err != nil {
		return nil, err
	}
	var err error
	if c.ca, err = newCA("isthmus-lab-" + o.Name + "-ca"); err != nil {
		return nil, err
	}
	if err := c.ca.writeFiles(c.pkiDir); err != nil {
		return nil, err
	}
	c.CACert, c.CAData = filepath.Join(c.pkiDir, "ca.crt"), c.ca.certPEM

	// PKI of the control plane.
	apiCrt, apiKey, err := c.ca.issueFiles(c.pkiDir, "apiserver", certSpec{
		cn:     "kube-apiserver",
		dns:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		ips:    []net.IP{net.IPv4(127, 0, 0, 1), net.IP(firstServiceIP(o.ServiceCIDRs).AsSlice()), net.IP(o.AdvertiseAddr.AsSlice())},
		server: true,
	})
	if err != nil {
		return nil, err
	}
	kcCrt, kcKey, err := c.ca.issueFiles(c.pkiDir, "apiserver-kubelet-client", certSpec{cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true})
	if err != nil {
		return nil, err
	}
	saKey, saPub, err := writeServiceAccountKey(c.pkiDir)
	if err != nil {
		return nil, err
	}
	if c.AdminKubeconfig, err = c.KubeconfigFor("kubernetes-admin", "system:masters"); err != nil {
		return nil, err
	}
	kcmKubeconfig, err := c.KubeconfigFor("system:kube-controller-manager")
	if err != nil {
		return nil, err
	}
	schedKubeconfig, err := c.KubeconfigFor("system:kube-scheduler")
	if err != nil {
		return nil, err
	}

	// The caller's way in: a relay into the control plane's namespace.
	fwd, stop, err := o.ControlPlane.Forward(net.JoinHostPort(o.AdvertiseAddr.String(), strconv.Itoa(APIServerPort)))
	if err != nil {
		return nil, err
	}
	if err := l.OnClose(func() error { stop(); return nil }); err != nil {
		stop()
		return nil, err
	}
	admin, err := clientcmd.BuildConfigFromFlags("", c.AdminKubeconfig)
	if err != nil {
		return nil, err
	}
	admin.Host = "https://" + fwd
	admin.TLSClientConfig.ServerName = "kubernetes"
	admin.QPS, admin.Burst = 50, 100
	c.Config = admin
	if c.Client, err = kubernetes.NewForConfig(admin); err != nil {
		return nil, err
	}

	cp := context.WithoutCancel(ctx)
	c.Etcd, err = o.ControlPlane.Start(cp, "etcd",
		"--name", o.Name,
		"--data-dir", filepath.Join(c.Dir, "etcd"),
		"--listen-client-urls", etcdClientURL,
		"--advertise-client-urls", etcdClientURL,
		"--listen-peer-urls", etcdPeerURL,
		"--initial-advertise-peer-urls", etcdPeerURL,
		"--initial-cluster", o.Name+"="+etcdPeerURL,
		"--log-level", "warn")
	if err != nil {
		return nil, err
	}
	c.apiServerArgs = []string{c.Binaries.APIServer,
		"--etcd-servers=" + etcdClientURL,
		"--bind-address=0.0.0.0",
		"--secure-port=" + strconv.Itoa(APIServerPort),
		"--advertise-address=" + o.AdvertiseAddr.String(),
		"--tls-cert-file=" + apiCrt, "--tls-private-key-file=" + apiKey,
		"--client-ca-file=" + c.CACert,
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=" + joinPrefixes(o.ServiceCIDRs),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--kubelet-client-certificate=" + kcCrt, "--kubelet-client-key=" + kcKey,
		"--kubelet-certificate-authority=" + c.CACert,
		"--kubelet-preferred-address-types=InternalIP",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=1"}
	c.cpCtx = cp
	c.APIServer, err = o.ControlPlane.Start(cp, c.apiServerArgs...)
	if err != nil {
		return nil, err
	}
	if err := c.waitReady(ctx); err != nil {
		return nil, err
	}
	c.ControllerManager, err = o.ControlPlane.Start(cp, c.Binaries.ControllerManager,
		"--kubeconfig="+kcmKubeconfig,
		"--authentication-kubeconfig="+kcmKubeconfig,
		"--authorization-kubeconfig="+kcmKubeconfig,
		"--bind-address=127.0.0.1",
		"--service-account-private-key-file="+saKey,
		"--root-ca-file="+c.CACert,
		"--use-service-account-credentials=true",
		"--controllers=*",
		"--leader-elect=false",
		"--cluster-signing-cert-file="+c.CACert,
		"--cluster-signing-key-file="+filepath.Join(c.pkiDir, "ca.key"),
		"--service-cluster-ip-range="+joinPrefixes(o.ServiceCIDRs),
		"--allocate-node-cidrs="+strconv.FormatBool(!o.NodeCIDRsFromCaller),
		"--cluster-cidr="+joinPrefixes(o.ClusterCIDRs),
		"--node-cidr-mask-size-ipv4="+strconv.Itoa(o.NodeMaskV4),
		"--node-cidr-mask-size-ipv6="+strconv.Itoa(o.NodeMaskV6),
		"--profiling=false",
		"--v=1")
	if err != nil {
		return nil, err
	}
	c.Scheduler, err = o.ControlPlane.Start(cp, c.Binaries.Scheduler,
		"--kubeconfig="+schedKubeconfig,
		"--authentication-kubeconfig="+schedKubeconfig,
		"--authorization-kubeconfig="+schedKubeconfig,
		"--bind-address=127.0.0.1",
		"--leader-elect=false",
		"--profiling=false",
		"--v=1")
	if err != nil {
		return nil, err
	}
	return c, nil
}

// StopAPIServer kills kube-apiserver (an API-server outage: everything
// else keeps running); StartAPIServer starts it again.
func (c *Cluster) StopAPIServer() error { return c.APIServer.Kill() }

// StartAPIServer starts kube-apiserver again after StopAPIServer, with the
// same flags, and waits until it is ready.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	p, err := c.ControlPlane.Start(c.cpCtx, c.apiServerArgs...)
	if err != nil {
		return err
	}
	c.APIServer = p
	return c.waitReady(ctx)
}

// waitReady polls the apiserver's /readyz until it answers ok.
func (c *Cluster) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(90 * time.Second)
	var last error
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		cancel()
		if err == nil && strings.TrimSpace(string(body)) == "ok" {
			return nil
		}
		last = err
		for _, p := range []*lab.Proc{c.Etcd, c.APIServer} {
			if p.Exited() {
				return fmt.Errorf("kube: %s exited: %v\n%s", p.Name(), p.Wait(), lab.Tail(p.Log(), 4000))
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube: apiserver of %s not ready within 90s (last: %v)\n%s", c.Name, last, lab.Tail(c.APIServer.Log(), 4000))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// KubeconfigFor issues a client certificate for user (CN) in groups (O),
// signed by the cluster CA, and writes a kubeconfig that uses it against
// Server into the cluster dir; it returns the file's path. Examples:
// ("system:node:<node>", "system:nodes") for a kubelet, or
// ("isthmus-agent") for an agent that RBAC then grants rights to.
func (c *Cluster) KubeconfigFor(user string, groups ...string) (string, error) {
	certPEM, keyPEM, err := c.ca.issue(certSpec{cn: user, orgs: groups, client: true})
	if err != nil {
		return "", err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[c.Name] = &clientcmdapi.Cluster{Server: c.Server, CertificateAuthorityData: c.ca.certPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts[c.Name] = &clientcmdapi.Context{Cluster: c.Name, AuthInfo: user}
	cfg.CurrentContext = c.Name
	p := filepath.Join(c.Dir, "kubeconfigs", unsafeFileChars.Replace(user)+".kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, p); err != nil {
		return "", fmt.Errorf("kube: write kubeconfig for %s: %w", user, err)
	}
	return p, nil
}

var unsafeFileChars = strings.NewReplacer(":", "_", "/", "_", " ", "_")

// Kubectl runs kubectl with the admin kubeconfig in the control plane's
// namespace and returns its combined output.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	return c.ControlPlane.Exec(ctx, append([]string{c.Binaries.Kubectl, "--kubeconfig", c.AdminKubeconfig}, args...)...)
}

// KubectlCmd returns the kubectl command (for stdin or pipes).
func (c *Cluster) KubectlCmd(ctx context.Context, args ...string) *exec.Cmd {
	return c.ControlPlane.Command(ctx, append([]string{c.Binaries.Kubectl, "--kubeconfig", c.AdminKubeconfig}, args...)...)
}
