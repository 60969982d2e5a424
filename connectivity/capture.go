package connectivity

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// capture counts the packets on one interface of a node (AF_PACKET, in the
// node's network namespace) for the encryption check: packets that carry
// one of the watched pod addresses in their IP header (plaintext), and UDP
// packets from or to one of the WireGuard ports.
type capture struct {
	fd      int
	ifName  string
	ifIndex int
	pods    map[netip.Addr]bool
	ports   map[uint16]bool

	mu        sync.Mutex
	total     int
	wireguard int
	plaintext int
	firstLeak string

	stop chan struct{}
	done chan error
}

// ifaceWith returns the interface of the current namespace that holds one of
// addrs.
func ifaceWith(addrs []netip.Addr) (net.Interface, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return net.Interface{}, err
	}
	for _, ifc := range ifs {
		as, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range as {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, _ := netip.AddrFromSlice(ipn.IP)
			for _, want := range addrs {
				if ip.Unmap() == want {
					return ifc, nil
				}
			}
		}
	}
	return net.Interface{}, fmt.Errorf("no interface holds %v", addrs)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// startCapture opens the packet socket inside the namespace at nsPath ("" for
// the current one) on the
// interface holding one of nodeIPs and counts until stopCapture.
func startCapture(nsPath string, nodeIPs []netip.Addr, pods map[netip.Addr]bool, ports map[uint16]bool) (*capture, error) {
	c := &capture{fd: -1, pods: pods, ports: ports, stop: make(chan struct{}), done: make(chan error, 1)}
	err := inNetns(nsPath, func() error {
		ifc, err := ifaceWith(nodeIPs)
		if err != nil {
			return err
		}
		c.ifName, c.ifIndex = ifc.Name, ifc.Index
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		c.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
			return fmt.Errorf("bind packet socket to %s: %w", ifc.Name, err)
		}
		// Wake up regularly to notice stopCapture.
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100_000})
	})
	if err != nil {
		if c.fd >= 0 {
			unix.Close(c.fd)
		}
		return nil, err
	}
	go c.run()
	return c, nil
}

func (c *capture) run() {
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.stop:
			c.done <- nil
			return
		default:
		}
		n, from, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			c.done <- err
			return
		}
		// Packets queued between socket() and bind() may come from other
		// interfaces (the pods' veths, in the clear by design).
		if ll, ok := from.(*unix.SockaddrLinklayer); !ok || ll.Ifindex != c.ifIndex {
			continue
		}
		c.inspect(buf[:min(n, len(buf))])
	}
}

// inspect classifies one layer-3 packet.
func (c *capture) inspect(p []byte) {
	var src, dst netip.Addr
	var proto byte
	var l4 []byte
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		ihl := int(p[0]&0x0f) * 4
		src, dst = netip.AddrFrom4([4]byte(p[12:16])), netip.AddrFrom4([4]byte(p[16:20]))
		proto = p[9]
		if ihl >= 20 && len(p) >= ihl {
			l4 = p[ihl:]
		}
	case len(p) >= 40 && p[0]>>4 == 6:
		src, dst = netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40]))
		proto = p[6] // extension headers are not followed: WireGuard sends none
		l4 = p[40:]
	default:
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total++
	if c.pods[src] || c.pods[dst] {
		c.plaintext++
		if c.firstLeak == "" {
			c.firstLeak = fmt.Sprintf("%s -> %s proto %d", src, dst, proto)
		}
	}
	if proto == unix.IPPROTO_UDP && len(l4) >= 4 {
		sp, dp := binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
		if c.ports[sp] || c.ports[dp] {
			c.wireguard++
		}
	}
}

// CaptureResult is what a capture saw: the evidence of the encryption
// check.
type CaptureResult struct {
	Node      string   `json:"node,omitempty"`
	Interface string   `json:"interface"`
	Ports     []uint16 `json:"wireguardPorts"` // UDP ports counted as WireGuard
	Watched   int      `json:"watched"`        // pod addresses and VIPs that must not appear
	Total     int      `json:"total"`          // IP packets seen
	WireGuard int      `json:"wireguard"`      // UDP from or to one of Ports
	Plaintext int      `json:"plaintext"`      // with a watched address in the IP header
	FirstLeak string   `json:"firstLeak,omitempty"`
}

// stopCapture ends the capture after a short grace period (packets of the
// last exchange still in flight) and returns the counts.
func (c *capture) stopCapture() (CaptureResult, error) {
	time.Sleep(200 * time.Millisecond)
	close(c.stop)
	err := <-c.done
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.result(), err
}

// result is what the capture counted so far (c.mu held).
func (c *capture) result() CaptureResult {
	return CaptureResult{Interface: c.ifName, Ports: slices.Sorted(maps.Keys(c.ports)), Watched: len(c.pods),
		Total: c.total, WireGuard: c.wireguard, Plaintext: c.plaintext, FirstLeak: c.firstLeak}
}
