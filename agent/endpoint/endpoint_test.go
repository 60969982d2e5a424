package endpoint

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

func TestHostIfName(t *testing.T) {
	a := HostIfName("node1", "default", "web")
	if len(a) > 15 || !strings.HasPrefix(a, "isth") || len(a) != 14 {
		t.Fatalf("HostIfName = %q, want isth + 10 hex chars", a)
	}
	if a != HostIfName("node1", "default", "web") {
		t.Fatal("HostIfName is not stable")
	}
	for _, other := range []string{
		HostIfName("node2", "default", "web"),
		HostIfName("node1", "prod", "web"),
		HostIfName("node1", "default", "web2"),
		HostIfName("node1", "defaul", "tweb"),
	} {
		if other == a {
			t.Fatalf("HostIfName collides: %q", a)
		}
	}
}

func TestIsHostIfName(t *testing.T) {
	for name, want := range map[string]bool{
		HostIfName("node1", "default", "web"): true,
		"isth0123456789":                      true,
		"isthwg12345678":                      false, // not hex: the WireGuard device's form
		"isth012345678":                       false,
		"isth0123456789a":                     false,
		"eth0":                                false,
	} {
		if got := isHostIfName(name); got != want {
			t.Errorf("isHostIfName(%q) = %v, want %v", name, got, want)
		}
	}
}

// List finds the pod veths by their names, and nothing else.
func TestList(t *testing.T) {
	l := newLab(t)
	pod := HostIfName("node1", "default", "listed")
	var names []string
	var err error
	in(t, l.nodePath, func() {
		for _, n := range []string{pod, "isthnotapod"} {
			if err = netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: n}, PeerName: n + "p"}); err != nil {
				return
			}
		}
		names, err = List()
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 1 || names[0] != pod {
		t.Fatalf("List() = %v, want [%s]", names, pod)
	}
}

func TestCheckNetns(t *testing.T) {
	err := CheckNetns("/nonexistent/netns/x")
	if err == nil || err.Error() != "netns /nonexistent/netns/x does not exist" {
		t.Fatalf("missing netns: got %v", err)
	}
	f := t.TempDir() + "/plain"
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := CheckNetns(f); err == nil || !strings.Contains(err.Error(), "is not a network namespace") {
		t.Fatalf("plain file: got %v", err)
	}
}

func TestCreateMissingNetns(t *testing.T) {
	_, err := Create(Spec{NetnsPath: "/var/run/netns/isthmus-does-not-exist", HostIfName: "isthx", Addrs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}})
	if err == nil || err.Error() != "netns /var/run/netns/isthmus-does-not-exist does not exist" {
		t.Fatalf("got %v", err)
	}
}

// lab is a node netns and a pod netns, both removed at the end of the test.
type lab struct {
	node, pod         string // netns names
	nodePath, podPath string
}

func newLab(t *testing.T) *lab {
	t.Helper()
	testenv.Root(t, "creates network namespaces")
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("iproute2 'ip' is required: ", err)
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	l := &lab{node: "isthep-n-" + id, pod: "isthep-p-" + id}
	for _, n := range []string{l.node, l.pod} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v: %s", n, err, out)
		}
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", n).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", n, err, out)
			}
		})
	}
	l.nodePath, l.podPath = "/var/run/netns/"+l.node, "/var/run/netns/"+l.pod
	return l
}

// in runs fn on a thread inside the named netns, as the agent would run in
// its node namespace.
func in(t *testing.T, path string, fn func()) {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			t.Error(err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			t.Error(err)
			return
		}
		defer func() {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
		}()
		fn()
	}()
	<-done
}

func handle(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func TestCreateLookupDelete(t *testing.T) {
	l := newLab(t)
	pod4, pod6 := netip.MustParseAddr("10.200.0.7"), netip.MustParseAddr("fd00:200::7")
	node4, node6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	const hostIf = "isthtest0"
	nodeH, podH := handle(t, l.nodePath), handle(t, l.podPath)

	// The node has addresses of its own on lo, the way a real node has its IPs.
	nodeLo, err := nodeH.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := nodeH.LinkSetUp(nodeLo); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{node4, node6} {
		// NODAD: no tentative moment in which binding to it fails.
		if err := nodeH.AddrAdd(nodeLo, &netlink.Addr{IPNet: hostPrefix(a), Flags: unix.IFA_F_NODAD}); err != nil {
			t.Fatal(err)
		}
	}

	var res Result
	in(t, l.nodePath, func() {
		if err := PrepareNode(); err != nil {
			t.Error(err)
			return
		}
		res, err = Create(Spec{NetnsPath: l.podPath, HostIfName: hostIf, Addrs: []netip.Addr{pod4, pod6}, MTU: 1400})
	})
	if err != nil {
		t.Fatal(err)
	}

	// Node side.
	host, err := nodeH.LinkByName(hostIf)
	if err != nil {
		t.Fatal(err)
	}
	if host.Attrs().Index != res.HostIfIndex || host.Attrs().HardwareAddr.String() != res.HostMAC.String() {
		t.Errorf("Result %+v does not match host link %+v", res, host.Attrs())
	}
	if host.Attrs().MTU != 1400 || host.Attrs().OperState == netlink.OperDown {
		t.Errorf("host veth mtu %d state %s", host.Attrs().MTU, host.Attrs().OperState)
	}
	for _, a := range []netip.Addr{pod4, pod6} {
		rs, err := nodeH.RouteGet(a.AsSlice())
		if err != nil {
			t.Fatal(err)
		}
		if len(rs) != 1 || rs[0].LinkIndex != res.HostIfIndex {
			t.Errorf("node route to %s: %+v, want dev %s", a, rs, hostIf)
		}
	}
	in(t, l.nodePath, func() {
		for p, want := range map[string]string{
			sysctlPath(4, hostIf, "forwarding"): "1",
			sysctlPath(4, hostIf, "rp_filter"):  "0",
			sysctlPath(4, hostIf, "proxy_arp"):  "0",
			sysctlPath(6, hostIf, "forwarding"): "1",
		} {
			got, err := os.ReadFile(p)
			if err != nil || strings.TrimSpace(string(got)) != want {
				t.Errorf("%s = %q (%v), want %s", p, got, err, want)
			}
		}
	})

	// Pod side.
	eth0, err := podH.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if eth0.Attrs().HardwareAddr.String() != res.PodMAC.String() || eth0.Attrs().MTU != 1400 {
		t.Errorf("pod eth0 %+v, result %+v", eth0.Attrs(), res)
	}
	// With DAD off the kernel still clears the tentative flag of the
	// link-local address from a work queue, a moment after the link is up:
	// allow that moment (a machine under load stretches it), not a DAD run.
	var addrs []netlink.Addr
	for deadline := time.Now().Add(time.Second); ; time.Sleep(10 * time.Millisecond) {
		addrs, err = podH.AddrList(eth0, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool { return a.Flags&unix.IFA_F_TENTATIVE != 0 }) || time.Now().After(deadline) {
			break
		}
	}
	got := map[string]bool{}
	for _, a := range addrs {
		got[a.IPNet.String()] = true
		if a.Flags&unix.IFA_F_TENTATIVE != 0 {
			t.Errorf("address %s is tentative: DAD not disabled", a.IPNet)
		}
	}
	if !got["10.200.0.7/32"] || !got["fd00:200::7/128"] {
		t.Errorf("pod addresses %v, want 10.200.0.7/32 and fd00:200::7/128", got)
	}
	for _, dst := range []netip.Addr{node4, node6} {
		rs, err := podH.RouteGet(dst.AsSlice())
		if err != nil {
			t.Fatal(err)
		}
		wantGw := GatewayIPv4
		if dst.Is6() {
			wantGw = GatewayIPv6
		}
		if len(rs) != 1 || rs[0].LinkIndex != eth0.Attrs().Index || !rs[0].Gw.Equal(wantGw.AsSlice()) {
			t.Errorf("pod route to %s: %+v, want via %s dev eth0", dst, rs, wantGw)
		}
	}
	neighs, err := podH.NeighList(eth0.Attrs().Index, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	perm := map[string]string{}
	for _, n := range neighs {
		if n.State&netlink.NUD_PERMANENT != 0 {
			perm[n.IP.String()] = n.HardwareAddr.String()
		}
	}
	for _, gw := range []string{"169.254.1.1", "fe80::1"} {
		if perm[gw] != res.HostMAC.String() {
			t.Errorf("pod neighbour %s -> %q, want permanent -> %s (all: %v)", gw, perm[gw], res.HostMAC, perm)
		}
	}
	in(t, l.podPath, func() {
		if b, err := os.ReadFile(sysctlPath(6, "eth0", "accept_dad")); err != nil || strings.TrimSpace(string(b)) != "0" {
			t.Errorf("pod accept_dad = %q (%v), want 0", b, err)
		}
	})

	// Real packets: UDP from the pod to the node's addresses and back.
	for _, dst := range []netip.Addr{node4, node6} {
		udpEcho(t, l, dst)
	}

	// Lookup after the fact, as a restarted agent does.
	var lk Result
	in(t, l.nodePath, func() { lk, err = Lookup(hostIf) })
	if err != nil {
		t.Fatal(err)
	}
	if lk.HostIfIndex != res.HostIfIndex || lk.HostMAC.String() != res.HostMAC.String() || lk.PodMAC.String() != res.PodMAC.String() {
		t.Errorf("Lookup = %+v, Create returned %+v", lk, res)
	}

	// A second pod interface with the same name in the same netns is refused
	// and leaves nothing behind.
	in(t, l.nodePath, func() {
		_, err = Create(Spec{NetnsPath: l.podPath, HostIfName: "isthtest1", Addrs: []netip.Addr{netip.MustParseAddr("10.200.0.8")}})
	})
	if err == nil || !strings.Contains(err.Error(), "already has an interface eth0") {
		t.Errorf("second eth0: got %v", err)
	}
	if _, err := nodeH.LinkByName("isthtest1"); err == nil {
		t.Error("failed Create left isthtest1 behind")
	}

	// Delete, twice.
	in(t, l.nodePath, func() {
		if err := Delete(hostIf); err != nil {
			t.Error(err)
		}
		if err := Delete(hostIf); err != nil {
			t.Errorf("second Delete: %v", err)
		}
		if _, err := Lookup(hostIf); !errors.Is(err, ErrNotFound) {
			t.Errorf("Lookup after Delete: %v, want ErrNotFound", err)
		}
	})
	if _, err := podH.LinkByName("eth0"); err == nil {
		t.Error("pod eth0 survived Delete")
	}
	if rs, _ := nodeH.RouteGet(pod4.AsSlice()); len(rs) == 1 && rs[0].LinkIndex == res.HostIfIndex {
		t.Error("node route to the pod survived Delete")
	}
}

func TestCreateRollsBack(t *testing.T) {
	l := newLab(t)
	nodeH := handle(t, l.nodePath)
	var err error
	in(t, l.nodePath, func() {
		// An address the kernel refuses (multicast) fails after the veth exists.
		_, err = Create(Spec{NetnsPath: l.podPath, HostIfName: "isthtest2", Addrs: []netip.Addr{netip.MustParseAddr("10.200.0.9"), netip.MustParseAddr("ff02::1")}})
	})
	if err == nil {
		t.Fatal("Create with a multicast address succeeded")
	}
	t.Logf("error: %v", err)
	if _, lerr := nodeH.LinkByName("isthtest2"); lerr == nil {
		t.Error("failed Create left the host veth behind")
	}
	podH := handle(t, l.podPath)
	if _, lerr := podH.LinkByName("eth0"); lerr == nil {
		t.Error("failed Create left the pod eth0 behind")
	}
}

// udpEcho sends a datagram from the pod to dst, where the node echoes it.
func udpEcho(t *testing.T, l *lab, dst netip.Addr) {
	t.Helper()
	var srv net.PacketConn
	var err error
	in(t, l.nodePath, func() { srv, err = net.ListenPacket("udp", netip.AddrPortFrom(dst, 0).String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 64)
		n, from, err := srv.ReadFrom(buf)
		if err == nil {
			_, _ = srv.WriteTo(buf[:n], from)
		}
	}()
	var c net.Conn
	in(t, l.podPath, func() { c, err = net.Dial("udp", srv.LocalAddr().String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Errorf("UDP echo pod -> %s: %q, %v", dst, buf[:n], err)
	}
}

// Create's order, which keeps the pod's packets out until the datapath
// is there and keeps the kernel from waiting for RCU grace periods under
// RTNL: when BeforeUp runs, the clsact qdisc is on the host end and the
// host end is still down; each end has one queue; lo ends up up; a
// failing BeforeUp removes the pair.
func TestCreateOrder(t *testing.T) {
	l := newLab(t)
	nodeH, podH := handle(t, l.nodePath), handle(t, l.podPath)
	pod4, pod6 := netip.MustParseAddr("10.200.0.11"), netip.MustParseAddr("fd00:200::11")
	const hostIf = "isthtest3"
	var res Result
	var err error
	ran := false
	in(t, l.nodePath, func() {
		res, err = Create(Spec{NetnsPath: l.podPath, HostIfName: hostIf, Addrs: []netip.Addr{pod4, pod6}, Clsact: true,
			BeforeUp: func(ifindex int) error {
				ran = true
				host, err := nodeH.LinkByIndex(ifindex)
				if err != nil || host.Attrs().Name != hostIf {
					t.Errorf("BeforeUp(%d): %v, %v", ifindex, host, err)
					return nil
				}
				if host.Attrs().Flags&net.FlagUp != 0 {
					t.Error("the host end is up before BeforeUp")
				}
				qs, err := nodeH.QdiscList(host)
				if err != nil {
					t.Error(err)
				}
				if !slices.ContainsFunc(qs, func(q netlink.Qdisc) bool { return q.Type() == "clsact" }) {
					t.Errorf("no clsact qdisc on %s before BeforeUp: %v", hostIf, qs)
				}
				return nil
			}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if !ran {
		t.Fatal("BeforeUp did not run")
	}
	if res.Host == nil || res.Pod == nil || res.Steps == "" {
		t.Errorf("Result without the created ends: %+v", res)
	}
	for _, lk := range []struct {
		h    *netlink.Handle
		name string
	}{{nodeH, hostIf}, {podH, "eth0"}, {podH, "lo"}} {
		got, err := lk.h.LinkByName(lk.name)
		if err != nil {
			t.Fatal(err)
		}
		a := got.Attrs()
		if a.Flags&net.FlagUp == 0 {
			t.Errorf("%s is down after Create", lk.name)
		}
		if lk.name != "lo" && (a.NumTxQueues != 1 || a.NumRxQueues != 1) {
			t.Errorf("%s has %d tx and %d rx queues, want 1 each", lk.name, a.NumTxQueues, a.NumRxQueues)
		}
		if lk.name == hostIf {
			// No IPv6 address (not even link-local) on the host end.
			if addrs, err := nodeH.AddrList(got, netlink.FAMILY_V6); err != nil || len(addrs) != 0 {
				t.Errorf("host end IPv6 addresses %v, %v; want none", addrs, err)
			}
		}
	}

	// A BeforeUp that fails leaves nothing.
	in(t, l.nodePath, func() {
		_, err = Create(Spec{NetnsPath: l.podPath, HostIfName: "isthtest4", PodIfName: "eth1", Addrs: []netip.Addr{netip.MustParseAddr("10.200.0.12")},
			BeforeUp: func(int) error { return errors.New("no programs") }})
	})
	if err == nil || !strings.Contains(err.Error(), "no programs") {
		t.Fatalf("Create with a failing BeforeUp: %v", err)
	}
	if _, lerr := nodeH.LinkByName("isthtest4"); lerr == nil {
		t.Error("a failed BeforeUp left the host veth behind")
	}
	if _, lerr := podH.LinkByName("eth1"); lerr == nil {
		t.Error("a failed BeforeUp left the pod end behind")
	}
}
