package l2

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// Link is an interface of the node as the announcer sees it.
type Link struct {
	Name  string
	Index int
	MAC   net.HardwareAddr
	// Unusable says why the interface may never answer (a bond member, a
	// NOARP or non-Ethernet interface); "" if it may.
	Unusable string
	// Carrier: administratively up and the lower layer up.
	Carrier bool
}

// Links lists the node's interfaces.
func Links() ([]Link, error) {
	ls, err := nldump.Retry(netlink.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	out := make([]Link, 0, len(ls))
	for _, l := range ls {
		out = append(out, linkOf(l))
	}
	return out, nil
}

func linkOf(l netlink.Link) Link {
	a := l.Attrs()
	return Link{Name: a.Name, Index: a.Index, MAC: a.HardwareAddr, Unusable: unusable(l), Carrier: carrier(a)}
}

// unusable says why l may never answer ARP or NDP.
func unusable(l netlink.Link) string {
	a := l.Attrs()
	switch {
	case a.RawFlags&unix.IFF_NOARP != 0:
		// The kernel does no neighbour resolution here; neither do we.
		return "NOARP interface"
	case a.Slave != nil || bondMaster(a.MasterIndex):
		// A bond member's frames belong to the bond: answering on the
		// member would give the address a MAC the bond may not use, and
		// from a port the bond may not be sending on.
		return "bond member"
	case len(a.HardwareAddr) != 6 || l.Type() == "loopback":
		return "not an Ethernet interface"
	}
	return ""
}

func carrier(a *netlink.LinkAttrs) bool {
	return a.RawFlags&unix.IFF_UP != 0 && a.RawFlags&unix.IFF_LOWER_UP != 0
}

// bondMaster reports whether the interface with index i is a bond.
func bondMaster(i int) bool {
	if i == 0 {
		return false
	}
	m, err := netlink.LinkByIndex(i)
	return err == nil && m.Type() == "bond"
}

func linkByIndex(i int) (Link, error) {
	l, err := netlink.LinkByIndex(i)
	if err != nil {
		return Link{}, err
	}
	return linkOf(l), nil
}
