package agent

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/routes"
)

// workload is the clustermode view of Config.ExternalWorkload.
func (c Config) workload() *clustermode.Workload {
	w := c.ExternalWorkload
	if w == nil {
		return nil
	}
	return &clustermode.Workload{Name: w.Name, Namespace: w.Namespace, Labels: w.Labels, IPs: w.Addresses}
}

// plumbWorkload puts an external workload's addresses on its WireGuard
// device. With node encryption every packet not marked by WireGuard looks
// up the tunnel table first, whose routes go into that device: the kernel
// then picks the device's address as the source, so the host's traffic to
// pods leaves under its own address (and identity), encrypted. The device
// is the agent's (the embedded engine's goes with the process), so this
// runs at every start.
func (a *Agent) plumbWorkload() error {
	w := a.cfg.ExternalWorkload
	if w == nil {
		return nil
	}
	name := a.cfg.WireGuardDevice
	if name == "" {
		name = DefaultWireGuardDevice(a.cfg.ClusterName, a.cfg.NodeName)
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("external workload: WireGuard device %s: %w", name, err)
	}
	for _, ip := range w.Addresses {
		addr := &netlink.Addr{IPNet: routes.IPNet(netip.PrefixFrom(ip, ip.BitLen()))}
		if ip.Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrReplace(l, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("external workload: address %s on %s: %w", ip, name, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("external workload: %s up: %w", name, err)
	}
	a.log.Info("external workload: addresses on the WireGuard device", "device", name, "addresses", w.Addresses, "workload", w.Namespace+"/"+w.Name)
	return nil
}
