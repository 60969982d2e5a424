package endpoint

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nlbatch"
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

	// Sizes are the GSO/GRO sizes both ends are created with (BIG TCP);
	// zero fields keep the kernel's.
	Sizes Sizes
	// IPv6RouteMTU is the MTU metric of the pod's IPv6 default route (0:
	// none); BIG TCP leaves room for its jumbo header with it.
	IPv6RouteMTU int
	// Clsact creates a clsact qdisc on the host end before BeforeUp, for
	// its tc filters, while the end is down: on a device that is up the
	// kernel would wait for an RCU grace period under the RTNL lock.
	Clsact bool
	// BeforeUp, when set, runs while the host end is down (beside the pod
	// end's configuration, on another goroutine), with the host end's
	// index: the datapath attaches there, before any packet can pass (the
	// pair has no carrier until the host end is up).
	BeforeUp func(hostIfIndex int) error
}

// Sizes are a device's GSO and GRO size limits (IFLA_GSO_MAX_SIZE and
// the rest); 0 leaves one as the kernel has it.
type Sizes struct {
	GSO, GRO, GSOIPv4, GROIPv4 uint32
}

// Result identifies the created (or found) pair.
type Result struct {
	HostIfIndex int
	HostMAC     net.HardwareAddr
	PodMAC      net.HardwareAddr

	// Host and Pod are both ends as the kernel reported them after
	// creating them (Create only).
	Host, Pod netlink.Link
	// Steps says how long each step of Create took, for the agent's log.
	Steps string
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
//
// The kernel work is four batches of netlink requests (see
// internal/nlbatch): the pair, created with its sizes; the programs (Spec.BeforeUp); the host end up with its routes; the pod's
// addresses, neighbours and routes. Each batch queues once for the RTNL
// lock, where one request at a time queued twenty times behind the other
// pods of a burst. The pod's interface comes back from the kernel's
// notification in the pod namespace and the host's from the echo of the
// create, so nothing is looked up.
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
	hasV6 := slices.ContainsFunc(spec.Addrs, netip.Addr.Is6)
	var steps []string
	last := time.Now()
	step := func(name string) {
		now := time.Now()
		steps = append(steps, fmt.Sprintf("%s=%s", name, now.Sub(last).Round(100*time.Microsecond)))
		last = now
	}
	defer func() { res.Steps = strings.Join(steps, " ") }()

	// In the pod namespace: a socket that hears of the pod's interface,
	// and, with IPv6, no duplicate address detection on interfaces created
	// from now on, so that neither the pod end's link-local address nor
	// its addresses are ever tentative. The namespace is the pod's own, so
	// its defaults are too.
	var pod *nlbatch.Socket
	loUp := false
	if err := inNetns(ns, func() error {
		// Whether lo is up (the container runtime's loopback plugin sets
		// it up), asked without the RTNL lock.
		loUp = ifUp("lo")
		if hasV6 {
			if err := setIfSysctls(6, "default", map[string]string{"accept_dad": "0"}); err != nil {
				return fmt.Errorf("disable DAD: %w", err)
			}
		}
		pod, err = nlbatch.Open(unix.RTMGRP_LINK)
		return err
	}); err != nil {
		return Result{}, fmt.Errorf("prepare netns %s: %w", spec.NetnsPath, err)
	}
	defer pod.Close()
	host, err := nlbatch.Open(0)
	if err != nil {
		return Result{}, err
	}
	defer host.Close()
	step("sockets")

	// The pair, the peer directly in the pod namespace under its final
	// name, both ends with their sizes; the host end stays down until its
	// sysctls and programs are set, the pod end until its addresses are.
	podMAC, err := randomMAC()
	if err != nil {
		return Result{}, err
	}
	add := newVethRequest(spec, int(ns), podMAC)
	if err := host.Do(add); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// Which name is taken, looked up only now: an add makes no
			// netlink round trip it does not need.
			if _, lerr := netlink.LinkByName(spec.HostIfName); lerr == nil {
				return Result{}, fmt.Errorf("host interface %s already exists", spec.HostIfName)
			}
			return Result{}, fmt.Errorf("netns %s already has an interface %s", spec.NetnsPath, spec.PodIfName)
		}
		return Result{}, err
	}
	defer func() {
		if err != nil {
			// Removing the host end removes the peer, its addresses, and every
			// route and neighbour through either end.
			_ = Delete(spec.HostIfName)
		}
	}()
	step("create")
	hostLink, err := linkOf(add)
	if err != nil {
		return Result{}, fmt.Errorf("create veth %s: %w", spec.HostIfName, err)
	}
	note, err := pod.Wait(nlbatch.Timeout, func(m syscall.NetlinkMessage) bool {
		if m.Header.Type != unix.RTM_NEWLINK {
			return false
		}
		l, err := netlink.LinkDeserialize(nil, m.Data)
		return err == nil && l.Attrs().Name == spec.PodIfName
	})
	if err != nil {
		return Result{}, fmt.Errorf("wait for %s in %s: %w", spec.PodIfName, spec.NetnsPath, err)
	}
	podLink, err := netlink.LinkDeserialize(nil, note.Data)
	if err != nil {
		return Result{}, fmt.Errorf("read %s in %s: %w", spec.PodIfName, spec.NetnsPath, err)
	}
	step("notified")
	hostIndex, podIndex := hostLink.Attrs().Index, podLink.Attrs().Index
	res = Result{HostIfIndex: hostIndex, HostMAC: hostLink.Attrs().HardwareAddr, PodMAC: podLink.Attrs().HardwareAddr, Host: hostLink, Pod: podLink}

	if err := configureHost(spec.HostIfName, hasV6); err != nil {
		return Result{}, err
	}
	// The host end (its qdisc, the programs, then up with its routes)
	// while the pod end is configured: two sockets, and each batch waits
	// for the RTNL lock beside the other instead of after it.
	// Whether the node has IPv6 (not ipv6.disable=1), from this thread,
	// which is in the node's namespace.
	_, err = os.Stat(sysctlPath(6, spec.HostIfName, "addr_gen_mode"))
	nodeV6 := err == nil
	hostDone := make(chan error, 1)
	go func() {
		defer func() {
			// As in the caller's goroutine (an API handler's, which the
			// HTTP server recovers): a bug fails this add, not the agent.
			if r := recover(); r != nil {
				hostDone <- fmt.Errorf("configure %s: panic: %v\n%s", spec.HostIfName, r, debug.Stack())
			}
		}()
		hostDone <- hostSide(host, spec, hostIndex, res.PodMAC, nodeV6)
	}()

	podIf := spec.PodIfName + " in " + spec.NetnsPath
	var inPod []*nlbatch.Request
	for _, a := range spec.Addrs {
		inPod = append(inPod, addrRequest(podIf, podIndex, a))
	}
	if !loUp {
		inPod = append(inPod, setUpRequest("lo in "+spec.NetnsPath, loopbackIndex))
	}
	inPod = append(inPod, setUpRequest(podIf, podIndex))
	for _, gw := range []struct {
		addr netip.Addr
		def  netip.Prefix
		mtu  int
	}{
		{GatewayIPv4, netip.MustParsePrefix("0.0.0.0/0"), 0},
		{GatewayIPv6, netip.MustParsePrefix("::/0"), spec.IPv6RouteMTU},
	} {
		if !slices.ContainsFunc(spec.Addrs, func(a netip.Addr) bool { return a.Is4() == gw.addr.Is4() }) {
			continue
		}
		inPod = append(inPod, neighRequest(podIf, podIndex, gw.addr, res.HostMAC),
			routeRequest(podIf, podIndex, gw.def, gw.addr, gw.mtu))
	}
	podErr := pod.Do(inPod...)
	step("pod")
	if err := <-hostDone; err != nil {
		return Result{}, err
	}
	if podErr != nil {
		return Result{}, podErr
	}
	step("host")
	return res, nil
}

// hostSide configures the host end of a pair created down: the clsact
// qdisc (Spec.Clsact) and Spec.BeforeUp while it is down, then the end
// up with its routes and the neighbour entries of the pod's IPv6
// addresses. It may run on any thread: it uses the host socket only.
func hostSide(host *nlbatch.Socket, spec Spec, index int, podMAC net.HardwareAddr, nodeV6 bool) error {
	if spec.Clsact {
		if err := host.Do(clsactRequest(spec.HostIfName, index)); err != nil {
			return err
		}
	}
	if spec.BeforeUp != nil {
		if err := spec.BeforeUp(index); err != nil {
			return err
		}
	}
	// No IPv6 address on the host end: a link-local one per veth is a
	// fe80::/64 route beside every other pod's, which the kernel walks to
	// add the next, an address event every address watcher of the node
	// hears, and DAD work taking the RTNL lock. The host reaches the pod's
	// IPv6 addresses through permanent neighbour entries, with no
	// solicitation (which would need that address).
	var up []*nlbatch.Request
	if nodeV6 { // a node without IPv6 refuses the request
		up = append(up, addrGenNoneRequest(spec.HostIfName, index))
	}
	up = append(up, setUpRequest(spec.HostIfName, index))
	for _, a := range spec.Addrs {
		up = append(up, routeRequest(spec.HostIfName, index, netip.PrefixFrom(a, a.BitLen()), netip.Addr{}, 0))
		if a.Is6() {
			up = append(up, neighRequest(spec.HostIfName, index, a, podMAC))
		}
	}
	return host.Do(up...)
}

// ifUp reports whether interface name of the calling thread's namespace
// is up (SIOCGIFFLAGS, which reads under RCU); false when it cannot tell.
func ifUp(name string) bool {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return false
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return false
	}
	return ifr.Uint16()&unix.IFF_UP != 0
}

// loopbackIndex is the interface index of lo in every network namespace.
const loopbackIndex = 1

// newVethRequest creates the pair of spec, both ends down, the pod end in
// the namespace of podNsFd with podMAC, and echoes the host end.
func newVethRequest(spec Spec, podNsFd int, podMAC net.HardwareAddr) *nlbatch.Request {
	r := nlbatch.New(fmt.Sprintf("create veth %s with peer %s in %s", spec.HostIfName, spec.PodIfName, spec.NetnsPath),
		unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ECHO, nl.NewIfInfomsg(unix.AF_UNSPEC))
	deviceAttrs := func(add func(int, []byte), name string) {
		add(unix.IFLA_IFNAME, nl.ZeroTerminated(name))
		add(unix.IFLA_MTU, nl.Uint32Attr(uint32(spec.MTU)))
		// One queue each, as a veth uses: without the attributes it gets
		// one per CPU and then drops to one, waiting for an RCU grace
		// period under the RTNL lock.
		add(unix.IFLA_NUM_TX_QUEUES, nl.Uint32Attr(1))
		add(unix.IFLA_NUM_RX_QUEUES, nl.Uint32Attr(1))
		for _, s := range []struct {
			attr int
			v    uint32
		}{
			// IPv6 sizes first, as the kernel resets the IPv4 ones when
			// an IPv6 size at or below 64 KiB is set.
			{unix.IFLA_GSO_MAX_SIZE, spec.Sizes.GSO}, {unix.IFLA_GRO_MAX_SIZE, spec.Sizes.GRO},
			{unix.IFLA_GSO_IPV4_MAX_SIZE, spec.Sizes.GSOIPv4}, {unix.IFLA_GRO_IPV4_MAX_SIZE, spec.Sizes.GROIPv4},
		} {
			if s.v != 0 {
				add(s.attr, nl.Uint32Attr(s.v))
			}
		}
	}
	deviceAttrs(func(t int, b []byte) { r.Msg.AddData(nl.NewRtAttr(t, b)) }, spec.HostIfName)
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("veth"))
	data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
	peer := data.AddRtAttr(nl.VETH_INFO_PEER, nil)
	// Down: a veth end cannot open before its pair is complete (ENOTCONN).
	nl.NewIfInfomsgChild(peer, unix.AF_UNSPEC)
	deviceAttrs(func(t int, b []byte) { peer.AddRtAttr(t, b) }, spec.PodIfName)
	peer.AddRtAttr(unix.IFLA_ADDRESS, podMAC)
	peer.AddRtAttr(unix.IFLA_NET_NS_FD, nl.Uint32Attr(uint32(podNsFd)))
	r.Msg.AddData(info)
	return r
}

// linkOf is the link a request with NLM_F_ECHO created.
func linkOf(r *nlbatch.Request) (netlink.Link, error) {
	for _, m := range r.Replies {
		if m.Header.Type == unix.RTM_NEWLINK {
			return netlink.LinkDeserialize(nil, m.Data)
		}
	}
	return nil, errors.New("the kernel did not echo the new device")
}

func clsactRequest(dev string, index int) *nlbatch.Request {
	m := &nl.TcMsg{Family: unix.AF_UNSPEC, Ifindex: int32(index), Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}
	return nlbatch.New("add clsact qdisc to "+dev, unix.RTM_NEWQDISC, unix.NLM_F_CREATE|unix.NLM_F_EXCL, m,
		nl.NewRtAttr(nl.TCA_KIND, nl.ZeroTerminated("clsact")))
}

// addrGenNoneRequest turns off IPv6 address generation (no link-local
// address) on a device that is down.
func addrGenNoneRequest(dev string, index int) *nlbatch.Request {
	m := nl.NewIfInfomsg(unix.AF_UNSPEC)
	m.Index = int32(index)
	af := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	af.AddRtAttr(unix.AF_INET6, nil).AddRtAttr(unix.IFLA_INET6_ADDR_GEN_MODE, []byte{nl.IN6_ADDR_GEN_MODE_NONE})
	return nlbatch.New("turn off IPv6 address generation on "+dev, unix.RTM_NEWLINK, 0, m, af)
}

func setUpRequest(what string, index int) *nlbatch.Request {
	m := nl.NewIfInfomsg(unix.AF_UNSPEC)
	m.Index = int32(index)
	m.Flags, m.Change = unix.IFF_UP, unix.IFF_UP
	return nlbatch.New("set "+what+" up", unix.RTM_NEWLINK, 0, m)
}

func addrRequest(dev string, index int, a netip.Addr) *nlbatch.Request {
	m := nl.NewIfAddrmsg(family(a))
	m.Index = uint32(index)
	m.Prefixlen = uint8(a.BitLen())
	if a.Is6() {
		m.Flags = unix.IFA_F_NODAD
	}
	return nlbatch.New(fmt.Sprintf("add address %s to %s", a, dev), unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, m,
		nl.NewRtAttr(unix.IFA_LOCAL, a.AsSlice()), nl.NewRtAttr(unix.IFA_ADDRESS, a.AsSlice()))
}

// neighRequest makes a permanent neighbour entry (replacing one).
func neighRequest(dev string, index int, ip netip.Addr, mac net.HardwareAddr) *nlbatch.Request {
	m := &netlink.Ndmsg{Family: uint8(family(ip)), Index: uint32(index), State: netlink.NUD_PERMANENT}
	return nlbatch.New(fmt.Sprintf("add neighbour %s lladdr %s dev %s", ip, mac, dev), unix.RTM_NEWNEIGH, unix.NLM_F_CREATE|unix.NLM_F_REPLACE,
		m, nl.NewRtAttr(unix.NDA_DST, ip.AsSlice()), nl.NewRtAttr(unix.NDA_LLADDR, mac))
}

// routeRequest adds (or replaces) a main-table route to dst through dev:
// on-link without gw, through gw otherwise; mtu > 0 is its MTU metric.
func routeRequest(dev string, index int, dst netip.Prefix, gw netip.Addr, mtu int) *nlbatch.Request {
	m := nl.NewRtMsg()
	m.Family = uint8(family(dst.Addr()))
	m.Dst_len = uint8(dst.Bits())
	if !gw.IsValid() {
		m.Scope = unix.RT_SCOPE_LINK
	}
	what := fmt.Sprintf("add route %s dev %s", dst, dev)
	attrs := []nl.NetlinkRequestData{m}
	if dst.Bits() > 0 {
		attrs = append(attrs, nl.NewRtAttr(unix.RTA_DST, dst.Addr().AsSlice()))
	}
	if gw.IsValid() {
		what = fmt.Sprintf("add route %s via %s dev %s", dst, gw, dev)
		if gw.Is4() {
			// The gateway is outside every pod prefix and no device
			// has it: on-link through dev.
			m.Flags |= unix.RTNH_F_ONLINK
		}
		attrs = append(attrs, nl.NewRtAttr(unix.RTA_GATEWAY, gw.AsSlice()))
	}
	attrs = append(attrs, nl.NewRtAttr(unix.RTA_OIF, nl.Uint32Attr(uint32(index))))
	if mtu > 0 {
		attrs = append(attrs, nl.NewRtAttr(unix.RTA_METRICS, nl.NewRtAttr(unix.RTAX_MTU, nl.Uint32Attr(uint32(mtu))).Serialize()))
	}
	return nlbatch.New(what, unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, attrs...)
}

func family(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// randomMAC is a random unicast, locally administered address, as the
// kernel gives a veth end that has none.
func randomMAC() (net.HardwareAddr, error) {
	mac := make(net.HardwareAddr, 6)
	if _, err := rand.Read(mac); err != nil {
		return nil, fmt.Errorf("random MAC address: %w", err)
	}
	mac[0] = mac[0]&^0x01 | 0x02
	return mac, nil
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
// sources without a reverse-path check, and answers no ARP on anyone's
// behalf. (It has no IPv6 address, so no DAD to turn off.)
func configureHost(ifname string, v6 bool) error {
	if err := setIfSysctls(4, ifname, map[string]string{"forwarding": "1", "rp_filter": "0", "proxy_arp": "0"}); err != nil {
		return fmt.Errorf("configure %s: %w", ifname, err)
	}
	if v6 {
		if err := setIfSysctls(6, ifname, map[string]string{"forwarding": "1"}); err != nil {
			return fmt.Errorf("configure %s: %w", ifname, err)
		}
	}
	return nil
}

// Delete removes the pair whose host end is hostIfName, together with the
// peer and every route through it. A missing device is not an error.
func Delete(hostIfName string) error {
	// By name, in one request: no lookup queueing for the RTNL lock first.
	s, err := nlbatch.Open(0)
	if err != nil {
		return fmt.Errorf("delete %s: %w", hostIfName, err)
	}
	defer s.Close()
	err = s.Do(nlbatch.New("delete "+hostIfName, unix.RTM_DELLINK, 0, nl.NewIfInfomsg(unix.AF_UNSPEC),
		nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(hostIfName))))
	if err != nil && !errors.Is(err, unix.ENODEV) {
		return err
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
