package lab

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// SegmentClient is a host outside the mesh on a cluster's node segment
// (the router's bridge br0): what a client on the same L2 network as the
// nodes sees, e.g. of L2 announcements.
type SegmentClient struct {
	*Node
	Dev  string // its interface on the segment, "eth0"
	MAC  net.HardwareAddr
	IPv4 netip.Addr
	IPv6 netip.Addr
}

// AddSegmentClient attaches a new namespace named name to the cluster's
// bridge, with host number host (11..99 are the nodes', 1 the router's) in
// the segment's IPv4 and IPv6 subnets.
func (c *Cluster) AddSegmentClient(name string, host int) (*SegmentClient, error) {
	if host < 100 || host > 254 {
		return nil, fmt.Errorf("lab: segment client host number %d: want 100-254 (lower ones are the router's and the nodes')", host)
	}
	n, err := c.lab.AddNode(name)
	if err != nil {
		return nil, err
	}
	ip4, ip6 := c.underlay4(host), c.underlay6(host)
	if err := c.attachToBridge(n, fmt.Sprintf("cl%d", host), netip.PrefixFrom(ip4, 24)); err != nil {
		return nil, err
	}
	h, err := n.Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	l, err := h.LinkByName("eth0")
	if err != nil {
		return nil, err
	}
	if err := addAddr(h, l, netip.PrefixFrom(ip6, 64)); err != nil {
		return nil, err
	}
	return &SegmentClient{Node: n, Dev: "eth0", MAC: l.Attrs().HardwareAddr, IPv4: ip4, IPv6: ip6}, nil
}

// SegmentAddr returns address host (e.g. 100) in the cluster's node
// segment: IPv4 10.(100+i).0.host, or IPv6 fd10:i::host (host in hex).
func (c *Cluster) SegmentAddr(host int, v6 bool) netip.Addr {
	if v6 {
		return c.underlay6(host)
	}
	return c.underlay4(host)
}

// NodeMAC returns the MAC of node j's (from 1) interface on the segment.
func (c *Cluster) NodeMAC(j int) (net.HardwareAddr, error) {
	if j < 1 || j > len(c.Nodes) {
		return nil, fmt.Errorf("lab: no node %d in %s", j, c.Name)
	}
	h, err := c.Nodes[j-1].Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	var l netlink.Link
	if l, err = h.LinkByName("eth0"); err != nil {
		return nil, err
	}
	return l.Attrs().HardwareAddr, nil
}
