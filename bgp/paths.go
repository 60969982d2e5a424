package bgp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	api "github.com/osrg/gobgp/v3/api"
	"github.com/osrg/gobgp/v3/pkg/apiutil"
	"github.com/osrg/gobgp/v3/pkg/packet/bgp"
)

// syncPaths announces what is new or changed in s.want and withdraws what
// is gone, one path at a time, looking only at the pending prefixes: the
// cost is the difference, not the table. A prefix that fails stays
// pending for the next call.
func (s *Speaker) syncPaths(ctx context.Context) error {
	var errs []error
	// Withdrawals first, then announcements in prefix order.
	order := make([]netip.Prefix, 0, len(s.pending))
	for pfx := range s.pending {
		if _, ok := s.want[pfx]; ok {
			order = append(order, pfx)
			continue
		}
		in, ok := s.paths[pfx]
		if !ok {
			delete(s.pending, pfx)
			continue
		}
		if err := s.srv.DeletePath(ctx, &api.DeletePathRequest{TableType: api.TableType_GLOBAL, Family: family(pfx.Addr()), Uuid: in.uuid}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: withdraw %s: %w", pfx, err))
			continue
		}
		delete(s.paths, pfx)
		delete(s.pending, pfx)
	}
	slices.SortFunc(order, comparePrefix)
	for _, pfx := range order {
		p := s.want[pfx]
		if in, ok := s.paths[pfx]; ok && in.path.Equal(p) {
			delete(s.pending, pfx)
			continue
		}
		ap, err := apiPath(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		// A path of the same prefix from the same (local) source replaces
		// the previous one: changed attributes need no withdrawal.
		res, err := s.srv.AddPath(ctx, &api.AddPathRequest{TableType: api.TableType_GLOBAL, Path: ap})
		if err != nil {
			errs = append(errs, fmt.Errorf("bgp: announce %s: %w", pfx, err))
			continue
		}
		s.paths[pfx] = installed{path: p, uuid: res.GetUuid()}
		delete(s.pending, pfx)
	}
	if len(errs) > 3 {
		errs = append(errs[:3], fmt.Errorf("and %d more path errors", len(errs)-3))
	}
	return errors.Join(errs...)
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// apiPath builds the GoBGP path: origin IGP, an unspecified next hop
// (GoBGP sends the session's local address), communities and local
// preference.
func apiPath(p Path) (*api.Path, error) {
	attrs := []bgp.PathAttributeInterface{bgp.NewPathAttributeOrigin(bgp.BGP_ORIGIN_ATTR_TYPE_IGP)}
	var nlri bgp.AddrPrefixInterface
	if p.Prefix.Addr().Is4() {
		nlri = bgp.NewIPAddrPrefix(uint8(p.Prefix.Bits()), p.Prefix.Addr().String())
		attrs = append(attrs, bgp.NewPathAttributeNextHop("0.0.0.0"))
	} else {
		nlri = bgp.NewIPv6AddrPrefix(uint8(p.Prefix.Bits()), p.Prefix.Addr().String())
		attrs = append(attrs, bgp.NewPathAttributeMpReachNLRI("::", []bgp.AddrPrefixInterface{nlri}))
	}
	if len(p.Communities) > 0 {
		attrs = append(attrs, bgp.NewPathAttributeCommunities(p.Communities))
	}
	if len(p.Large) > 0 {
		var l []*bgp.LargeCommunity
		for _, c := range p.Large {
			l = append(l, bgp.NewLargeCommunity(c[0], c[1], c[2]))
		}
		attrs = append(attrs, bgp.NewPathAttributeLargeCommunities(l))
	}
	if p.LocalPref != 0 {
		attrs = append(attrs, bgp.NewPathAttributeLocalPref(p.LocalPref))
	}
	ap, err := apiutil.NewPath(nlri, false, attrs, time.Now())
	if err != nil {
		return nil, fmt.Errorf("bgp: path %s: %w", p.Prefix, err)
	}
	return ap, nil
}

// Route is one path in the speaker's RIB.
type Route struct {
	Prefix      netip.Prefix
	NextHop     string // as GoBGP holds it; sent as the session's local address
	Communities []string
	LocalPref   uint32
	Age         time.Time
}

// Routes lists the speaker's RIB: what it announces, never anything a
// peer sent (the import policy rejects all of that).
func (s *Speaker) Routes(ctx context.Context) ([]Route, error) {
	s.mu.Lock()
	srv := s.srv
	s.mu.Unlock()
	if srv == nil {
		return nil, nil
	}
	var out []Route
	for _, fam := range []*api.Family{family(netip.IPv4Unspecified()), family(netip.IPv6Unspecified())} {
		err := srv.ListPath(ctx, &api.ListPathRequest{TableType: api.TableType_GLOBAL, Family: fam}, func(d *api.Destination) {
			for _, p := range d.GetPaths() {
				if r, ok := route(p); ok {
					out = append(out, r)
				}
			}
		})
		if err != nil {
			return nil, fmt.Errorf("bgp: list paths: %w", err)
		}
	}
	slices.SortFunc(out, func(a, b Route) int { return comparePrefix(a.Prefix, b.Prefix) })
	return out, nil
}

func route(p *api.Path) (Route, bool) {
	nlri, err := apiutil.GetNativeNlri(p)
	if err != nil {
		return Route{}, false
	}
	pfx, err := netip.ParsePrefix(nlri.String())
	if err != nil {
		return Route{}, false
	}
	r := Route{Prefix: pfx, Age: p.GetAge().AsTime()}
	attrs, err := apiutil.GetNativePathAttributes(p)
	if err != nil {
		return r, true
	}
	for _, a := range attrs {
		switch a := a.(type) {
		case *bgp.PathAttributeNextHop:
			r.NextHop = a.Value.String()
		case *bgp.PathAttributeMpReachNLRI:
			r.NextHop = a.Nexthop.String()
		case *bgp.PathAttributeCommunities:
			for _, c := range a.Value {
				r.Communities = append(r.Communities, fmt.Sprintf("%d:%d", c>>16, c&0xffff))
			}
		case *bgp.PathAttributeLargeCommunities:
			for _, c := range a.Values {
				r.Communities = append(r.Communities, c.String())
			}
		case *bgp.PathAttributeLocalPref:
			r.LocalPref = a.Value
		}
	}
	return r, true
}
