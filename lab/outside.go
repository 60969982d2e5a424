package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Outside is a client outside the mesh: a network namespace linked to a
// cluster's router on a subnet of its own (198.51.100.0/24 and
// 2001:db8:<cluster>::/64, the documentation ranges), with its default
// routes through the router. Routes on the router (RouteVia) steer
// load-balancer and external addresses to the nodes, as a top-of-rack
// router would after BGP or with static routes.
type Outside struct {
	*Netns
	Cluster *Cluster
	IPv4    netip.Addr
	IPv6    netip.Addr
}

// Addr is the client's address of the family (v6 or not).
func (o *Outside) Addr(v6 bool) netip.Addr {
	if v6 {
		return o.IPv6
	}
	return o.IPv4
}

// AddOutside links a client namespace named name to c's router. The
// router hashes multipath routes over the L4 header (both families), so
// the connections of one client spread over ECMP next hops. A cluster has
// at most one (its addresses are fixed): Outside returns it.
func (c *Cluster) AddOutside(name string) (*Outside, error) {
	if c.outside != nil {
		// A second link with the same subnet on the router would leave
		// one of the two clients unreachable.
		return nil, fmt.Errorf("lab: cluster %s has an outside client already (%s); use Cluster.Outside", c.Name, c.outside.Name())
	}
	n, err := c.lab.AddNode(name) // a node's namespace: no IPv6 DAD to wait for
	if err != nil {
		return nil, err
	}
	ns := n.Netns
	o := &Outside{Netns: ns, Cluster: c,
		IPv4: netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + c.Index)}),
		IPv6: netip.MustParseAddr(fmt.Sprintf("2001:db8:%x::2", c.Index))}
	r4 := netip.AddrFrom4([4]byte{198, 51, 100, 1})
	r6 := netip.MustParseAddr(fmt.Sprintf("2001:db8:%x::1", c.Index))
	_, err = c.lab.LinkWith(LinkOptions{A: ns, B: c.Router, AName: "eth0",
		AAddrs: []netip.Prefix{netip.PrefixFrom(o.IPv4, 24), netip.PrefixFrom(o.IPv6, 64)},
		BAddrs: []netip.Prefix{netip.PrefixFrom(r4, 24), netip.PrefixFrom(r6, 64)}})
	if err != nil {
		return nil, err
	}
	if err := ns.AddRoute(netip.Prefix{}, r4); err != nil {
		return nil, err
	}
	if err := ns.AddRoute(netip.MustParsePrefix("::/0"), r6); err != nil {
		return nil, err
	}
	if err := c.Router.Do(func() error {
		for _, k := range []string{"net/ipv4/fib_multipath_hash_policy", "net/ipv6/fib_multipath_hash_policy"} {
			if err := os.WriteFile("/proc/sys/"+k, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("lab: multipath hashing on %s: %w", c.Router.Name(), err)
	}
	c.outside = o
	return o, nil
}

// Outside returns the cluster's outside client, adding it (named name)
// the first time.
func (c *Cluster) Outside(name string) (*Outside, error) {
	if c.outside != nil {
		return c.outside, nil
	}
	return c.AddOutside(name)
}

// RouteVia routes dst on the cluster's router to the given nodes of the
// cluster (from 1), over all of them (ECMP) when there are several; no
// node removes the route.
func (o *Outside) RouteVia(dst netip.Prefix, nodes ...int) error {
	h, err := o.Cluster.Router.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	r := &netlink.Route{Dst: prefixToIPNet(dst.Masked())}
	if len(nodes) == 0 {
		if err := h.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("lab: remove route %s on %s: %w", dst, o.Cluster.Router.Name(), err)
		}
		return nil
	}
	for _, j := range nodes {
		via := o.Cluster.NodeIPs(j)[0]
		if dst.Addr().Is6() {
			via = o.Cluster.NodeIPs(j)[1]
		}
		r.MultiPath = append(r.MultiPath, &netlink.NexthopInfo{Gw: net.IP(via.AsSlice())})
	}
	if len(r.MultiPath) == 1 {
		r.Gw, r.MultiPath = r.MultiPath[0].Gw, nil
	}
	if err := h.RouteReplace(r); err != nil {
		return fmt.Errorf("lab: route %s via nodes %v on %s: %w", dst, nodes, o.Cluster.Router.Name(), err)
	}
	return nil
}
