package endpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// Gateway addresses the pod routes through. No device owns them: the pod
// reaches them through a permanent neighbour entry pointing at the host veth.
var (
	GatewayIPv4 = netip.MustParseAddr("169.254.1.1")
	GatewayIPv6 = netip.MustParseAddr("fe80::1")
)

// DefaultPodIfName is the interface name a pod sees when Spec.PodIfName is empty.
const DefaultPodIfName = "eth0"

// Spec describes one pod's plumbing.
type Spec struct {
	NetnsPath  string       // e.g. /var/run/netns/pod1 or /proc/<pid>/ns/net
	HostIfName string       // host side of the veth, at most 15 bytes (see HostIfName)
	PodIfName  string       // inside the pod; DefaultPodIfName when empty
	Addrs      []netip.Addr // pod addresses, installed as /32 and /128
	MTU        int          // both ends; 1500 when zero
}

// Result identifies the created (or found) pair.
type Result struct {
	HostIfIndex int
	HostMAC     net.HardwareAddr
	PodMAC      net.HardwareAddr
}

// HostIfName derives the host-side veth name of a pod: stable across agent
// restarts, unique per node/namespace/name, and within IFNAMSIZ.
func HostIfName(node, namespace, name string) string {
	sum := sha256.Sum256([]byte(node + "\x00" + namespace + "\x00" + name))
	return hostIfPrefix + hex.EncodeToString(sum[:])[:hostIfHexLen]
}

const (
	hostIfPrefix = "isth"
	hostIfHexLen = 10
)

// isHostIfName reports whether name has the form HostIfName gives.
func isHostIfName(name string) bool {
	h, ok := strings.CutPrefix(name, hostIfPrefix)
	if !ok || len(h) != hostIfHexLen {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil
}

// List returns the names of the node's veths named like HostIfName's:
// the host ends of pods, this agent's or leftovers of an add that did not
// finish.
func List() ([]string, error) {
	links, err := nldump.Retry(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var names []string
	for _, l := range links {
		if l.Type() == "veth" && isHostIfName(l.Attrs().Name) {
			names = append(names, l.Attrs().Name)
		}
	}
	return names, nil
}

// CheckNetns reports whether path names an existing network namespace.
func CheckNetns(path string) error {
	if path == "" {
		return errors.New("netns path is empty")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("netns %s does not exist", path)
		}
		return fmt.Errorf("netns %s: %w", path, err)
	}
	// A bind-mounted namespace (ip netns add) and /proc/<pid>/ns/net both live on nsfs.
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("netns %s is not a network namespace (expected an nsfs file such as /var/run/netns/<name> or /proc/<pid>/ns/net)", path)
	}
	return nil
}

// Create builds the veth pair for spec and configures both ends. On any
// failure it removes what it created and returns an error naming the step and
// the device.
func Create(spec Spec) (res Result, err error) {
	if spec.PodIfName == "" {
		spec.PodIfName = DefaultPodIfName
	}
	if spec.MTU == 0 {
		spec.MTU = 1500
	}
	if err := spec.validate(); err != nil {
		return Result{}, err
	}
	if err := CheckNetns(spec.NetnsPath); err != nil {
		return Result{}, err
	}
	ns, err := netns.GetFromPath(spec.NetnsPath)
	if err != nil {
		return Result{}, fmt.Errorf("open netns %s: %w", spec.NetnsPath, err)
	}
	defer ns.Close()
	pod, err := netlink.NewHandleAt(ns)
	if err != nil {
		return Result{}, fmt.Errorf("netlink handle in netns %s: %w", spec.NetnsPath, err)
	}
	defer pod.Close()

	// The peer is created directly inside the pod namespace (by fd) under its
	// final name: one netlink call, no temporary device in the node namespace.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: spec.HostIfName, MTU: spec.MTU, TxQLen: -1},
		PeerName:      spec.PodIfName,
		PeerNamespace: netlink.NsFd(ns),
		PeerTxQLen:    -1,
	}
	if err := netlink.LinkAdd(veth); err != nil {
		// Which name is taken, looked up only now: an add makes no
		// netlink round trip it does not need.
		if _, lerr := netlink.LinkByName(spec.HostIfName); lerr == nil {
			return Result{}, fmt.Errorf("host interface %s already exists", spec.HostIfName)
		}
		if _, lerr := pod.LinkByName(spec.PodIfName); lerr == nil {
			return Result{}, fmt.Errorf("netns %s already has an interface %s", spec.NetnsPath, spec.PodIfName)
		}
		return Result{}, fmt.Errorf("create veth %s with peer %s in %s: %w", spec.HostIfName, spec.PodIfName, spec.NetnsPath, err)
	}
	defer func() {
		if err != nil {
			// Removing the host end removes the peer, its addresses, and every
			// route and neighbour through either end.
			_ = Delete(spec.HostIfName)
		}
	}()

	host, err := netlink.LinkByName(spec.HostIfName)
	if err != nil {
		return Result{}, fmt.Errorf("find %s after creating it: %w", spec.HostIfName, err)
	}
	peer, err := pod.LinkByName(spec.PodIfName)
	if err != nil {
		return Result{}, fmt.Errorf("find %s in %s after creating it: %w", spec.PodIfName, spec.NetnsPath, err)
	}
	res = Result{HostIfIndex: host.Attrs().Index, HostMAC: host.Attrs().HardwareAddr, PodMAC: peer.Attrs().HardwareAddr}

	hasV6 := false
	for _, a := range spec.Addrs {
		hasV6 = hasV6 || a.Is6()
	}
	if err := configureHost(spec.HostIfName, hasV6); err != nil {
		return Result{}, err
	}
	if hasV6 {
		// Before the device goes up, so neither the pod's addresses nor its
		// link-local address sit in tentative state.
		if err := inNetns(ns, func() error { return setIfSysctls(6, spec.PodIfName, map[string]string{"accept_dad": "0"}) }); err != nil {
			return Result{}, fmt.Errorf("disable DAD on %s in %s: %w", spec.PodIfName, spec.NetnsPath, err)
		}
	}
	for _, a := range spec.Addrs {
		addr := &netlink.Addr{IPNet: hostPrefix(a)}
		if a.Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := pod.AddrAdd(peer, addr); err != nil {
			return Result{}, fmt.Errorf("add address %s to %s in %s: %w", a, spec.PodIfName, spec.NetnsPath, err)
		}
	}

	if lo, err := pod.LinkByName("lo"); err == nil {
		if err := pod.LinkSetUp(lo); err != nil {
			return Result{}, fmt.Errorf("set lo up in %s: %w", spec.NetnsPath, err)
		}
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return Result{}, fmt.Errorf("set %s up: %w", spec.HostIfName, err)
	}
	if err := pod.LinkSetUp(peer); err != nil {
		return Result{}, fmt.Errorf("set %s up in %s: %w", spec.PodIfName, spec.NetnsPath, err)
	}

	if err := configurePodRoutes(pod, peer.Attrs().Index, res.HostMAC, spec); err != nil {
		return Result{}, err
	}
	for _, a := range spec.Addrs {
		r := &netlink.Route{LinkIndex: res.HostIfIndex, Dst: hostPrefix(a), Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteReplace(r); err != nil {
			return Result{}, fmt.Errorf("add route %s dev %s: %w", r.Dst, spec.HostIfName, err)
		}
	}
	return res, nil
}

func (s Spec) validate() error {
	if s.HostIfName == "" || len(s.HostIfName) > unix.IFNAMSIZ-1 {
		return fmt.Errorf("host interface name %q must be 1 to %d bytes", s.HostIfName, unix.IFNAMSIZ-1)
	}
	if len(s.PodIfName) > unix.IFNAMSIZ-1 {
		return fmt.Errorf("pod interface name %q must be at most %d bytes", s.PodIfName, unix.IFNAMSIZ-1)
	}
	if len(s.Addrs) == 0 {
		return errors.New("no pod addresses given")
	}
	for _, a := range s.Addrs {
		if !a.IsValid() || a.Is4In6() || a.IsUnspecified() {
			return fmt.Errorf("invalid pod address %s", a)
		}
	}
	if s.MTU < 68 || s.MTU > 65535 {
		return fmt.Errorf("MTU %d out of range 68..65535", s.MTU)
	}
	return nil
}

// configureHost sets the host veth's sysctls: it forwards, accepts pod
// sources without a reverse-path check, and answers no ARP on anyone's behalf.
func configureHost(ifname string, v6 bool) error {
	if err := setIfSysctls(4, ifname, map[string]string{"forwarding": "1", "rp_filter": "0", "proxy_arp": "0"}); err != nil {
		return fmt.Errorf("configure %s: %w", ifname, err)
	}
	if v6 {
		if err := setIfSysctls(6, ifname, map[string]string{"forwarding": "1", "accept_dad": "0"}); err != nil {
			return fmt.Errorf("configure %s: %w", ifname, err)
		}
	}
	return nil
}

// configurePodRoutes installs, inside the pod, the gateway routes and the
// permanent gateway neighbours for each family the pod has an address in.
func configurePodRoutes(pod *netlink.Handle, ifindex int, hostMAC net.HardwareAddr, spec Spec) error {
	var v4, v6 bool
	for _, a := range spec.Addrs {
		v4, v6 = v4 || a.Is4(), v6 || a.Is6()
	}
	type gw struct {
		on     bool
		addr   netip.Addr
		family int
		def    netip.Prefix
	}
	for _, g := range []gw{
		{v4, GatewayIPv4, netlink.FAMILY_V4, netip.MustParsePrefix("0.0.0.0/0")},
		{v6, GatewayIPv6, netlink.FAMILY_V6, netip.MustParsePrefix("::/0")},
	} {
		if !g.on {
			continue
		}
		neigh := &netlink.Neigh{
			LinkIndex:    ifindex,
			Family:       g.family,
			State:        netlink.NUD_PERMANENT,
			IP:           g.addr.AsSlice(),
			HardwareAddr: hostMAC,
		}
		if err := pod.NeighSet(neigh); err != nil {
			return fmt.Errorf("add neighbour %s lladdr %s dev %s in %s: %w", g.addr, hostMAC, spec.PodIfName, spec.NetnsPath, err)
		}
		routes := []*netlink.Route{
			{LinkIndex: ifindex, Dst: prefixNet(g.def), Gw: g.addr.AsSlice()},
		}
		if g.addr.Is4() {
			// The IPv4 gateway is outside every pod prefix: make it on-link first.
			routes = append([]*netlink.Route{{LinkIndex: ifindex, Dst: hostPrefix(g.addr), Scope: netlink.SCOPE_LINK}}, routes...)
		}
		for _, r := range routes {
			if err := pod.RouteReplace(r); err != nil {
				return fmt.Errorf("add route %s dev %s in %s: %w", r, spec.PodIfName, spec.NetnsPath, err)
			}
		}
	}
	return nil
}

// Delete removes the pair whose host end is hostIfName, together with the
// peer and every route through it. A missing device is not an error.
func Delete(hostIfName string) error {
	link, err := netlink.LinkByName(hostIfName)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("find %s: %w", hostIfName, err)
	}
	if err := netlink.LinkDel(link); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", hostIfName, err)
	}
	return nil
}

// ErrNotFound is returned (wrapped) by Lookup when the host veth is gone.
var ErrNotFound = errors.New("no such device")

// Lookup finds an existing pair by its host end, e.g. after an agent restart.
func Lookup(hostIfName string) (Result, error) {
	link, err := netlink.LinkByName(hostIfName)
	if err != nil {
		if isNotFound(err) {
			return Result{}, fmt.Errorf("lookup %s: %w", hostIfName, ErrNotFound)
		}
		return Result{}, fmt.Errorf("lookup %s: %w", hostIfName, err)
	}
	if link.Type() != "veth" {
		return Result{}, fmt.Errorf("lookup %s: is a %s device, not a veth", hostIfName, link.Type())
	}
	attrs := link.Attrs()
	res := Result{HostIfIndex: attrs.Index, HostMAC: attrs.HardwareAddr}
	peer, err := peerLink(attrs.NetNsID, attrs.ParentIndex)
	if err != nil {
		return Result{}, fmt.Errorf("lookup peer of %s: %w", hostIfName, err)
	}
	res.PodMAC = peer.Attrs().HardwareAddr
	return res, nil
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV)
}

func hostPrefix(a netip.Addr) *net.IPNet {
	return prefixNet(netip.PrefixFrom(a, a.BitLen()))
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func sysctlPath(family int, ifname, key string) string {
	return fmt.Sprintf("/proc/sys/net/ipv%d/conf/%s/%s", family, ifname, key)
}

// setIfSysctls writes per-interface sysctls in the calling thread's netns.
func setIfSysctls(family int, ifname string, kv map[string]string) error {
	for k, v := range kv {
		p := sysctlPath(family, ifname, k)
		// A new interface mostly has the value already (from the
		// namespace's defaults): a write would still take the RTNL lock
		// for forwarding, which IPv6 takes even for the same value, and
		// spins for it while pods are created around it.
		if cur, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(cur)) == v {
			continue
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			return fmt.Errorf("set %s=%s: %w", p, v, err)
		}
	}
	return nil
}

// PrepareNode turns on IPv4 and IPv6 forwarding in the node's namespace, the
// precondition for routing pod traffic to anything but local pods. With IPv6
// forwarding on, the kernel ignores router advertisements on interfaces with
// accept_ra=1: a node that gets its IPv6 default route by SLAAC needs
// accept_ra=2 on its uplink.
func PrepareNode() error {
	for _, p := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		if cur, err := os.ReadFile(p); err == nil && string(cur) == "1\n" {
			continue
		}
		if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("enable forwarding (%s): %w", p, err)
		}
	}
	return nil
}

// SetIPv6RouteMTU sets the MTU metric of the pod's IPv6 default route (the
// one through GatewayIPv6 on the pod interface with ifindex); 0 removes
// it. It reports whether it changed the route. BIG TCP uses it to leave
// room for the kernel's jumbo hop-by-hop header (agent/bigtcp).
func SetIPv6RouteMTU(pod *netlink.Handle, ifindex, mtu int) (bool, error) {
	routes, err := nldump.Retry(func() ([]netlink.Route, error) {
		return pod.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{LinkIndex: ifindex}, netlink.RT_FILTER_OIF)
	})
	if err != nil {
		return false, fmt.Errorf("list IPv6 routes: %w", err)
	}
	for _, r := range routes {
		if ones, _ := maskOfDst(r.Dst); ones != 0 || !r.Gw.Equal(GatewayIPv6.AsSlice()) || (r.Table != 0 && r.Table != unix.RT_TABLE_MAIN) {
			continue
		}
		if r.MTU == mtu {
			return false, nil
		}
		nr := &netlink.Route{LinkIndex: ifindex, Dst: prefixNet(netip.MustParsePrefix("::/0")), Gw: GatewayIPv6.AsSlice(), MTU: mtu}
		if err := pod.RouteReplace(nr); err != nil {
			return false, fmt.Errorf("set mtu %d on the IPv6 default route: %w", mtu, err)
		}
		return true, nil
	}
	return false, errors.New("the pod has no IPv6 default route through " + GatewayIPv6.String())
}

func maskOfDst(dst *net.IPNet) (int, int) {
	if dst == nil {
		return 0, 0
	}
	return dst.Mask.Size()
}
