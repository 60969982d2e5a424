package agent

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/clustermode"
	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
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
	// The host's own datapath: the device is its "veth". Until the
	// reconciler writes the host's endpoint entry the programs let
	// everything pass; the links are pinned, so a restarted agent updates
	// them in place.
	if err := a.dp.AttachHost(name, l.Attrs().Index); err != nil {
		return fmt.Errorf("external workload: datapath on %s: %w", name, err)
	}
	a.workloadDev, a.workloadIfIndex = name, l.Attrs().Index
	a.log.Info("external workload: addresses and datapath on the WireGuard device", "device", name, "addresses", w.Addresses, "workload", w.Namespace+"/"+w.Name)
	return nil
}

// workloadEndpoint is the host's own endpoint for the datapath reconciler
// (desired.State.Workload): nil on a node and until the host's identity is
// allocated (its traffic passes unjudged until then, as a pod's does
// before its endpoint entry exists).
func (a *Agent) workloadEndpoint() *state.Endpoint {
	w := a.cfg.ExternalWorkload
	if w == nil || a.workloadIfIndex == 0 {
		return nil
	}
	id := a.mesh.WorkloadIdentity()
	if id == 0 {
		return nil
	}
	return &state.Endpoint{Name: w.Name, Namespace: w.Namespace, Labels: w.Labels, IPs: w.Addresses,
		Identity: id, ID: desired.WorkloadEndpointID, HostIfName: a.workloadDev, IfIndex: a.workloadIfIndex}
}

// serviceVIPs are the services' virtual addresses, which an external
// workload routes into its WireGuard device (from_host translates them).
// A malformed one is left out (the objects are validated when applied).
func serviceVIPs(svcs []objects.Service) []netip.Addr {
	var out []netip.Addr
	for _, s := range svcs {
		for _, v := range s.Spec.VIPs {
			if a, err := netip.ParseAddr(v); err == nil {
				out = append(out, a.Unmap())
			}
		}
	}
	return out
}
