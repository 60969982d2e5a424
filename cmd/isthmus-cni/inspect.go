package main

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// inspectPod looks into the pod's namespace: the interface exists with the
// endpoint's MAC, addresses and (when mtu is set) MTU.
func inspectPod(nsPath, ifName string, ep *api.Endpoint, mtu int) []string {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return []string{fmt.Sprintf("open netns %s: %v", nsPath, err)}
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return []string{fmt.Sprintf("netlink in %s: %v", nsPath, err)}
	}
	defer h.Close()
	link, err := h.LinkByName(ifName)
	if err != nil {
		return []string{fmt.Sprintf("interface %s in %s: %v", ifName, nsPath, err)}
	}
	var problems []string
	if !strings.EqualFold(link.Attrs().HardwareAddr.String(), ep.PodMAC) {
		problems = append(problems, fmt.Sprintf("%s has MAC %s, the endpoint %s", ifName, link.Attrs().HardwareAddr, ep.PodMAC))
	}
	if mtu != 0 && link.Attrs().MTU != mtu {
		problems = append(problems, fmt.Sprintf("%s has MTU %d, the config says %d", ifName, link.Attrs().MTU, mtu))
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_ALL) })
	if err != nil {
		return append(problems, fmt.Sprintf("addresses of %s: %v", ifName, err))
	}
	have := map[netip.Prefix]bool{}
	for _, a := range addrs {
		if p, ok := netip.AddrFromSlice(a.IP); ok {
			ones, _ := a.Mask.Size()
			have[netip.PrefixFrom(p.Unmap(), ones)] = true
		}
	}
	for p := range addrsOf(ep) {
		if !have[p] {
			problems = append(problems, fmt.Sprintf("%s lacks address %s", ifName, p))
		}
	}
	return problems
}
