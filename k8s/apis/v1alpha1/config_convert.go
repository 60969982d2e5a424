package v1alpha1

import (
	"fmt"
	"maps"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

// meta is the Isthmus metadata of a resource: cluster-scoped kinds get the
// namespace "default" (the one their keys use).
func meta(m metav1.ObjectMeta) objects.Meta {
	ns := m.Namespace
	if ns == "" {
		ns = objects.DefaultNamespace
	}
	return objects.Meta{Name: m.Name, Namespace: ns, Labels: maps.Clone(m.Labels)}
}

// ToObject returns the Isthmus LoadBalancerIPPool of the resource,
// validated (objects.LoadBalancerIPPool.Validate: the error names the
// field). Annotations are not carried: the clustermesh server adds its own.
func (p *LoadBalancerIPPool) ToObject() (objects.LoadBalancerIPPool, error) {
	if p == nil {
		return objects.LoadBalancerIPPool{}, fmt.Errorf("loadbalancerippool: nil")
	}
	out := objects.LoadBalancerIPPool{
		APIVersion: objects.APIVersion, Kind: objects.KindLoadBalancerIPPool, Metadata: meta(p.ObjectMeta),
		Spec: objects.LoadBalancerIPPoolSpec{ServiceSelector: p.Spec.ServiceSelector.toObject(), Disabled: p.Spec.Disabled},
	}
	for _, b := range p.Spec.Blocks {
		out.Spec.Blocks = append(out.Spec.Blocks, objects.PoolBlock{CIDR: b.CIDR, Start: b.Start, Stop: b.Stop})
	}
	if err := out.Validate(); err != nil {
		return objects.LoadBalancerIPPool{}, err
	}
	return out, nil
}

// ToObject returns the Isthmus BGPPeeringPolicy of the resource, with the
// defaults objects.Decode fills in, validated.
func (p *BGPPeeringPolicy) ToObject() (objects.BGPPeeringPolicy, error) {
	if p == nil {
		return objects.BGPPeeringPolicy{}, fmt.Errorf("bgppeeringpolicy: nil")
	}
	s := p.Spec
	if err := inRange("spec.localASN", s.LocalASN, 0, 1<<32-1); err != nil {
		return objects.BGPPeeringPolicy{}, err
	}
	out := objects.BGPPeeringPolicy{
		APIVersion: objects.APIVersion, Kind: objects.KindBGPPeeringPolicy, Metadata: meta(p.ObjectMeta),
		Spec: objects.BGPPeeringPolicySpec{NodeSelector: s.NodeSelector.toObject(), LocalASN: uint32(s.LocalASN), RouterID: s.RouterID},
	}
	for i, n := range s.Neighbors {
		path := fmt.Sprintf("spec.neighbors[%d]", i)
		for _, c := range []struct {
			field string
			v     int64
			max   int64
		}{
			{"peerASN", n.PeerASN, 1<<32 - 1}, {"port", int64(n.Port), 65535}, {"ebgpMultihopTTL", int64(n.EBGPMultihopTTL), 255},
			{"gracefulRestart.restartTimeSeconds", int64(n.GracefulRestart.RestartTimeSeconds), 65535},
		} {
			if err := inRange(path+"."+c.field, c.v, 0, c.max); err != nil {
				return objects.BGPPeeringPolicy{}, err
			}
		}
		on := objects.BGPNeighbor{Address: n.Address, PeerASN: uint32(n.PeerASN), Port: uint16(n.Port), EBGPMultihopTTL: uint8(n.EBGPMultihopTTL),
			PasswordFile: n.PasswordFile, GracefulRestart: objects.BGPGracefulRestart{Enabled: n.GracefulRestart.Enabled, RestartTimeSeconds: uint16(n.GracefulRestart.RestartTimeSeconds)}}
		for _, t := range []struct {
			field string
			in    *int32
			out   **uint16
		}{
			{"holdTimeSeconds", n.Timers.HoldTimeSeconds, &on.Timers.HoldTimeSeconds},
			{"keepaliveTimeSeconds", n.Timers.KeepaliveTimeSeconds, &on.Timers.KeepaliveTimeSeconds},
			{"connectRetryTimeSeconds", n.Timers.ConnectRetryTimeSeconds, &on.Timers.ConnectRetryTimeSeconds},
		} {
			if t.in == nil {
				continue
			}
			if err := inRange(path+".timers."+t.field, int64(*t.in), 0, 65535); err != nil {
				return objects.BGPPeeringPolicy{}, err
			}
			v := uint16(*t.in)
			*t.out = &v
		}
		out.Spec.Neighbors = append(out.Spec.Neighbors, on)
	}
	for i, a := range s.Advertisements {
		oa := objects.BGPAdvertisement{Type: a.Type, Selector: a.Selector.toObject(), Communities: slices.Clone(a.Communities)}
		if a.LocalPreference != nil {
			if err := inRange(fmt.Sprintf("spec.advertisements[%d].localPreference", i), *a.LocalPreference, 0, 1<<32-1); err != nil {
				return objects.BGPPeeringPolicy{}, err
			}
			v := uint32(*a.LocalPreference)
			oa.LocalPreference = &v
		}
		out.Spec.Advertisements = append(out.Spec.Advertisements, oa)
	}
	// Validate first, as Decode does: Normalize fills in defaults (a
	// keepalive from the hold time) that would hide what the user wrote.
	if err := out.Validate(); err != nil {
		return objects.BGPPeeringPolicy{}, err
	}
	objects.Normalize(&out)
	return out, nil
}

// ToObject returns the Isthmus L2AnnouncementPolicy of the resource, with
// its defaults written out, validated.
func (p *L2AnnouncementPolicy) ToObject() (objects.L2AnnouncementPolicy, error) {
	if p == nil {
		return objects.L2AnnouncementPolicy{}, fmt.Errorf("l2announcementpolicy: nil")
	}
	s := p.Spec
	out := objects.L2AnnouncementPolicy{
		APIVersion: objects.APIVersion, Kind: objects.KindL2AnnouncementPolicy, Metadata: meta(p.ObjectMeta),
		Spec: objects.L2AnnouncementPolicySpec{ServiceSelector: s.ServiceSelector.toObject(), NodeSelector: s.NodeSelector.toObject(),
			Interfaces: slices.Clone(s.Interfaces), InterfaceRegex: s.InterfaceRegex},
	}
	if s.LoadBalancerIPs != nil {
		v := *s.LoadBalancerIPs
		out.Spec.LoadBalancerIPs = &v
	}
	if s.ExternalIPs != nil {
		v := *s.ExternalIPs
		out.Spec.ExternalIPs = &v
	}
	if err := out.Validate(); err != nil {
		return objects.L2AnnouncementPolicy{}, err
	}
	objects.Normalize(&out)
	return out, nil
}

// ToObject returns the Isthmus ExternalWorkload of the resource (no
// status: the clustermesh server keeps that), validated.
func (w *ExternalWorkload) ToObject() (objects.ExternalWorkload, error) {
	if w == nil {
		return objects.ExternalWorkload{}, fmt.Errorf("externalworkload: nil")
	}
	out := objects.ExternalWorkload{
		APIVersion: objects.APIVersion, Kind: objects.KindExternalWorkload, Metadata: meta(w.ObjectMeta),
		Spec: objects.ExternalWorkloadSpec{IPv4: w.Spec.IPv4, IPv6: w.Spec.IPv6},
	}
	if err := out.Validate(); err != nil {
		return objects.ExternalWorkload{}, err
	}
	return out, nil
}

// inRange checks what the schema bounds too, for objects that did not
// come through the API server (and so that a conversion never wraps).
func inRange(path string, v, lo, hi int64) error {
	if v < lo || v > hi {
		return fmt.Errorf("%s: must be %d-%d, got %d", path, lo, hi, v)
	}
	return nil
}
