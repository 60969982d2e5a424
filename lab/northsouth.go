package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// The way in from outside in `lab up --bgp`: each cluster's router runs
// BIRD as the top-of-rack router, peered with every node; the echo
// service is a LoadBalancer service whose addresses LB-IPAM takes from a
// pool of the cluster; a client outside the mesh behind the router
// reaches them through the routes BGP put there.
//
// Address plan for cluster i: the pool is 10.(100+i).0.240/28 and
// fd10:i::f0/124, inside the node segment, so the same addresses can be
// answered with ARP/NDP on the segment (L2 announcements) as well as
// routed (BGP announces each as a /32 and /128, which the router prefers
// to its connected segment route).

// ASNs of the lab's BGP sessions: one for every top-of-rack router, one
// per cluster for its nodes (eBGP).
const (
	ToRASN  = 65000
	nodeASN = 65100
)

// LBPool returns the load-balancer pool of cluster c (IPv4, IPv6).
func (c *Cluster) LBPool() []netip.Prefix {
	return []netip.Prefix{
		netip.PrefixFrom(c.underlay4(240), 28),
		netip.PrefixFrom(c.underlay6(0xf0), 124),
	}
}

// NodeASN is the ASN of the nodes of cluster c.
func (c *Cluster) NodeASN() uint32 { return nodeASN + uint32(c.Index) }

const poolObject = `apiVersion: isthmus.io/v1alpha1
kind: LoadBalancerIPPool
metadata:
  name: lab
spec:
  blocks: [{cidr: %s}, {cidr: "%s"}]
`

const l2Object = `apiVersion: isthmus.io/v1alpha1
kind: L2AnnouncementPolicy
metadata:
  name: lab
spec:
  interfaces: [eth0]
`

const bgpObject = `apiVersion: isthmus.io/v1alpha1
kind: BGPPeeringPolicy
metadata:
  name: tor
spec:
  localASN: %d
  neighbors:
    - address: %s
      peerASN: %d
      gracefulRestart: {enabled: true, restartTimeSeconds: 120}
    - address: "%s"
      peerASN: %d
      gracefulRestart: {enabled: true, restartTimeSeconds: 120}
  advertisements:
    - type: PodCIDR
    - type: LoadBalancerIP
`

// applyNorthSouth applies the cluster's pool and, with bgp, its
// BGPPeeringPolicy, with l2 its L2AnnouncementPolicy (every node answers
// on eth0, its segment interface).
func applyNorthSouth(ctx context.Context, c *Cluster, bgp, l2 bool) error {
	pool, rtr := c.LBPool(), c.RouterIPs()
	f := filepath.Join(c.lab.dir, c.Name+"-northsouth.yaml")
	doc := fmt.Sprintf(poolObject, pool[0], pool[1])
	if bgp {
		doc += "---\n" + fmt.Sprintf(bgpObject, c.NodeASN(), rtr[0], ToRASN, rtr[1], ToRASN)
	}
	if l2 {
		doc += "---\n" + l2Object
	}
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	if _, err := c.Agents[0].CLI(ctx, "apply", "-f", f); err != nil {
		return err
	}
	return nil
}

// startToR starts BIRD in the cluster's router, peered with every node
// over IPv4 and IPv6.
func startToR(ctx context.Context, c *Cluster) error {
	var ns []BIRDNeighbor
	for j := range c.Nodes {
		for _, a := range c.NodeIPs(j + 1) {
			ns = append(ns, BIRDNeighbor{Address: a, ASN: c.NodeASN()})
		}
	}
	_, err := c.Router.StartBIRD(ctx, BIRDOptions{RouterID: c.RouterIPs()[0], ASN: ToRASN, Neighbors: ns})
	return err
}

// LoadBalancerAddrs returns the addresses LB-IPAM assigned to the service
// namespace/name, as its cluster's first agent sees them.
func (c *Cluster) LoadBalancerAddrs(ctx context.Context, namespace, name string) ([]netip.Addr, error) {
	objs, err := api.NewClient(c.Agents[0].Socket).ListObjects(ctx, objects.KindService)
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		if o.Namespace != namespace || o.Name != name {
			continue
		}
		var svc objects.Service
		if err := json.Unmarshal(o.Object, &svc); err != nil {
			return nil, fmt.Errorf("lab: service %s/%s: %w", namespace, name, err)
		}
		if r := svc.Status.LoadBalancer.Refused; r != "" {
			return nil, fmt.Errorf("lab: LB-IPAM refused service %s/%s: %s", namespace, name, r)
		}
		var out []netip.Addr
		for _, in := range svc.Status.LoadBalancer.Ingress {
			if a, err := netip.ParseAddr(in.IP); err == nil {
				out = append(out, a)
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("lab: no service %s/%s in cluster %s", namespace, name, c.Name)
}

// waitLBAddrs waits until the echo service has an address of each family.
func waitLBAddrs(ctx context.Context, c *Cluster, timeout time.Duration) ([]netip.Addr, error) {
	deadline := time.Now().Add(timeout)
	for {
		addrs, err := c.LoadBalancerAddrs(ctx, "default", "echo")
		if err == nil && len(addrs) != 2 {
			err = fmt.Errorf("service default/echo has addresses %v, want one per family", addrs)
		}
		if err == nil {
			return addrs, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lab: cluster %s: no load-balancer addresses within %v: %w", c.Name, timeout, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitAnnounced waits until the echo service has an address of each
// family and the cluster's router routes each through every node (ECMP):
// what BGP announced. It returns the addresses.
func waitAnnounced(ctx context.Context, c *Cluster, timeout time.Duration) ([]netip.Addr, error) {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		addrs, err := c.LoadBalancerAddrs(ctx, "default", "echo")
		if err == nil {
			err = c.announced(addrs)
		}
		if err == nil {
			return addrs, nil
		}
		last = err
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lab: cluster %s: load-balancer addresses not announced within %v: %w", c.Name, timeout, last)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// announced checks that the router routes each address (one per family)
// through every node.
func (c *Cluster) announced(addrs []netip.Addr) error {
	if len(addrs) != 2 {
		return fmt.Errorf("service default/echo has addresses %v, want one per family", addrs)
	}
	for _, a := range addrs {
		r, ok, err := c.Router.KernelRoute(netip.PrefixFrom(a, a.BitLen()))
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("no route to %s in %s", a, c.Router.Name())
		}
		var want []netip.Addr
		for j := range c.Nodes {
			ips := c.NodeIPs(j + 1)
			if a.Is4() {
				want = append(want, ips[0])
			} else {
				want = append(want, ips[1])
			}
		}
		slices.SortFunc(want, func(x, y netip.Addr) int { return x.Compare(y) })
		if !slices.Equal(r.Gateways, want) {
			return fmt.Errorf("%s in %s via %v, want every node %v", a, c.Router.Name(), r.Gateways, want)
		}
	}
	return nil
}
