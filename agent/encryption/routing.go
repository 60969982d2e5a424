package encryption

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/agent/routes"
	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// syncRouting converges the rules and the tunnel table.
func (e *WireGuard) syncRouting(plan encryptionPlan, local []netip.Prefix) (int, error) {
	link, err := e.nl.LinkByName(e.dev.Name())
	if err != nil {
		return 0, fmt.Errorf("wireguard device %s: %w", e.dev.Name(), err)
	}
	return syncTableAndRules(e, link, plan, local)
}

func syncTableAndRules(e *WireGuard, link netlink.Link, plan encryptionPlan, local []netip.Prefix) (int, error) {
	var want []netlink.Route
	seen := map[netip.Prefix]bool{}
	for _, p := range slices.Concat(plan.routes, plan.vips) {
		p = p.Masked()
		if seen[p] || slices.Contains(local, p) {
			continue
		}
		seen[p] = true
		// An explicit metric: IPv6 would turn 0 into 1024.
		want = append(want, netlink.Route{Dst: routes.IPNet(p), LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK, Priority: deviceMetric,
			Table: Table, Protocol: routes.Protocol, Type: unix.RTN_UNICAST})
	}
	for _, p := range plan.unreachable {
		p = p.Masked()
		if slices.Contains(local, p) {
			continue
		}
		want = append(want, netlink.Route{Dst: routes.IPNet(p), Priority: unreachableMetric, Scope: netlink.SCOPE_UNIVERSE,
			Table: Table, Protocol: routes.Protocol, Type: unix.RTN_UNREACHABLE})
	}
	n, err := syncTable(e.nl, want)
	r, rerr := syncRules(e.nl, wantRules(local, e.nodeEnc))
	return n + r, errors.Join(err, rerr)
}

type routeKey struct {
	dst      netip.Prefix
	priority int
}

// syncTable makes the agent's routes in Table equal to want.
func syncTable(h *netlink.Handle, want []netlink.Route) (int, error) {
	have, err := nldump.Retry(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_ALL,
			&netlink.Route{Table: Table, Protocol: routes.Protocol},
			netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	})
	if err != nil {
		return 0, fmt.Errorf("list routes of table %d: %w", Table, err)
	}
	cur := map[routeKey]netlink.Route{}
	for _, rt := range have {
		if p, ok := routes.Prefix(rt.Dst); ok {
			cur[routeKey{p, rt.Priority}] = rt
		}
	}
	changes := 0
	var errs []error
	keep := map[routeKey]bool{}
	for _, w := range want {
		p, _ := routes.Prefix(w.Dst)
		k := routeKey{p, w.Priority}
		keep[k] = true
		// The kernel puts IPv6 unreachable routes on lo: compare the link
		// of device routes only.
		if old, ok := cur[k]; ok && old.Type == w.Type && (w.Type != unix.RTN_UNICAST || old.LinkIndex == w.LinkIndex) {
			continue
		}
		if err := h.RouteReplace(&w); err != nil {
			errs = append(errs, fmt.Errorf("route %s (table %d): %w", p, Table, err))
			continue
		}
		changes++
	}
	for k, rt := range cur {
		if keep[k] {
			continue
		}
		if err := h.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s (table %d): %w", k.dst, Table, err))
			continue
		}
		changes++
	}
	return changes, errors.Join(errs...)
}

// wantRules are the rules that lead to Table.
func wantRules(local []netip.Prefix, nodeEnc bool) []*netlink.Rule {
	var out []*netlink.Rule
	if nodeEnc {
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			r := encryptionRule(family)
			mask := uint32(0xffffffff)
			r.Mark, r.Mask, r.Invert = encryptionMark, &mask, true
			out = append(out, r)
		}
		return out
	}
	for _, p := range local {
		family := netlink.FAMILY_V4
		if p.Addr().Is6() {
			family = netlink.FAMILY_V6
		}
		r := encryptionRule(family)
		r.Src = routes.IPNet(p)
		out = append(out, r)
	}
	return out
}

func encryptionRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family, r.Table, r.Priority = family, Table, rulePriority
	return r
}

func ruleID(r netlink.Rule) string {
	src := ""
	if r.Src != nil {
		if p, ok := routes.Prefix(r.Src); ok {
			src = p.String()
		}
	}
	return fmt.Sprintf("%d from=%s mark=%#x invert=%v", r.Family, src, r.Mark, r.Invert)
}

// syncRules makes the rules at rulePriority that lead to
// Table equal to want.
func syncRules(h *netlink.Handle, want []*netlink.Rule) (int, error) {
	var have []netlink.Rule
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RuleListFiltered(family, &netlink.Rule{Table: Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return 0, fmt.Errorf("list rules: %w", err)
		}
		for _, r := range rs {
			r.Family = family
			if r.Priority == rulePriority {
				have = append(have, r)
			}
		}
	}
	wantIDs := map[string]bool{}
	for _, r := range want {
		wantIDs[ruleID(*r)] = true
	}
	haveIDs := map[string]bool{}
	changes := 0
	var errs []error
	for _, r := range have {
		id := ruleID(r)
		if wantIDs[id] && !haveIDs[id] {
			haveIDs[id] = true
			continue
		}
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove rule %s: %w", id, err))
			continue
		}
		changes++
	}
	for _, r := range want {
		if haveIDs[ruleID(*r)] {
			continue
		}
		if err := h.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add rule %s: %w", ruleID(*r), err))
			continue
		}
		changes++
	}
	return changes, errors.Join(errs...)
}

// RemoveRouting undoes what an earlier run with encryption left
// (rules and the tunnel table), for an agent started without encryption.
func RemoveRouting() error {
	h, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	_, err = syncTable(h, nil)
	_, rerr := syncRules(h, nil)
	return errors.Join(err, rerr)
}
