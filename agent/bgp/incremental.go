package bgp

import (
	"maps"
	"net/netip"
	"slices"
	"strings"

	speaker "github.com/isthmus-mesh/isthmus/bgp"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// deriver keeps what Derive gives up to date per change, so that a run
// costs what changed and not every service: with 10,000 LoadBalancer
// services applied in bulk, deriving and handing over every path on each
// of dozens of runs was most of the agent's work. It keeps, per prefix,
// who announces it (the pod CIDRs, the services by objects.Key, each with
// its advertisement), the path that makes, and the prefixes whose path
// changed since the speaker last took them.
//
// A change of a service re-derives that service; a change of the
// endpoints the services under externalTrafficPolicy Local; anything else
// (a BGPPeeringPolicy, the node's labels, pod CIDRs or addresses, or
// changes not known) derives everything again, as Derive does.
//
// The result equals Derive's for the last input (TestDeriverMatchesDerive).
// It is not safe for concurrent use.
type deriver struct {
	ready bool
	// The inputs of the last update besides the objects.
	nodeLabels map[string]string
	podCIDRs   []netip.Prefix
	nodeIPs    []netip.Addr

	plan  Plan // without paths and sources (see paths and sources)
	ads   []objects.BGPAdvertisement
	comms []parsed

	svcAnn  map[string][]announce         // what each service announces, by objects.Key
	locals  map[string]*objects.Service   // the services under Local, by objects.Key
	byPfx   map[netip.Prefix][]contrib    // who announces each prefix
	paths   map[netip.Prefix]speaker.Path // the paths byPfx makes
	pending map[netip.Prefix]struct{}     // prefixes whose path changed since take
}

// contrib is one announcement of a prefix: by owner (a service's
// objects.Key, or "" for the pod CIDRs) under advertisement ad.
type contrib struct {
	owner  string
	ad     int
	source []string
}

func newDeriver() *deriver {
	return &deriver{pending: map[netip.Prefix]struct{}{}, paths: map[netip.Prefix]speaker.Path{}}
}

// update brings the deriver to in. changed are the keys (objects.Key) of
// the objects that changed since the last update (known: the list is
// complete), endpoints whether the endpoints may have changed; full
// derives everything regardless.
func (d *deriver) update(in Input, changed []string, known, endpoints, full bool) {
	if !d.ready || !known || full || !maps.Equal(in.NodeLabels, d.nodeLabels) ||
		!slices.Equal(in.PodCIDRs, d.podCIDRs) || !slices.Equal(in.NodeIPs, d.nodeIPs) ||
		slices.ContainsFunc(changed, func(k string) bool { return strings.HasPrefix(k, objects.KindBGPPeeringPolicy+"/") }) {
		d.rebuild(in)
		return
	}
	var local *localBackends
	serves := func(s *objects.Service) bool {
		if local == nil {
			local = newLocalBackends(in.Endpoints)
		}
		return local.serves(s)
	}
	done := map[string]bool{}
	for _, k := range changed {
		if done[k] || !strings.HasPrefix(k, objects.KindService+"/") {
			continue
		}
		done[k] = true
		s, _ := in.Objects[k].(*objects.Service)
		d.setService(k, s, serves)
	}
	if endpoints {
		for k, s := range d.locals {
			if !done[k] {
				d.setService(k, s, serves)
			}
		}
	}
}

// rebuild derives everything from in; the prefixes whose path differs
// from before become pending.
func (d *deriver) rebuild(in Input) {
	old := d.paths
	d.ready = true
	d.nodeLabels, d.podCIDRs, d.nodeIPs = maps.Clone(in.NodeLabels), slices.Clone(in.PodCIDRs), slices.Clone(in.NodeIPs)
	d.svcAnn, d.locals = map[string][]announce{}, map[string]*objects.Service{}
	d.byPfx, d.paths = map[netip.Prefix][]contrib{}, map[netip.Prefix]speaker.Path{}
	var pol *objects.BGPPeeringPolicy
	d.plan, pol, d.comms = base(in, selected(in.Objects, in.NodeLabels))
	d.plan.Sources = nil
	d.ads = nil
	if pol != nil && d.plan.Err == "" {
		d.ads = pol.Spec.Advertisements
		for i, ad := range d.ads {
			if ad.Type == objects.AdvertisePodCIDR {
				for _, c := range in.PodCIDRs {
					d.add(c.Masked(), contrib{ad: i, source: []string{"pod-cidr"}})
				}
			}
		}
		serves := newLocalBackends(in.Endpoints).serves
		for k, o := range in.Objects {
			if s, ok := o.(*objects.Service); ok {
				d.setService(k, s, serves)
			}
		}
	}
	for pfx, p := range old {
		if q, ok := d.paths[pfx]; !ok || !q.Equal(p) {
			d.pending[pfx] = struct{}{}
		}
	}
	for pfx := range d.paths {
		if _, ok := old[pfx]; !ok {
			d.pending[pfx] = struct{}{}
		}
	}
}

// setService replaces what the service with key k announces by what s
// (nil: none, it is gone) does.
func (d *deriver) setService(k string, s *objects.Service, serves func(*objects.Service) bool) {
	for _, a := range d.svcAnn[k] {
		d.remove(a.pfx, k)
	}
	delete(d.svcAnn, k)
	delete(d.locals, k)
	if s == nil || d.ads == nil {
		return
	}
	if s.Spec.ExternalTraffic() == objects.TrafficPolicyLocal {
		d.locals[k] = s
	}
	as := announces(s, d.ads, serves)
	if len(as) > 0 {
		d.svcAnn[k] = as
	}
	for _, a := range as {
		d.add(a.pfx, contrib{owner: k, ad: a.ad, source: a.source})
	}
}

func (d *deriver) add(pfx netip.Prefix, c contrib) {
	d.byPfx[pfx] = append(d.byPfx[pfx], c)
	d.refresh(pfx)
}

// remove takes out every announcement of pfx by owner.
func (d *deriver) remove(pfx netip.Prefix, owner string) {
	cs := slices.DeleteFunc(d.byPfx[pfx], func(c contrib) bool { return c.owner == owner })
	if len(cs) == 0 {
		delete(d.byPfx, pfx)
	} else {
		d.byPfx[pfx] = cs
	}
	d.refresh(pfx)
}

// refresh computes pfx's path from its announcements as derive does (the
// union of the communities, the highest local preference) and marks it
// pending when it changed.
func (d *deriver) refresh(pfx netip.Prefix) {
	cs := d.byPfx[pfx]
	old, had := d.paths[pfx]
	if len(cs) == 0 {
		if had {
			delete(d.paths, pfx)
			d.pending[pfx] = struct{}{}
		}
		return
	}
	p := speaker.Path{Prefix: pfx}
	for _, c := range cs {
		for _, v := range d.comms[c.ad].std {
			if !slices.Contains(p.Communities, v) {
				p.Communities = append(p.Communities, v)
			}
		}
		for _, v := range d.comms[c.ad].large {
			if !slices.Contains(p.Large, v) {
				p.Large = append(p.Large, v)
			}
		}
		if lp := d.ads[c.ad].LocalPreference; lp != nil && *lp > p.LocalPref {
			p.LocalPref = *lp
		}
	}
	slices.Sort(p.Communities)
	slices.SortFunc(p.Large, func(a, b [3]uint32) int { return slices.Compare(a[:], b[:]) })
	if !had || !old.Equal(p) {
		d.paths[pfx] = p
		d.pending[pfx] = struct{}{}
	}
}

// sources are why pfx is announced (Plan.Sources).
func (d *deriver) sources(pfx netip.Prefix) []string {
	var out []string
	for _, c := range d.byPfx[pfx] {
		if !slices.Contains(out, c.source[0]) {
			out = append(out, c.source[0])
		}
	}
	return out
}

// take returns the paths changed since the last take and the prefixes
// withdrawn since, and forgets them (the speaker keeps what it could not
// apply yet).
func (d *deriver) take() (set []speaker.Path, del []netip.Prefix) {
	for pfx := range d.pending {
		if p, ok := d.paths[pfx]; ok {
			set = append(set, p)
		} else {
			del = append(del, pfx)
		}
	}
	clear(d.pending)
	return set, del
}
