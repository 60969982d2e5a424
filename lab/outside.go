package lab

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// Hosts outside the mesh: clients in the datacenter that reach services
// through their load-balancer and external addresses, the way the mesh's
// users' clients do. Two places a client can sit:
//
//   - behind the cluster's router (AddOutsideClient): a routed network of
//     its own, so the router (the top-of-rack router) must know where the
//     service addresses are, from BGP or from static routes;
//   - on the cluster's node segment (AddSegmentHost): the bridge the nodes
//     sit on, so the client resolves service addresses with ARP and NDP,
//     which L2 announcements answer.
//
// Address plan for cluster i (see mesh.go):
//
//	outside client k   10.(100+i).(200+k).2/30, fd10:i:(c8+k)::2/64; router .1 / ::1
//	segment host k     10.(100+i).0.(200+k)/24, fd10:i::(200+k)/64 (hex)

// Outside is a host outside the mesh.
type Outside struct {
	*Node
	// IPs are its addresses (IPv4, IPv6).
	IPs []netip.Addr
	// Gateway is where its default routes point (IPv4, IPv6): the
	// cluster's router.
	Gateway []netip.Addr
	// Dev is its interface (in its namespace).
	Dev string
}

// Addr returns its address of the family.
func (o *Outside) Addr(v6 bool) netip.Addr {
	for _, a := range o.IPs {
		if a.Is6() == v6 {
			return a
		}
	}
	return netip.Addr{}
}

// AddOutsideClient adds host number k (1..50) behind the cluster's router:
// its own /30 and /64 to the router, default routes through it.
func (c *Cluster) AddOutsideClient(ctx context.Context, k int) (*Outside, error) {
	if k < 1 || k > 50 {
		return nil, fmt.Errorf("lab: outside client %d out of range 1..50", k)
	}
	n, err := c.lab.AddNode(fmt.Sprintf("%s-out%d", c.Name, k))
	if err != nil {
		return nil, err
	}
	r4 := netip.AddrFrom4([4]byte{10, byte(100 + c.Index), byte(200 + k), 1})
	h4 := netip.AddrFrom4([4]byte{10, byte(100 + c.Index), byte(200 + k), 2})
	r6 := netip.MustParseAddr(fmt.Sprintf("fd10:%x:%x::1", c.Index, 0xc8+k))
	h6 := netip.MustParseAddr(fmt.Sprintf("fd10:%x:%x::2", c.Index, 0xc8+k))
	lk, err := c.lab.LinkWith(LinkOptions{A: n, B: c.Router, AName: "eth0", BName: fmt.Sprintf("out%d", k),
		AAddrs: []netip.Prefix{netip.PrefixFrom(h4, 30), netip.PrefixFrom(h6, 64)},
		BAddrs: []netip.Prefix{netip.PrefixFrom(r4, 30), netip.PrefixFrom(r6, 64)}})
	if err != nil {
		return nil, err
	}
	if err := n.AddRoute(netip.Prefix{}, r4); err != nil {
		return nil, err
	}
	if err := n.AddRoute(netip.MustParsePrefix("::/0"), r6); err != nil {
		return nil, err
	}
	return &Outside{Node: n, IPs: []netip.Addr{h4, h6}, Gateway: []netip.Addr{r4, r6}, Dev: lk.AName}, nil
}

// AddSegmentHost adds host number k (1..50) on the cluster's node segment
// (the router's bridge), next to the nodes, with default routes through
// the router.
func (c *Cluster) AddSegmentHost(ctx context.Context, k int) (*Outside, error) {
	if k < 1 || k > 50 {
		return nil, fmt.Errorf("lab: segment host %d out of range 1..50", k)
	}
	n, err := c.lab.AddNode(fmt.Sprintf("%s-seg%d", c.Name, k))
	if err != nil {
		return nil, err
	}
	ip4, ip6 := c.underlay4(200+k), c.underlay6(200+k)
	lk, err := c.lab.LinkWith(LinkOptions{A: n, B: c.Router, AName: "eth0", BName: fmt.Sprintf("seg%d", k),
		AAddrs: []netip.Prefix{netip.PrefixFrom(ip4, 24), netip.PrefixFrom(ip6, 64)}})
	if err != nil {
		return nil, err
	}
	h, err := c.Router.Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	port, err := h.LinkByName(lk.BName)
	if err == nil {
		var br netlink.Link
		if br, err = h.LinkByName("br0"); err == nil {
			err = h.LinkSetMaster(port, br)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("lab: attach %s to the bridge: %w", lk.BName, err)
	}
	gw := c.RouterIPs()
	if err := n.AddRoute(netip.Prefix{}, gw[0]); err != nil {
		return nil, err
	}
	if err := n.AddRoute(netip.MustParsePrefix("::/0"), gw[1]); err != nil {
		return nil, err
	}
	return &Outside{Node: n, IPs: []netip.Addr{ip4, ip6}, Gateway: gw, Dev: lk.AName}, nil
}
