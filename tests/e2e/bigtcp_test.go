package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/bigtcp"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// BIG TCP, the user's story: a cluster of two nodes in the clear, the
// agents on their default (auto). Pods on one node and across the two
// send TCP streams; a capture on the receiving pod's veth sees segments
// beyond 65,535 bytes, and every byte arrives (a SHA-256 over the stream).
// Through a service and under a policy too, where a denied client stays
// denied. A device that cannot take the size is left at 65,536 alone and
// reported; restarting an agent with BIG TCP off puts 65,536 back on its
// devices and running pods.

const bigTCPPort = 7100

// hashSink reads a stream to its end and answers with its SHA-256.
func hashSink(c net.Conn) {
	defer c.Close()
	h := sha256.New()
	if _, err := io.Copy(h, c); err != nil {
		return
	}
	_, _ = c.Write(h.Sum(nil))
}

// sendHashed streams n random bytes from ns to dst and checks the digest
// the sink answers with.
func sendHashed(ns *lab.Netns, dst netip.AddrPort, n int) error {
	c, err := dialTCP(ns, dst, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 1<<20)
	_, _ = rand.Read(buf)
	h := sha256.New()
	for sent := 0; sent < n; sent += len(buf) {
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("write to %s after %d bytes: %w", dst, sent, err)
		}
		h.Write(buf)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return err
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read digest from %s: %w", dst, err)
	}
	if !bytes.Equal(got, h.Sum(nil)) {
		return fmt.Errorf("%s received other bytes than were sent (digest %x, want %x)", dst, got, h.Sum(nil))
	}
	return nil
}

// tcpCapture is an AF_PACKET socket on one interface that records the
// largest TCP packet to or from a port (its IP length: the kernel hands a
// GSO packet over whole).
type tcpCapture struct {
	fd      int
	port    uint16
	max     atomic.Int64
	packets atomic.Int64
	done    sync.WaitGroup
	stop    atomic.Bool
}

func captureTCP(ns *lab.Netns, ifname string, port uint16) (*tcpCapture, error) {
	c := &tcpCapture{port: port}
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		c.fd = fd
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20)
		tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index})
	})
	if err != nil {
		if c.fd > 0 {
			unix.Close(c.fd)
		}
		return nil, fmt.Errorf("capture on %s in %s: %w", ifname, ns.Name(), err)
	}
	c.done.Add(1)
	go c.run()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *tcpCapture) run() {
	defer c.done.Done()
	buf := make([]byte, 128) // headers only; MSG_TRUNC reports the whole length
	for !c.stop.Load() {
		n, _, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
		if err != nil || n < 14+40 {
			continue
		}
		l3 := buf[14:]
		var l4 []byte
		switch binary.BigEndian.Uint16(buf[12:]) {
		case unix.ETH_P_IP:
			if l3[9] != unix.IPPROTO_TCP {
				continue
			}
			l4 = l3[int(l3[0]&0xf)*4:]
		case unix.ETH_P_IPV6:
			switch l3[6] {
			case unix.IPPROTO_TCP:
				l4 = l3[40:]
			case 0: // the jumbo hop-by-hop header
				if l3[40] != unix.IPPROTO_TCP {
					continue
				}
				l4 = l3[48:]
			default:
				continue
			}
		default:
			continue
		}
		if binary.BigEndian.Uint16(l4[0:]) != c.port && binary.BigEndian.Uint16(l4[2:]) != c.port {
			continue
		}
		c.packets.Add(1)
		if size := int64(n - 14); size > c.max.Load() {
			c.max.Store(size)
		}
	}
}

// finish stops the capture and returns the largest packet and the count.
func (c *tcpCapture) finish() (largest, packets int) {
	c.stop.Store(true)
	c.done.Wait()
	unix.Close(c.fd)
	return int(c.max.Load()), int(c.packets.Load())
}

// bigTransfer streams 16 MB from src to dst while capturing on the
// receiving pod's eth0 (port bigTCPPort there, the service's target
// port), and returns the largest TCP packet seen there.
func bigTransfer(t *testing.T, src, rcv *lab.Pod, dst netip.AddrPort) int {
	t.Helper()
	c, err := captureTCP(rcv.Netns, "eth0", bigTCPPort)
	if err != nil {
		t.Fatal(err)
	}
	err = sendHashed(src.Netns, dst, 16<<20)
	largest, n := c.finish()
	if err != nil {
		t.Fatalf("%s -> %s: %v", src.PodName, dst, err)
	}
	t.Logf("%s -> %s: 16 MiB intact; largest TCP packet on %s's eth0 %d bytes (%d packets)", src.PodName, dst, rcv.PodName, largest, n)
	return largest
}

func bigTCPStatus(t *testing.T, ctx context.Context, a *lab.Agent) *api.BigTCPStatus {
	t.Helper()
	st, err := agentStatus(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if st.BigTCP == nil {
		t.Fatalf("%s: no BIG TCP in the status", a.Node.Name())
	}
	return st.BigTCP
}

func bigTCPPathOf(st *api.BigTCPStatus, path, family string) api.BigTCPPath {
	for _, p := range st.Paths {
		if p.Path == path && p.Family == family {
			return p
		}
	}
	return api.BigTCPPath{Path: path, Family: family, Reason: "missing from the status"}
}

// sizesIn reads a device's four sizes in a namespace.
func sizesIn(t *testing.T, ns *lab.Netns, ifname string) [4]uint32 {
	t.Helper()
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(ifname)
	if err != nil {
		t.Fatalf("%s in %s: %v", ifname, ns.Name(), err)
	}
	a := l.Attrs()
	return [4]uint32{a.GSOMaxSize, a.GROMaxSize, a.GSOIPv4MaxSize, a.GROIPv4MaxSize}
}

func TestBigTCP(t *testing.T) {
	labtest.SkipUnlessRoot(t)
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	step(t, "building a cluster of two nodes in the clear; agents on their BIG TCP default (auto)")
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 2})
	if err != nil {
		t.Fatal(err)
	}
	n1, n2 := c.Agents[0], c.Agents[1]
	addPod := func(a *lab.Agent, name, app string) *lab.Pod {
		t.Helper()
		p, err := a.AddPod(ctx, name, "default", map[string]string{"app": app})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	client := addPod(n1, "client", "client")
	local := addPod(n1, "local", "server")
	other := addPod(n1, "other", "other")
	remote := addPod(n2, "remote", "sink")
	for _, p := range []*lab.Pod{local, remote} {
		serveTCP(t, p.Netns, bigTCPPort, hashSink)
	}
	for _, p := range []*lab.Pod{local, remote} {
		for _, v6 := range []bool{false, true} {
			dst := netip.AddrPortFrom(p.Addr(v6), bigTCPPort)
			if err := eventually(20*time.Second, func() error { return sendHashed(client.Netns, dst, 1<<20) }); err != nil {
				t.Fatalf("client does not reach %s: %v", dst, err)
			}
		}
	}

	t.Run("status: on for every path the node uses", func(t *testing.T) {
		st := bigTCPStatus(t, ctx, n1)
		if st.IPv6 != "auto" || st.IPv4 != "auto" || st.Size != bigtcp.DefaultSize {
			t.Errorf("settings %s/%s/%d, want the defaults", st.IPv6, st.IPv4, st.Size)
		}
		for _, fam := range []string{"ipv6", "ipv4"} {
			for _, path := range []string{api.BigTCPPathSameNode, api.BigTCPPathCrossNode, api.BigTCPPathOutside} {
				if p := bigTCPPathOf(st, path, fam); !p.On {
					t.Errorf("%s %s: off: %s", path, fam, p.Reason)
				}
			}
			if p := bigTCPPathOf(st, api.BigTCPPathWireGuard, fam); p.On || !strings.Contains(p.Reason, "encryption is off") {
				t.Errorf("wireguard %s: %+v", fam, p)
			}
		}
		if len(st.Endpoints) != 3 {
			t.Errorf("%d endpoints in the BIG TCP status, want 3", len(st.Endpoints))
		}
		for _, e := range st.Endpoints {
			if e.IPv6 != bigtcp.DefaultSize || e.IPv4 != bigtcp.DefaultSize {
				t.Errorf("endpoint %s: %d/%d", e.Endpoint, e.IPv6, e.IPv4)
			}
		}
		if got := sizesIn(t, remote.Netns, "eth0"); got != [4]uint32{bigtcp.DefaultSize, bigtcp.DefaultSize, bigtcp.DefaultSize, bigtcp.DefaultSize} {
			t.Errorf("remote pod's eth0 holds %v", got)
		}
		out, err := n1.CLI(ctx, "status")
		if err != nil || !strings.Contains(string(out), "BIG TCP: ipv6 auto, ipv4 auto, size 196608") {
			t.Errorf("isthmus status lacks the BIG TCP section (%v):\n%s", err, out)
		}
	})

	t.Run("segments beyond 64 KiB arrive intact, same node and across nodes, IPv6 and IPv4", func(t *testing.T) {
		for _, dst := range []*lab.Pod{local, remote} {
			for _, v6 := range []bool{true, false} {
				step(t, "client -> %s (%s)", dst.PodName, familyName(v6))
				if largest := bigTransfer(t, client, dst, netip.AddrPortFrom(dst.Addr(v6), bigTCPPort)); largest <= 65535 {
					t.Errorf("client -> %s (%s): largest TCP packet %d bytes, want > 65535", dst.PodName, familyName(v6), largest)
				}
			}
		}
	})

	t.Run("through a service and under a policy; a denied client stays denied", func(t *testing.T) {
		for _, doc := range []string{`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: sink}
spec:
  vips: [10.96.0.71, "fd00:96::71"]
  ports: [{port: 80, targetPort: 7100, protocol: TCP}]
  selector: {app: sink}
`, `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: sink-from-client}
spec:
  endpointSelector: {matchLabels: {app: sink}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{port: 7100, protocol: TCP}]
`} {
			f := filepath.Join(t.TempDir(), "obj.yaml")
			if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := n1.CLI(ctx, "apply", "-f", f); err != nil {
				t.Fatal(err)
			}
		}
		for _, vip := range []netip.AddrPort{netip.MustParseAddrPort("10.96.0.71:80"), netip.MustParseAddrPort("[fd00:96::71]:80")} {
			if err := eventually(20*time.Second, func() error { return sendHashed(client.Netns, vip, 1<<20) }); err != nil {
				t.Fatalf("client -> %s: %v", vip, err)
			}
			if largest := bigTransfer(t, client, remote, vip); largest <= 65535 {
				t.Errorf("client -> %s: largest TCP packet at the backend %d, want > 65535", vip, largest)
			}
			if err := eventually(10*time.Second, func() error { return connectTimesOut(other.Netns, vip, time.Second) }); err != nil {
				t.Errorf("other -> %s must be denied: %v", vip, err)
			}
		}
	})

	t.Run("a device that cannot take the size is left at 65536 alone, with the reason", func(t *testing.T) {
		// A TUN device (tso_max_size 65536, like the embedded WireGuard's)
		// with default routes of a worse metric: one more way out.
		h, err := n1.Node.Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		// Created from inside the node: a TUN device is made by an ioctl
		// in the caller's netns. It goes with the node's netns.
		tun := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "bigtun0"}, Mode: netlink.TUNTAP_MODE_TUN, Flags: netlink.TUNTAP_NO_PI}
		if err := n1.Node.Do(func() error { return netlink.LinkAdd(tun) }); err != nil {
			t.Fatal(err)
		}
		link, err := h.LinkByName("bigtun0")
		if err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
		for _, dst := range []string{"0.0.0.0/0", "::/0"} {
			_, ipn, _ := net.ParseCIDR(dst)
			if err := h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipn, Priority: 4000}); err != nil {
				t.Fatal(err)
			}
		}
		// A new address wakes the reconciler at once.
		if err := h.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("192.0.2.77"), Mask: net.CIDRMask(32, 32)}}); err != nil {
			t.Fatal(err)
		}
		var st *api.BigTCPStatus
		if err := eventually(20*time.Second, func() error {
			st = bigTCPStatus(t, ctx, n1)
			for _, d := range st.Devices {
				if d.Name == "bigtun0" && strings.Contains(d.Reason, "tso_max_size 65536") && d.GSO == 65536 && d.GSOIPv4 == 65536 {
					return nil
				}
			}
			return fmt.Errorf("bigtun0 not reported at 65536 with its reason: %+v", st.Devices)
		}); err != nil {
			t.Fatal(err)
		}
		for _, fam := range []string{"ipv6", "ipv4"} {
			if p := bigTCPPathOf(st, api.BigTCPPathOutside, fam); p.On || !strings.Contains(p.Reason, "bigtun0") {
				t.Errorf("outside %s with bigtun0: %+v", fam, p)
			}
			for _, path := range []string{api.BigTCPPathSameNode, api.BigTCPPathCrossNode} {
				if p := bigTCPPathOf(st, path, fam); !p.On {
					t.Errorf("%s %s went off with bigtun0: %s", path, fam, p.Reason)
				}
			}
		}
		if got := sizesIn(t, n1.Node.NS(), "eth0"); got[0] != bigtcp.DefaultSize || got[2] != bigtcp.DefaultSize {
			t.Errorf("eth0 lost its sizes with bigtun0: %v", got)
		}
		fams, err := promtest.Get(overSocket(n1.Socket), "http://agent/metrics")
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name   string
			labels []string
			want   float64
		}{
			{"isthmus_agent_bigtcp_path_enabled", []string{"path", "outside", "family", "ipv6"}, 0},
			{"isthmus_agent_bigtcp_path_enabled", []string{"path", "cross-node", "family", "ipv4"}, 1},
			{"isthmus_agent_bigtcp_devices_at_legacy_size", []string{"role", "outside"}, 1},
			{"isthmus_agent_bigtcp_device_gso_max_size_bytes", []string{"device", "bigtun0", "family", "ipv6"}, 65536},
			{"isthmus_agent_bigtcp_device_gso_max_size_bytes", []string{"device", "eth0", "family", "ipv4"}, bigtcp.DefaultSize},
		} {
			if got := fams.Must(t, c.name, c.labels...); got != c.want {
				t.Errorf("metric %s%v = %v, want %v", c.name, c.labels, got, c.want)
			}
		}
		if largest := bigTransfer(t, client, remote, netip.AddrPortFrom(remote.IPv4, bigTCPPort)); largest <= 65535 {
			t.Errorf("after bigtun0: largest %d", largest)
		}
	})

	t.Run("off: restarting the agent puts 65536 back on its devices and running pods, live", func(t *testing.T) {
		eps := func() map[string]api.Endpoint {
			var list []api.Endpoint
			out, err := n2.CLI(ctx, "endpoint", "list", "-o", "json")
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(out, &list); err != nil {
				t.Fatal(err)
			}
			m := map[string]api.Endpoint{}
			for _, e := range list {
				m[e.Name] = e
			}
			return m
		}
		before := eps()["remote"]
		if before.BigTCP == nil || before.BigTCP.IPv6 != bigtcp.DefaultSize {
			t.Fatalf("endpoint remote before: %+v", before.BigTCP)
		}
		n2.AddArgs("--ipv6-big-tcp", "off", "--ipv4-big-tcp", "off")
		if err := n2.Proc.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := n2.Start(ctx); err != nil {
			t.Fatal(err)
		}
		legacy := [4]uint32{65536, 65536, 65536, 65536}
		for _, d := range []struct {
			ns     *lab.Netns
			ifname string
		}{{n2.Node.NS(), "eth0"}, {n2.Node.NS(), before.Interface}, {remote.Netns, "eth0"}} {
			if got := sizesIn(t, d.ns, d.ifname); got != legacy {
				t.Errorf("%s in %s holds %v after off, want 65536", d.ifname, d.ns.Name(), got)
			}
		}
		after := eps()["remote"]
		if after.IfIndex != before.IfIndex || after.Created != before.Created {
			t.Errorf("the pod was replugged: %+v -> %+v", before, after)
		}
		if out, err := remote.Exec(ctx, "ip", "-6", "route", "show", "default"); err != nil || strings.Contains(string(out), "mtu") {
			t.Errorf("the pod's IPv6 default route keeps an MTU after off (%v): %s", err, out)
		}
		st := bigTCPStatus(t, ctx, n2)
		if p := bigTCPPathOf(st, api.BigTCPPathCrossNode, "ipv6"); p.On || !strings.Contains(p.Reason, "--ipv6-big-tcp=off") {
			t.Errorf("cross-node ipv6 after off: %+v", p)
		}
		// The sender's node still builds big packets; the receiving node
		// now hands the pod 64 KiB at most, and the data still arrives.
		for _, v6 := range []bool{true, false} {
			if largest := bigTransfer(t, client, remote, netip.AddrPortFrom(remote.Addr(v6), bigTCPPort)); largest > 65535 {
				t.Errorf("after off (%s): largest TCP packet into the pod %d bytes, want <= 65535", familyName(v6), largest)
			}
		}
	})
}
