package lab

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
)

// A mesh topology: a fabric router, and per cluster a router with a bridge
// that puts the cluster's nodes on one subnet. The cluster's clustermesh
// server runs in the cluster router's namespace on the bridge address.
//
// Address plan for cluster i (1..99) and node j (1..99):
//
//	node underlay   10.(100+i).0.(10+j)/24, fd10:i::(10+j)/64; gateway .1 / ::1
//	router <-> fabric 10.255.i.{2,1}/30, fd10:ff:i::{2,1}/64
//	pod CIDRs       cluster 10.i.0.0/16 + fd00:i::/48; node 10.i.j.0/24 + fd00:i:0:j::/64
//
// The routers hold static routes for the pod CIDRs (standing in for what BGP
// announces; ClusterOptions.NoStaticPodRoutes leaves them to BGP), so
// native routing works across clusters.

// ClusterOptions describe one cluster of the mesh.
type ClusterOptions struct {
	Name  string // DNS label, default "c<i>"
	ID    uint32 // cluster ID, default the index
	Nodes int    // agents to start, default 2 (see ServerOnly)
	// ServerOnly starts no node: the cluster is its router and its server,
	// a remote whose state a test or benchmark writes into its etcd
	// itself (Nodes must be 0). AddNode still adds nodes later.
	ServerOnly bool
	// ServerArgs and AgentArgs are extra flags for isthmus-clustermesh and
	// every isthmus-agent of the cluster.
	ServerArgs []string
	AgentArgs  []string
	// LeaseTTL of the agents' etcd records (default 10s in the lab, so a
	// killed agent's records vanish quickly).
	LeaseTTL time.Duration
	// ExternalEtcd, when > 0, runs an external etcd cluster of that many
	// members (Debian's /usr/bin/etcd, see etcd.go) on the cluster's bridge
	// and starts the server against it (--etcd-endpoints and TLS flags)
	// instead of with its embedded etcd. Cluster.Etcd is then set, and
	// Bundle, Endpoints and ServerAddr point at that etcd.
	ExternalEtcd int
	// Encryption is "wireguard" to run every agent with transparent
	// encryption (each gets a WireGuard device named <prefix>w<cluster><node>,
	// so lab cleanup finds its UAPI socket); "" or "none" leaves it off.
	Encryption string
	// NodeEncryption also encrypts node-to-node traffic (with Encryption).
	NodeEncryption bool
	// BeforeServer, when set, runs once the cluster's router is built and
	// before its server starts, and returns more server flags: it is where
	// a Kubernetes control plane starts (package lab/kube).
	BeforeServer func(ctx context.Context, c *Cluster) ([]string, error)
	// BeforeAgent, when set, runs once node j (from 1) is linked and before
	// its agent starts, and returns more agent flags: it is where a
	// Kubernetes node's containerd and kubelet start.
	BeforeAgent func(ctx context.Context, c *Cluster, n *Node, j int) ([]string, error)
	// NoStaticPodRoutes leaves the router without the static routes to
	// the nodes' pod CIDRs: BGP supplies them (a BIRD router peered with
	// the agents, see bird.go).
	NoStaticPodRoutes bool
	// NoServer and NoAgents start no isthmus-clustermesh in the router and
	// no isthmus-agent on the nodes (the nodes are still built and linked,
	// and BeforeAgent still runs): something else runs them, e.g. a Helm
	// install into the cluster's Kubernetes (package lab/kube). Cluster.Agents
	// stays empty.
	NoServer, NoAgents bool
}

// Options returns the options the cluster was built with (defaults
// filled in).
func (c *Cluster) Options() ClusterOptions { return c.opts }

// Lab returns the lab the cluster belongs to.
func (c *Cluster) Lab() *Lab { return c.lab }

// NodeIPs are node j's underlay addresses (IPv4, IPv6).
func (c *Cluster) NodeIPs(j int) []netip.Addr {
	return []netip.Addr{c.underlay4(10 + j), c.underlay6(10 + j)}
}

// RouterIPs are the router's addresses on the cluster's bridge (IPv4,
// IPv6): the nodes' gateway, and where the server listens.
func (c *Cluster) RouterIPs() []netip.Addr { return []netip.Addr{c.underlay4(1), c.underlay6(1)} }

// Cluster is one cluster of a lab mesh.
type Cluster struct {
	lab       *Lab
	Index     int
	Name      string
	ID        uint32
	Router    *Node
	Server    *Proc
	ServerDir string
	Nodes     []*Node
	Agents    []*Agent
	// Etcd is the external etcd cluster (ClusterOptions.ExternalEtcd), or
	// nil when the server runs its embedded etcd.
	Etcd *EtcdCluster
	opts ClusterOptions
	// outside is the cluster's outside client (AddOutside), if added.
	outside *Outside
}

func (c *Cluster) underlay4(host int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(100 + c.Index), 0, byte(host)})
}

func (c *Cluster) underlay6(host int) netip.Addr {
	return netip.MustParseAddr(fmt.Sprintf("fd10:%x::%x", c.Index, host))
}

// PodCIDRs are the cluster-wide pod ranges.
func (c *Cluster) PodCIDRs() []netip.Prefix {
	return []netip.Prefix{
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(c.Index), 0, 0}), 16),
		netip.MustParsePrefix(fmt.Sprintf("fd00:%x::/48", c.Index)),
	}
}

// NodePodCIDRs are node j's pod ranges (j from 1).
func (c *Cluster) NodePodCIDRs(j int) []netip.Prefix {
	return []netip.Prefix{
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(c.Index), byte(j), 0}), 24),
		netip.MustParsePrefix(fmt.Sprintf("fd00:%x:0:%x::/64", c.Index, j)),
	}
}

// ServerAddr is the address agents and other clusters use for the server
// (with an external etcd: its members' client URLs, comma-separated).
func (c *Cluster) ServerAddr() string {
	return strings.Join(c.Endpoints(), ",")
}

// Endpoints are the client URLs of the cluster's etcd: the server's
// embedded one, or every member of the external one.
func (c *Cluster) Endpoints() []string {
	if c.Etcd != nil {
		return c.Etcd.Endpoints()
	}
	return []string{"https://" + c.underlay4(1).String() + ":2379"}
}

// NodeBundle returns the directory of node's own etcd credential, which
// writes only that node's records: exported with `isthmus clustermesh
// certs --node` on the server host, as an operator does. With an external
// etcd it is the one credential the lab made for every agent there
// ("agents"; the users of an external etcd are its operator's).
func (c *Cluster) NodeBundle(ctx context.Context, node string) (string, error) {
	if c.Etcd != nil {
		return c.Etcd.BundleDir("agents"), nil
	}
	dir := filepath.Join(c.ServerDir, "node-bundles", node) + "/"
	if _, err := c.CLI(ctx, "clustermesh", "certs", "--data-dir", c.ServerDir, "--node", node, "--out", dir); err != nil {
		return "", err
	}
	return dir, nil
}

// Bundle returns the directory of the credentials the server exported for
// user ("root"); with an external etcd, those the lab made for it ("root",
// "agents").
func (c *Cluster) Bundle(user string) string {
	if c.Etcd != nil {
		return c.Etcd.BundleDir(user)
	}
	return filepath.Join(c.ServerDir, "pki", "bundles", user)
}

// Fabric returns the lab's fabric router, creating it on first use.
func (l *Lab) Fabric() (*Node, error) {
	if ns := l.Netns("fabric"); ns != nil {
		return &Node{Netns: ns, dir: filepath.Join(l.dir, "fabric")}, nil
	}
	return l.AddRouter("fabric")
}

// AddCluster builds cluster number index (1-based, unique in the lab): its
// router, its server, and opts.Nodes nodes each running an agent in cluster
// mode (none with opts.ServerOnly).
func (l *Lab) AddCluster(ctx context.Context, index int, opts ClusterOptions) (*Cluster, error) {
	if index < 1 || index > 99 {
		return nil, fmt.Errorf("lab: cluster index %d out of range 1..99", index)
	}
	if opts.Name == "" {
		opts.Name = fmt.Sprintf("c%d", index)
	}
	if opts.ID == 0 {
		opts.ID = uint32(index)
	}
	switch {
	case opts.ServerOnly && opts.Nodes != 0:
		return nil, fmt.Errorf("lab: cluster %d: ServerOnly with %d nodes", index, opts.Nodes)
	case opts.Nodes == 0 && !opts.ServerOnly:
		opts.Nodes = 2
	}
	if opts.LeaseTTL == 0 {
		opts.LeaseTTL = 10 * time.Second
	}
	c := &Cluster{lab: l, Index: index, Name: opts.Name, ID: opts.ID, opts: opts}
	fabric, err := l.Fabric()
	if err != nil {
		return nil, err
	}
	c.Router, err = l.AddRouter(opts.Name + "-rtr")
	if err != nil {
		return nil, err
	}
	t4f := netip.AddrFrom4([4]byte{10, 255, byte(index), 1})
	t4r := netip.AddrFrom4([4]byte{10, 255, byte(index), 2})
	t6f := netip.MustParseAddr(fmt.Sprintf("fd10:ff:%x::1", index))
	t6r := netip.MustParseAddr(fmt.Sprintf("fd10:ff:%x::2", index))
	lk, err := l.Link(fabric, c.Router, netip.PrefixFrom(t4f, 30), netip.PrefixFrom(t4r, 30))
	if err != nil {
		return nil, err
	}
	if err := lk.AddAddrs(netip.PrefixFrom(t6f, 64), netip.PrefixFrom(t6r, 64)); err != nil {
		return nil, err
	}
	// The cluster's bridge, holding the gateway addresses.
	h, err := c.Router.Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := h.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("lab: bridge in %s: %w", c.Router.FullName(), err)
	}
	brl, err := h.LinkByName("br0")
	if err != nil {
		return nil, err
	}
	for _, p := range []netip.Prefix{netip.PrefixFrom(c.underlay4(1), 24), netip.PrefixFrom(c.underlay6(1), 64)} {
		if err := addAddr(h, brl, p); err != nil {
			return nil, err
		}
	}
	if err := h.LinkSetUp(brl); err != nil {
		return nil, err
	}
	// Routes: the router defaults to the fabric; the fabric reaches the
	// cluster's subnet and pod CIDRs through the router.
	if err := c.Router.AddRoute(netip.Prefix{}, t4f); err != nil {
		return nil, err
	}
	if err := c.Router.AddRoute(netip.MustParsePrefix("::/0"), t6f); err != nil {
		return nil, err
	}
	for _, r := range []struct {
		dst netip.Prefix
		via netip.Addr
	}{
		{netip.PrefixFrom(c.underlay4(0), 24), t4r},
		{netip.PrefixFrom(c.underlay6(0), 64), t6r},
		{c.PodCIDRs()[0], t4r},
		{c.PodCIDRs()[1], t6r},
	} {
		if err := fabric.AddRoute(r.dst, r.via); err != nil {
			return nil, err
		}
	}
	if opts.ExternalEtcd > 0 {
		if c.Etcd, err = c.startEtcd(ctx, opts.ExternalEtcd); err != nil {
			return nil, err
		}
	}
	if opts.BeforeServer != nil {
		args, err := opts.BeforeServer(ctx, c)
		if err != nil {
			return nil, err
		}
		c.opts.ServerArgs = append(c.opts.ServerArgs, args...)
	}
	if !opts.NoServer {
		if err := c.StartServer(ctx); err != nil {
			return nil, err
		}
	}
	for j := 1; j <= opts.Nodes; j++ {
		if _, _, err := c.AddNode(ctx); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// StartServer (re)starts the cluster's isthmus-clustermesh and waits until
// it has exported the root bundle and answers.
func (c *Cluster) StartServer(ctx context.Context) error {
	bin, err := c.lab.Binary(ServerBinary)
	if err != nil {
		return err
	}
	if c.ServerDir == "" {
		c.ServerDir = filepath.Join(c.lab.dir, c.Name+"-server")
	}
	args := []string{bin,
		"--cluster-name", c.Name,
		"--cluster-id", strconv.FormatUint(uint64(c.ID), 10),
		"--data-dir", c.ServerDir,
		"--listen-client", c.underlay4(1).String() + ":2379",
		"--listen-peer", "127.0.0.1:2380",
	}
	for _, p := range c.PodCIDRs() {
		args = append(args, "--pod-cidr", p.String())
	}
	if c.Etcd != nil {
		root := c.Etcd.BundleDir("root")
		args = append(args, "--etcd-endpoints", strings.Join(c.Etcd.Endpoints(), ","),
			"--etcd-ca", filepath.Join(root, "ca.crt"),
			"--etcd-cert", filepath.Join(root, "client.crt"),
			"--etcd-key", filepath.Join(root, "client.key"))
	}
	if c.Etcd == nil {
		args = append(args, c.enrollArgs()...) // external workloads (vm.go)
	}
	args = append(args, c.opts.ServerArgs...)
	p, err := c.Router.Start(context.WithoutCancel(ctx), args...)
	if err != nil {
		return err
	}
	c.Server = p
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(c.Bundle("root"), "client.key")); err == nil {
			if _, err := c.CLI(ctx, "clustermesh", "status"); err == nil {
				return nil
			}
		}
		select {
		case <-p.Done():
			return fmt.Errorf("lab: server of %s exited: %v\n%s", c.Name, p.Wait(), tail(p.Log(), 4000))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: server of %s not ready within 60s\n%s", c.Name, tail(p.Log(), 4000))
		}
	}
}

// AddNode adds a node to the cluster's subnet and starts its agent in
// cluster mode (no agent, and a nil *Agent, with ClusterOptions.NoAgents).
func (c *Cluster) AddNode(ctx context.Context) (*Node, *Agent, error) {
	j := len(c.Nodes) + 1
	n, err := c.lab.AddNode(fmt.Sprintf("%s-n%d", c.Name, j))
	if err != nil {
		return nil, nil, err
	}
	ip4, ip6 := c.underlay4(10+j), c.underlay6(10+j)
	lk, err := c.lab.LinkWith(LinkOptions{A: n, B: c.Router, AName: "eth0", BName: fmt.Sprintf("n%d", j),
		AAddrs: []netip.Prefix{netip.PrefixFrom(ip4, 24), netip.PrefixFrom(ip6, 64)}})
	if err != nil {
		return nil, nil, err
	}
	h, err := c.Router.Handle()
	if err != nil {
		return nil, nil, err
	}
	port, err := h.LinkByName(lk.BName)
	if err == nil {
		var br netlink.Link
		if br, err = h.LinkByName("br0"); err == nil {
			err = h.LinkSetMaster(port, br)
		}
		if err == nil {
			err = fabricGSO(h, port)
		}
	}
	h.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("lab: attach %s to the bridge: %w", lk.BName, err)
	}
	if err := n.AddRoute(netip.Prefix{}, c.underlay4(1)); err != nil {
		return nil, nil, err
	}
	if err := n.AddRoute(netip.MustParsePrefix("::/0"), c.underlay6(1)); err != nil {
		return nil, nil, err
	}
	pods := c.NodePodCIDRs(j)
	for i, p := range pods {
		if c.opts.NoStaticPodRoutes {
			break
		}
		via := ip4
		if i == 1 {
			via = ip6
		}
		if err := c.Router.AddRoute(p, via); err != nil {
			return nil, nil, err
		}
	}
	if c.opts.NoAgents {
		if c.opts.BeforeAgent != nil {
			if _, err := c.opts.BeforeAgent(ctx, c, n, j); err != nil {
				return nil, nil, err
			}
		}
		c.Nodes = append(c.Nodes, n)
		return n, nil, nil
	}
	bundle, err := c.NodeBundle(ctx, n.NodeName())
	if err != nil {
		return nil, nil, err
	}
	args := []string{
		"--kvstore-endpoints", c.ServerAddr(),
		"--kvstore-bundle", bundle,
		"--node-ip", ip4.String(), "--node-ip", ip6.String(),
		"--lease-ttl", c.opts.LeaseTTL.String(),
	}
	if c.opts.Encryption != "" && c.opts.Encryption != "none" {
		args = append(args, "--encryption", c.opts.Encryption,
			"--wireguard-device", fmt.Sprintf("%sw%dn%d", c.lab.Prefix(), c.Index, j))
		if c.opts.NodeEncryption {
			args = append(args, "--node-encryption")
		}
	}
	if c.opts.BeforeAgent != nil {
		more, err := c.opts.BeforeAgent(ctx, c, n, j)
		if err != nil {
			return nil, nil, err
		}
		args = append(args, more...)
	}
	a, err := n.StartAgent(ctx, AgentOptions{PodCIDRs: pods, ClusterName: c.Name, ClusterID: c.ID, Args: append(args, c.opts.AgentArgs...)})
	if err != nil {
		return nil, nil, err
	}
	c.Nodes = append(c.Nodes, n)
	c.Agents = append(c.Agents, a)
	return n, a, nil
}

// fabricGSO lets a bridge port pass GSO packets as large as the kernel
// allows (BIG TCP) instead of segmenting them: the lab's fabric stands in
// for a network whose NICs segment (TSO) and reassemble (GRO) at the
// nodes, so what the nodes' agents set on their own devices is what
// decides, not the lab.
func fabricGSO(h *netlink.Handle, l netlink.Link) error {
	size := int(l.Attrs().TSOMaxSize)
	if size <= 65536 {
		return nil
	}
	for _, set := range []func(netlink.Link, int) error{h.LinkSetGSOMaxSize, h.LinkSetGROMaxSize, h.LinkSetGSOIPv4MaxSize, h.LinkSetGROIPv4MaxSize} {
		if err := set(l, size); err != nil {
			return fmt.Errorf("lab: GSO/GRO size %d on %s: %w", size, l.Attrs().Name, err)
		}
	}
	return nil
}

// CLI runs the isthmus CLI with the cluster's root credentials (for the
// `clustermesh` verbs).
func (c *Cluster) CLI(ctx context.Context, args ...string) ([]byte, error) {
	cli, err := c.lab.Binary(CLIBinary)
	if err != nil {
		return nil, err
	}
	// The server listens inside the router's namespace; reach it from there.
	cmd := c.Router.Command(ctx, append([]string{cli}, args...)...)
	cmd.Env = append(os.Environ(), "ISTHMUS_KVSTORE_ENDPOINTS="+c.ServerAddr(), "ISTHMUS_KVSTORE_BUNDLE="+c.Bundle("root"))
	out, err := CombinedOutput(cmd)
	if err != nil {
		return out, fmt.Errorf("isthmus %s (cluster %s): %v: %s", strings.Join(args, " "), c.Name, err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Connect connects two clusters both ways: each exports a bundle for the
// other, and each server is told to mirror the other.
func Connect(ctx context.Context, a, b *Cluster) error {
	for _, pair := range [][2]*Cluster{{a, b}, {b, a}} {
		local, remote := pair[0], pair[1]
		bundle := filepath.Join(local.lab.dir, fmt.Sprintf("bundle-%s-for-%s", remote.Name, local.Name))
		if _, err := remote.CLI(ctx, "clustermesh", "certs", "--data-dir", remote.ServerDir, "--for-remote", local.Name, "--out", bundle); err != nil {
			return err
		}
		if _, err := local.CLI(ctx, "clustermesh", "connect", "--name", remote.Name, "--endpoints", remote.ServerAddr(), "--bundle", bundle); err != nil {
			return err
		}
	}
	return nil
}
