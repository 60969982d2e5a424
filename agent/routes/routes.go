// Package routes is the reconciler of the node's routes to other nodes'
// pod CIDRs (cluster mode): in the main table, via the other node's
// underlay address when it is on a connected subnet, marked with Protocol
// so the agent only ever touches its own routes.
package routes

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/internal/oneline"
	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// Protocol marks the routes the agent installs (the rtm_protocol field,
// "proto 73" in `ip route`), so that it only ever changes or removes its
// own routes and never one a human, DHCP or a routing daemon set.
const Protocol netlink.RouteProtocol = 73

// Router converges the node's routes to other nodes' pod CIDRs; tests
// substitute a fake.
type Router interface {
	// SyncRoutes installs want (where the gateway is on a connected
	// subnet) and, when prune is set, removes the agent's other routes.
	// It returns how many routes it changed.
	SyncRoutes(want []desired.PodRoute, prune bool) (int, error)
}

// netlinkRouter manages routes in the main table of the netns its handle
// is bound to.
type netlinkRouter struct{ h *netlink.Handle }

// NewNetlink returns the Router of the current netns.
func NewNetlink() (Router, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("netlink handle for routes: %w", err)
	}
	return netlinkRouter{h: h}, nil
}

// SyncRoutes implements Router. A route for a destination that already has
// a route the agent did not make is left alone (with an error saying so):
// whoever made it knows better.
func (r netlinkRouter) SyncRoutes(want []desired.PodRoute, prune bool) (int, error) {
	have, err := nldump.Retry(func() ([]netlink.Route, error) {
		return r.h.RouteListFiltered(netlink.FAMILY_ALL,
			&netlink.Route{Protocol: Protocol, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return 0, fmt.Errorf("list routes: %w", err)
	}
	mine := map[netip.Prefix]netlink.Route{}
	for _, rt := range have {
		if p, ok := Prefix(rt.Dst); ok {
			mine[p] = rt
		}
	}
	changes := 0
	var errs []error
	keep := map[netip.Prefix]bool{}
	for _, w := range want {
		if keep[w.Dst] {
			continue // one route per destination: the first node claiming it
		}
		link, ok := r.connectedVia(w.Via)
		if !ok {
			continue // the underlay routes it, or nothing does
		}
		if old, ok := mine[w.Dst]; ok && ipEqual(old.Gw, w.Via) && old.LinkIndex == link {
			keep[w.Dst] = true
			continue
		}
		if foreign, err := r.foreignRoute(w.Dst); err != nil || foreign {
			if err == nil {
				err = fmt.Errorf("route to %s via %s: another route to %s exists that the agent did not make; leaving it", w.Dst, w.Via, w.Dst)
			}
			errs = append(errs, err)
			continue
		}
		rt := &netlink.Route{
			Dst: IPNet(w.Dst), Gw: net.IP(w.Via.AsSlice()), LinkIndex: link,
			Protocol: Protocol, Table: unix.RT_TABLE_MAIN, Scope: netlink.SCOPE_UNIVERSE,
		}
		if err := r.h.RouteReplace(rt); err != nil {
			errs = append(errs, fmt.Errorf("route to %s via %s: %w", w.Dst, w.Via, err))
			continue
		}
		keep[w.Dst] = true
		changes++
	}
	if prune {
		for p, rt := range mine {
			if keep[p] {
				continue
			}
			if err := r.h.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("remove route to %s: %w", p, err))
				continue
			}
			changes++
		}
	}
	return changes, oneline.Join(errs...)
}

// connectedVia returns the link through which gw is directly reachable (on
// a connected subnet of this node), as the kernel's own route lookup says.
func (r netlinkRouter) connectedVia(gw netip.Addr) (int, bool) {
	routes, err := r.h.RouteGet(net.IP(gw.AsSlice()))
	if err != nil || len(routes) == 0 {
		return 0, false
	}
	rt := routes[0]
	if rt.Gw != nil || rt.Type == unix.RTN_LOCAL || rt.LinkIndex == 0 {
		return 0, false
	}
	if l, err := r.h.LinkByIndex(rt.LinkIndex); err != nil || l.Attrs().Flags&net.FlagLoopback != 0 {
		return 0, false
	}
	return rt.LinkIndex, true
}

// foreignRoute reports whether the main table has a route to exactly dst
// that the agent did not make.
func (r netlinkRouter) foreignRoute(dst netip.Prefix) (bool, error) {
	family := netlink.FAMILY_V4
	if dst.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	routes, err := nldump.Retry(func() ([]netlink.Route, error) {
		return r.h.RouteListFiltered(family,
			&netlink.Route{Dst: IPNet(dst), Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	})
	if err != nil {
		return false, fmt.Errorf("list routes to %s: %w", dst, err)
	}
	for _, rt := range routes {
		if p, ok := Prefix(rt.Dst); ok && p == dst && rt.Protocol != Protocol {
			return true, nil
		}
	}
	return false, nil
}

// Prefix is the prefix of n (IPv4 unmapped, masked).
func Prefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	a = a.Unmap()
	return netip.PrefixFrom(a, ones).Masked(), true
}

// IPNet is p as netlink takes it.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipEqual(ip net.IP, a netip.Addr) bool {
	b, ok := netip.AddrFromSlice(ip)
	return ok && b.Unmap() == a
}

// Shadowed is a Router that remembers the routes it last converged to, so
// that a reconcile in which the mesh's nodes did not change lists no
// routes: it passes a SyncRoutes on only when want or prune differ from
// the last successful one, or when that one is older than maxAge (drift:
// a route removed by hand).
type Shadowed struct {
	r      Router
	maxAge time.Duration

	last  []desired.PodRoute
	prune bool
	at    time.Time
	valid bool
}

// NewShadowed wraps r.
func NewShadowed(r Router, maxAge time.Duration) *Shadowed { return &Shadowed{r: r, maxAge: maxAge} }

// SyncRoutes implements Router.
func (s *Shadowed) SyncRoutes(want []desired.PodRoute, prune bool) (int, error) {
	if s.valid && prune == s.prune && slices.Equal(want, s.last) && time.Since(s.at) < s.maxAge {
		return 0, nil
	}
	s.valid = false
	n, err := s.r.SyncRoutes(want, prune)
	if err == nil {
		s.last, s.prune, s.at, s.valid = slices.Clone(want), prune, time.Now(), true
	}
	return n, err
}
