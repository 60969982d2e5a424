package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// External workloads (VMs, bare-metal hosts; docs/vms.md) in the lab: a
// host in its own namespace behind the fabric router, outside every
// cluster's node subnet, that joins a cluster with isthmus-agent --join
// and a one-time token.
//
// Address plan, host k (1..50) of the lab:
//
//	uplink   10.254.k.2/30, fd10:fe:k::2/64; fabric 10.254.k.1 / fd10:fe:k::1
//
// Every cluster's server serves enrollment on its router's bridge address,
// port EnrollPort, and gives hosts addresses from VMCIDRs.

// EnrollPort is the port of the lab servers' enrollment endpoint.
const EnrollPort = 8443

// VMCIDRs are the cluster's ranges of external workloads' addresses: inside
// its pod CIDRs, outside every node's (nodes use 10.i.j.0/24, j < 100).
func (c *Cluster) VMCIDRs() []netip.Prefix {
	return []netip.Prefix{
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(c.Index), 200, 0}), 24),
		netip.MustParsePrefix(fmt.Sprintf("fd00:%x:0:c8::/64", c.Index)),
	}
}

// EnrollURL is where the cluster's server serves enrollment.
func (c *Cluster) EnrollURL() string {
	return fmt.Sprintf("https://%s:%d", c.underlay4(1), EnrollPort)
}

// enrollArgs are the server flags that turn enrollment on.
func (c *Cluster) enrollArgs() []string {
	args := []string{"--enroll-listen", fmt.Sprintf("%s:%d", c.underlay4(1), EnrollPort)}
	for _, p := range c.VMCIDRs() {
		args = append(args, "--vm-cidr", p.String())
	}
	return args
}

// VM is an external workload's host.
type VM struct {
	*Node
	Cluster *Cluster
	// Name is its ExternalWorkload's name (the lab prefix, "-", the name
	// given to AddVM, so parallel labs never share a node name, pin dir or
	// etcd user).
	Name string
	// Uplink are its underlay addresses (IPv4, IPv6); Dev its interface.
	Uplink []netip.Addr
	Dev    string
	// Agent is its isthmus-agent once joined.
	Agent *Agent
	k     int
}

// Addresses are the host's mesh addresses (its workload addresses, on its
// WireGuard device), from the cluster's record of it.
func (v *VM) Addresses(ctx context.Context) ([]netip.Addr, error) {
	out, err := v.Cluster.CLI(ctx, "vm", "list", "-o", "json")
	if err != nil {
		return nil, err
	}
	var ws []struct {
		Metadata struct{ Name string }
		Status   struct{ Addresses []netip.Addr }
	}
	if err := json.Unmarshal(out, &ws); err != nil {
		return nil, fmt.Errorf("lab: vm list: %w", err)
	}
	for _, w := range ws {
		if w.Metadata.Name == v.Name {
			return w.Status.Addresses, nil
		}
	}
	return nil, fmt.Errorf("lab: no workload %s", v.Name)
}

// AddVMHost adds host number k (1..50) behind the fabric router, without an
// agent, and the cluster's ExternalWorkload name (labels as given).
func (c *Cluster) AddVMHost(ctx context.Context, k int, name string, labels map[string]string) (*VM, error) {
	if k < 1 || k > 50 {
		return nil, fmt.Errorf("lab: vm %d out of range 1..50", k)
	}
	fabric, err := c.lab.Fabric()
	if err != nil {
		return nil, err
	}
	n, err := c.lab.AddNode(fmt.Sprintf("vm%d", k))
	if err != nil {
		return nil, err
	}
	f4 := netip.AddrFrom4([4]byte{10, 254, byte(k), 1})
	h4 := netip.AddrFrom4([4]byte{10, 254, byte(k), 2})
	f6 := netip.MustParseAddr(fmt.Sprintf("fd10:fe:%x::1", k))
	h6 := netip.MustParseAddr(fmt.Sprintf("fd10:fe:%x::2", k))
	lk, err := c.lab.LinkWith(LinkOptions{A: n, B: fabric, AName: "eth0", BName: fmt.Sprintf("vm%d", k),
		AAddrs: []netip.Prefix{netip.PrefixFrom(h4, 30), netip.PrefixFrom(h6, 64)},
		BAddrs: []netip.Prefix{netip.PrefixFrom(f4, 30), netip.PrefixFrom(f6, 64)}})
	if err != nil {
		return nil, err
	}
	if err := n.AddRoute(netip.Prefix{}, f4); err != nil {
		return nil, err
	}
	if err := n.AddRoute(netip.MustParsePrefix("::/0"), f6); err != nil {
		return nil, err
	}
	v := &VM{Node: n, Cluster: c, Name: c.lab.prefix + "-" + name, Uplink: []netip.Addr{h4, h6}, Dev: lk.AName, k: k}
	// The agent pins its datapath under its node name, vm-<name>.
	pin := filepath.Join(PinRoot, "vm-"+v.Name)
	if err := c.lab.OnClose(func() error { return os.RemoveAll(pin) }); err != nil {
		return nil, err
	}
	var ls []string
	for k, val := range labels {
		ls = append(ls, fmt.Sprintf("    %s: %q", k, val))
	}
	sort.Strings(ls)
	doc := fmt.Sprintf("apiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\nmetadata:\n  name: %s\n  labels:\n%s\n", v.Name, strings.Join(ls, "\n"))
	if len(ls) == 0 {
		doc = fmt.Sprintf("apiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\nmetadata:\n  name: %s\n", v.Name)
	}
	f := filepath.Join(c.lab.dir, v.Name+".yaml")
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		return nil, err
	}
	if _, err := c.CLI(ctx, "vm", "apply", "-f", f); err != nil {
		return nil, err
	}
	return v, nil
}

// Token is what `isthmus vm token create -o json` prints.
type Token struct {
	Token         string `json:"token"`
	Server        string `json:"server"`
	CAFingerprint string `json:"caFingerprint"`
}

// CreateToken creates an enrollment token for the host.
func (v *VM) CreateToken(ctx context.Context, ttl time.Duration) (Token, error) {
	out, err := v.Cluster.CLI(ctx, "vm", "token", "create", v.Name, "--ttl", ttl.String(), "-o", "json")
	if err != nil {
		return Token{}, err
	}
	var t Token
	if err := json.Unmarshal(out, &t); err != nil {
		return Token{}, fmt.Errorf("lab: vm token create: %w: %s", err, out)
	}
	return t, nil
}

// JoinArgs are the agent flags of the host: --join with tok, and the
// lab's names for its WireGuard device and node addresses.
func (v *VM) JoinArgs(tok Token) []string {
	return []string{"--join", tok.Server, "--token", tok.Token, "--ca-fingerprint", tok.CAFingerprint,
		"--wireguard-device", fmt.Sprintf("%sv%d", v.lab.Prefix(), v.k),
		"--node-ip", v.Uplink[0].String(), "--node-ip", v.Uplink[1].String(),
		"--lease-ttl", v.Cluster.opts.LeaseTTL.String()}
}

// Join starts the host's agent with tok (it enrolls, then runs as a node
// of the cluster) and waits until its API answers.
func (v *VM) Join(ctx context.Context, tok Token) (*Agent, error) {
	a, err := v.StartAgent(ctx, AgentOptions{Args: v.JoinArgs(tok)})
	if err != nil {
		return nil, err
	}
	v.Agent = a
	return a, nil
}

// AddVM adds host k of the cluster, enrolls it with a fresh token and
// returns it with its agent running (`isthmus lab up --vms N` calls it).
func (l *Lab) AddVM(ctx context.Context, c *Cluster, k int, name string, labels map[string]string) (*VM, error) {
	v, err := c.AddVMHost(ctx, k, name, labels)
	if err != nil {
		return nil, err
	}
	tok, err := v.CreateToken(ctx, 15*time.Minute)
	if err != nil {
		return nil, err
	}
	if _, err := v.Join(ctx, tok); err != nil {
		return nil, err
	}
	return v, nil
}
