// Package node reads what the kernel says about this node: its addresses
// (which map to the host identity), the underlay addresses the mesh
// publishes when none are configured, the underlay's MTU, and the boot ID.
// WatchAddrs makes the node's addresses a source of desired state.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// Addrs lists the node's own addresses (they map to the host identity).
// Link-local addresses are left out: they are not unique to the node.
func Addrs() ([]netip.Addr, error) {
	// A new pod's veth getting its link-local address interrupts the
	// dump: nldump asks again.
	list, err := nldump.Retry(func() ([]netlink.Addr, error) { return netlink.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		if ip = ip.Unmap(); hostAddr(ip) {
			out = append(out, ip)
		}
	}
	return out, nil
}

// hostAddr reports whether ip is one of the node's own addresses as the
// host identity has them: not link-local (not unique to the node),
// multicast or unspecified.
func hostAddr(ip netip.Addr) bool {
	return !ip.IsLinkLocalUnicast() && !ip.IsMulticast() && !ip.IsUnspecified()
}

// WatchAddrs calls changed whenever a node address comes or goes, until
// ctx ends, so the host identity follows the node's addresses.
func WatchAddrs(ctx context.Context, log *slog.Logger, changed func()) {
	ch := make(chan netlink.AddrUpdate, 64)
	err := netlink.AddrSubscribeWithOptions(ch, ctx.Done(), netlink.AddrSubscribeOptions{
		ErrorCallback: func(err error) {
			if ctx.Err() == nil {
				log.Warn("node address watch", "err", err)
			}
		},
	})
	if err != nil {
		log.Warn("cannot watch node addresses; relying on periodic resync", "err", err)
		return
	}
	relay(ctx, ch, func(u netlink.AddrUpdate) bool {
		// A pod's veth coming or going brings link-local addresses,
		// which Addrs leaves out: no reason to list every address of
		// the node again (that is a dump over every pod's veth).
		ip, ok := netip.AddrFromSlice(u.LinkAddress.IP)
		return !ok || hostAddr(ip.Unmap())
	}, changed)
}

// relay calls changed for every update from ch that matters, until ctx
// ends or ch closes.
func relay[T any](ctx context.Context, ch <-chan T, matters func(T) bool, changed func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			if matters(u) {
				changed()
			}
		}
	}
}

// WatchDefaultRoutes calls changed whenever a default route (main table)
// comes or goes, until ctx ends: with the node's global addresses they
// decide DefaultRouteAddrs, which a cache can then keep between changes.
// The routes of pods (one per pod, to its veth) are not reported.
func WatchDefaultRoutes(ctx context.Context, log *slog.Logger, changed func()) {
	watchDefaultRoutes(ctx, log, nil, changed)
}

// watchDefaultRoutes is WatchDefaultRoutes in the netns ns (nil: this
// process's).
func watchDefaultRoutes(ctx context.Context, log *slog.Logger, ns *netns.NsHandle, changed func()) {
	ch := make(chan netlink.RouteUpdate, 64)
	err := netlink.RouteSubscribeWithOptions(ch, ctx.Done(), netlink.RouteSubscribeOptions{
		Namespace: ns,
		ErrorCallback: func(err error) {
			if ctx.Err() == nil {
				log.Warn("default route watch", "err", err)
			}
		},
	})
	if err != nil {
		log.Warn("cannot watch default routes; relying on periodic resync", "err", err)
		return
	}
	relay(ctx, ch, func(u netlink.RouteUpdate) bool {
		ones, _ := maskOf(u.Route)
		return ones == 0 && (u.Table == 0 || u.Table == 254)
	}, changed)
}

// DefaultRouteAddrs returns the global addresses of the interfaces that
// hold a default route (IPv4 and IPv6), the node's underlay addresses when
// none are configured.
func DefaultRouteAddrs() ([]netip.Addr, error) { return defaultRouteAddrsOf(&netlink.Handle{}) }

// defaultRouteAddrsOf is DefaultRouteAddrs in the netns of h.
func defaultRouteAddrsOf(h *netlink.Handle) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := nldump.Retry(func() ([]netlink.Route, error) { return h.RouteListFiltered(family, &netlink.Route{}, 0) })
		if err != nil {
			return nil, err
		}
		links := map[int]bool{}
		for _, rt := range routes {
			if ones, _ := maskOf(rt); rt.LinkIndex > 0 && ones == 0 && (rt.Table == 0 || rt.Table == 254) {
				links[rt.LinkIndex] = true
			}
		}
		for _, idx := range slices.Sorted(maps.Keys(links)) {
			link, err := h.LinkByIndex(idx)
			if err != nil {
				continue
			}
			addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(link, family) })
			if err != nil {
				continue
			}
			for _, ad := range addrs {
				ip, ok := netip.AddrFromSlice(ad.IP)
				if !ok {
					continue
				}
				ip = ip.Unmap()
				if ip.IsGlobalUnicast() && !slices.Contains(out, ip) {
					out = append(out, ip)
				}
			}
		}
	}
	return out, nil
}

// maskOf returns the prefix length of a route's destination (0 for a
// default route, which has none).
func maskOf(rt netlink.Route) (int, bool) {
	if rt.Dst == nil {
		return 0, true
	}
	ones, _ := rt.Dst.Mask.Size()
	return ones, true
}

// UnderlayMTU is the MTU of the interface holding one of ips (1500 when
// none does), and whether the underlay is IPv6 only.
func UnderlayMTU(ips []netip.Addr) (int, bool) {
	v6 := len(ips) > 0 && !slices.ContainsFunc(ips, netip.Addr.Is4)
	addrs, _ := nldump.Retry(func() ([]netlink.Addr, error) { return netlink.AddrList(nil, netlink.FAMILY_ALL) }) // every link's
	for _, ad := range addrs {
		if a, ok := netip.AddrFromSlice(ad.IP); ok && slices.Contains(ips, a.Unmap()) {
			if l, err := netlink.LinkByIndex(ad.LinkIndex); err == nil {
				return l.Attrs().MTU, v6
			}
		}
	}
	return 1500, v6
}

// BootID identifies this boot of the node; peers reset state tied to it.
func BootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// AddrCache keeps the node's addresses in memory, so that a reconcile does
// not dump them over netlink: they are listed on first use, again after
// Invalidate (WatchAddrs saw one come or go), and at least every maxAge
// (an event lost to a full socket buffer).
type AddrCache struct {
	list   func() ([]netip.Addr, error)
	maxAge time.Duration

	mu    sync.Mutex
	gen   uint64 // bumped by Invalidate
	addrs []netip.Addr
	at    time.Time
	of    uint64 // the gen addrs were listed at
	valid bool
}

// NewAddrCache returns a cache over list.
func NewAddrCache(list func() ([]netip.Addr, error), maxAge time.Duration) *AddrCache {
	return &AddrCache{list: list, maxAge: maxAge}
}

// Invalidate makes the next Get list the addresses again.
func (c *AddrCache) Invalidate() {
	c.mu.Lock()
	c.gen++
	c.mu.Unlock()
}

// Get returns the node's addresses. The slice is shared: do not modify it.
func (c *AddrCache) Get() ([]netip.Addr, error) {
	c.mu.Lock()
	if c.valid && c.of == c.gen && time.Since(c.at) < c.maxAge {
		addrs := c.addrs
		c.mu.Unlock()
		return addrs, nil
	}
	gen := c.gen
	c.mu.Unlock()
	addrs, err := c.list()
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// After an Invalidate during the listing, the result (which may
	// predate the change) serves this call only: of != gen.
	c.addrs, c.at, c.of, c.valid = addrs, time.Now(), gen, true
	return addrs, nil
}

// DefaultRouteLinks returns the indexes of the interfaces that hold a
// default route (IPv4 or IPv6, main table): the node's way to the outside.
func DefaultRouteLinks() ([]int, error) {
	h := &netlink.Handle{}
	links := map[int]bool{}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := nldump.Retry(func() ([]netlink.Route, error) { return h.RouteListFiltered(family, &netlink.Route{}, 0) })
		if err != nil {
			return nil, err
		}
		for _, rt := range routes {
			if ones, _ := maskOf(rt); rt.LinkIndex > 0 && ones == 0 && (rt.Table == 0 || rt.Table == 254) {
				links[rt.LinkIndex] = true
			}
			for _, nh := range rt.MultiPath {
				if ones, _ := maskOf(rt); nh.LinkIndex > 0 && ones == 0 && (rt.Table == 0 || rt.Table == 254) {
					links[nh.LinkIndex] = true
				}
			}
		}
	}
	return slices.Sorted(maps.Keys(links)), nil
}

// LinksHolding returns the indexes of the interfaces that hold one of ips.
func LinksHolding(ips []netip.Addr) ([]int, error) {
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return netlink.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, err
	}
	links := map[int]bool{}
	for _, ad := range addrs {
		if a, ok := netip.AddrFromSlice(ad.IP); ok && slices.Contains(ips, a.Unmap()) {
			links[ad.LinkIndex] = true
		}
	}
	return slices.Sorted(maps.Keys(links)), nil
}

// Roles of an external device (ExternalLinks).
const (
	RoleUnderlay = "underlay" // holds a node IP: traffic to other nodes in the clear
	RoleOutside  = "outside"  // holds a default route: the way to the outside
)

// ExternalLink is one of the node's external devices, with why it is one.
type ExternalLink struct {
	Index int
	Roles []string // RoleUnderlay, RoleOutside
}

// ExternalLinks returns the node's external devices, each once: those that
// hold one of nodeIPs (underlay; none when nodeIPs is empty) and those that
// hold a default route (outside), in that order. What could not be read is
// in the error, with the devices that could.
func ExternalLinks(nodeIPs []netip.Addr) ([]ExternalLink, error) {
	var out []ExternalLink
	var errs []error
	add := func(role string, idxs []int, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("find %s devices: %w", role, err))
		}
		for _, i := range idxs {
			k := slices.IndexFunc(out, func(e ExternalLink) bool { return e.Index == i })
			if k < 0 {
				out = append(out, ExternalLink{Index: i})
				k = len(out) - 1
			}
			out[k].Roles = append(out[k].Roles, role)
		}
	}
	if len(nodeIPs) > 0 {
		idxs, err := LinksHolding(nodeIPs)
		add(RoleUnderlay, idxs, err)
	}
	idxs, err := DefaultRouteLinks()
	add(RoleOutside, idxs, err)
	return out, errors.Join(errs...)
}
