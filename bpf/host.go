package bpf

import (
	"github.com/cilium/ebpf"
)

// The host's own datapath (c/datapath.c, from_host and to_host): on an
// external workload (docs/vms.md) the host's addresses live on its
// WireGuard device, an L3 device, which plays the part of a pod's
// host-side veth. The host's address is an endpoint in isth_endpoints like
// a pod's; from_host (tcx egress: what the host sends) translates service
// addresses to backends anywhere in the mesh, to_host (tcx ingress: what
// arrives for the host) undoes the translation on the replies and enforces
// the host's ingress policy.

// FromHost and ToHost expose the programs, for tests and benchmarks.
func (d *Datapath) FromHost() *ebpf.Program { return d.objs.FromHost }
func (d *Datapath) ToHost() *ebpf.Program   { return d.objs.ToHost }

// hostLinkPrefix names the pinned links of the host programs
// (host-<ifname>-<direction>).
const hostLinkPrefix = "host-"

// AttachHost attaches from_host to the egress and to_host to the ingress
// of the external workload's WireGuard device, with pinned tcx links: an
// agent that restarts updates them in place, so the host's flows never see
// a detached moment. tcx only (Linux >= 6.6), as for the external devices.
func (d *Datapath) AttachHost(ifname string, ifindex int) error {
	if err := d.attachTCX(hostLinkPrefix+ifname, ifindex, "egress", ebpf.AttachTCXEgress, d.objs.FromHost); err != nil {
		return err
	}
	if err := d.attachTCX(hostLinkPrefix+ifname, ifindex, "ingress", ebpf.AttachTCXIngress, d.objs.ToHost); err != nil {
		return err
	}
	d.setMode("tcx")
	return nil
}

// DetachHost removes the host programs from the device (a missing
// attachment is not an error).
func (d *Datapath) DetachHost(ifname string) error {
	return d.detachPinned(hostLinkPrefix + ifname)
}
