package objects

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// KindBGPPeeringPolicy names the BGP peering kind.
const KindBGPPeeringPolicy = "BGPPeeringPolicy"

// Advertisement types (BGPAdvertisement.Type).
const (
	// AdvertisePodCIDR: the node's pod CIDRs.
	AdvertisePodCIDR = "PodCIDR"
	// AdvertiseLoadBalancerIP: the load-balancer addresses LB-IPAM
	// assigned to the selected services (their status).
	AdvertiseLoadBalancerIP = "LoadBalancerIP"
	// AdvertiseExternalIP: the spec.externalIPs of the selected services.
	AdvertiseExternalIP = "ExternalIP"
)

// BGP defaults and limits Decode applies and Validate enforces.
const (
	DefaultBGPPort             = 179
	DefaultBGPHoldTime         = 90  // seconds
	DefaultBGPConnectRetryTime = 5   // seconds: a top-of-rack router that restarts is found again quickly
	DefaultBGPRestartTime      = 120 // seconds
	// MaxBGPRestartTime is the 12-bit field of the graceful restart
	// capability (RFC 4724).
	MaxBGPRestartTime = 4095
	// asTrans is the 4-byte ASN placeholder (RFC 6793): no speaker may use
	// it as its own or a peer's AS.
	asTrans = 23456
	maxASN  = 4294967294 // 4294967295 is reserved (RFC 7300)
)

// BGPPeeringPolicy makes the nodes it selects peer with routers over BGP
// and announce pod CIDRs and service addresses. It applies to the whole
// cluster: its namespace is always "default" (leave it out), and its
// advertisements select services of every namespace.
type BGPPeeringPolicy struct {
	APIVersion string               `json:"apiVersion"`
	Kind       string               `json:"kind"`
	Metadata   Meta                 `json:"metadata"`
	Spec       BGPPeeringPolicySpec `json:"spec"`
}

// BGPPeeringPolicySpec is one node's BGP speaker: its AS, its router ID,
// its neighbours and what it announces to them.
type BGPPeeringPolicySpec struct {
	// NodeSelector picks the nodes by their labels (agent --node-labels,
	// or the Kubernetes Node's); empty selects every node.
	NodeSelector Selector `json:"nodeSelector,omitzero"`
	LocalASN     uint32   `json:"localASN"`
	// RouterID is an IPv4 address; default the node's IPv4 address.
	RouterID  string        `json:"routerID,omitempty"`
	Neighbors []BGPNeighbor `json:"neighbors"`
	// Advertisements say what to announce; none announces nothing (the
	// sessions still come up).
	Advertisements []BGPAdvertisement `json:"advertisements,omitempty"`
}

// BGPNeighbor is one peer router.
type BGPNeighbor struct {
	Address string `json:"address"`
	PeerASN uint32 `json:"peerASN"`
	// Port is the peer's BGP port (default 179).
	Port uint16 `json:"port,omitempty"`
	// EBGPMultihopTTL is the IP TTL of an eBGP session's packets; 0
	// (default) means 1: the peer is directly connected.
	EBGPMultihopTTL uint8 `json:"ebgpMultihopTTL,omitempty"`
	// PasswordFile holds the TCP MD5 password (RFC 2385), read by the
	// agent on the node; leading and trailing white space is dropped. A
	// missing or empty file keeps the session down with the reason in the
	// status.
	PasswordFile    string             `json:"passwordFile,omitempty"`
	Timers          BGPTimers          `json:"timers,omitzero"`
	GracefulRestart BGPGracefulRestart `json:"gracefulRestart,omitzero"`
}

// BGPTimers are a session's timers in seconds. Decode fills in the
// defaults: hold 90, keepalive a third of hold, connect retry 5. The hold
// time is at least 3 and the keepalive below it.
type BGPTimers struct {
	HoldTimeSeconds         *uint16 `json:"holdTimeSeconds,omitempty"`
	KeepaliveTimeSeconds    *uint16 `json:"keepaliveTimeSeconds,omitempty"`
	ConnectRetryTimeSeconds *uint16 `json:"connectRetryTimeSeconds,omitempty"`
}

// BGPGracefulRestart is RFC 4724 graceful restart: while the agent
// restarts, the peer keeps the node's routes for RestartTimeSeconds
// (default 120, at most 4095).
type BGPGracefulRestart struct {
	Enabled            bool   `json:"enabled,omitempty"`
	RestartTimeSeconds uint16 `json:"restartTimeSeconds,omitempty"`
}

// BGPAdvertisement is one kind of prefix to announce, with the path
// attributes its routes carry.
type BGPAdvertisement struct {
	// Type is PodCIDR, LoadBalancerIP or ExternalIP.
	Type string `json:"type"`
	// Selector picks services (LoadBalancerIP, ExternalIP) by their
	// labels, in every namespace; the label isthmus.io/namespace holds
	// the service's namespace. Empty selects every service. Not allowed
	// with PodCIDR.
	Selector Selector `json:"selector,omitzero"`
	// Communities are standard ("65000:100", or no-export, no-advertise,
	// no-export-subconfed, no-peer, blackhole) or large ("65000:1:2")
	// communities.
	Communities []string `json:"communities,omitempty"`
	// LocalPreference is sent to iBGP neighbours (an eBGP peer never
	// receives LOCAL_PREF).
	LocalPreference *uint32 `json:"localPreference,omitempty"`
}

// GetKind implements Object.
func (p BGPPeeringPolicy) GetKind() string { return KindBGPPeeringPolicy }

// GetMeta implements Object.
func (p BGPPeeringPolicy) GetMeta() Meta { return p.Metadata }

func (p *BGPPeeringPolicy) defaultNamespace() {
	p.Metadata.Namespace = namespaceOrDefault(p.Metadata.Namespace)
}

// normalize fills in the documented defaults.
func (p *BGPPeeringPolicy) normalize() {
	u16 := func(v uint16) *uint16 { return &v }
	for i := range p.Spec.Neighbors {
		n := &p.Spec.Neighbors[i]
		if n.Port == 0 {
			n.Port = DefaultBGPPort
		}
		t := &n.Timers
		if t.HoldTimeSeconds == nil {
			t.HoldTimeSeconds = u16(DefaultBGPHoldTime)
		}
		if t.KeepaliveTimeSeconds == nil {
			t.KeepaliveTimeSeconds = u16(*t.HoldTimeSeconds / 3)
		}
		if t.ConnectRetryTimeSeconds == nil {
			t.ConnectRetryTimeSeconds = u16(DefaultBGPConnectRetryTime)
		}
		if n.GracefulRestart.Enabled && n.GracefulRestart.RestartTimeSeconds == 0 {
			n.GracefulRestart.RestartTimeSeconds = DefaultBGPRestartTime
		}
		if a, err := netip.ParseAddr(n.Address); err == nil {
			n.Address = a.String() // one spelling, so duplicates compare equal
		}
	}
	for i := range p.Spec.Advertisements {
		for j, c := range p.Spec.Advertisements[i].Communities {
			p.Spec.Advertisements[i].Communities[j] = strings.ToLower(c)
		}
	}
}

// Validate checks a BGPPeeringPolicy as Decode leaves it (namespace set).
func (p BGPPeeringPolicy) Validate() error {
	if err := validateHeader(p.APIVersion, p.Kind, KindBGPPeeringPolicy, p.Metadata); err != nil {
		return err
	}
	if p.Metadata.Namespace != DefaultNamespace {
		return fieldError("metadata.namespace", "%s applies to the whole cluster: leave the namespace out (got %q)", KindBGPPeeringPolicy, p.Metadata.Namespace)
	}
	s := p.Spec
	if err := validateSelector("spec.nodeSelector", s.NodeSelector); err != nil {
		return err
	}
	if err := validateASN("spec.localASN", s.LocalASN); err != nil {
		return err
	}
	if s.RouterID != "" {
		a, err := netip.ParseAddr(s.RouterID)
		if err != nil || !a.Is4() || a.IsUnspecified() {
			return fieldError("spec.routerID", "must be an IPv4 address other than 0.0.0.0, got %q", s.RouterID)
		}
	}
	if len(s.Neighbors) == 0 {
		return fieldError("spec.neighbors", "must list at least one neighbor")
	}
	seen := map[netip.Addr]int{}
	for i, n := range s.Neighbors {
		path := fmt.Sprintf("spec.neighbors[%d]", i)
		a, err := parseUnicast(n.Address)
		if err != nil {
			return fieldError(path+".address", "%v", err)
		}
		if j, dup := seen[a]; dup {
			return fieldError(path+".address", "%s is already listed as spec.neighbors[%d]", a, j)
		}
		seen[a] = i
		if err := n.validate(path, s.LocalASN); err != nil {
			return err
		}
	}
	for i, ad := range s.Advertisements {
		if err := ad.validate(fmt.Sprintf("spec.advertisements[%d]", i)); err != nil {
			return err
		}
	}
	return nil
}

func validateASN(path string, asn uint32) error {
	switch {
	case asn == 0:
		return fieldError(path, "required, 1-%d", uint32(maxASN))
	case asn == asTrans:
		return fieldError(path, "%d is AS_TRANS, a placeholder that no speaker may use (RFC 6793)", asn)
	case asn > maxASN:
		return fieldError(path, "must be 1-%d, got %d", uint32(maxASN), asn)
	}
	return nil
}

func (n BGPNeighbor) validate(path string, localASN uint32) error {
	if err := validateASN(path+".peerASN", n.PeerASN); err != nil {
		return err
	}
	if n.EBGPMultihopTTL > 1 && n.PeerASN == localASN {
		return fieldError(path+".ebgpMultihopTTL", "applies to eBGP only; this neighbor is iBGP (peerASN = localASN)")
	}
	if n.PasswordFile != "" && !strings.HasPrefix(n.PasswordFile, "/") {
		return fieldError(path+".passwordFile", "must be an absolute path, got %q", n.PasswordFile)
	}
	t := n.Timers
	hold := uint16(DefaultBGPHoldTime)
	if t.HoldTimeSeconds != nil {
		hold = *t.HoldTimeSeconds
		// RFC 4271 allows 0 (no keepalives); the embedded speaker (GoBGP)
		// replaces 0 by its default, so it is refused rather than ignored.
		if hold < 3 {
			return fieldError(path+".timers.holdTimeSeconds", "must be at least 3 (RFC 4271; 0, no keepalives, is not supported), got %d", hold)
		}
	}
	if t.KeepaliveTimeSeconds != nil {
		if ka := *t.KeepaliveTimeSeconds; ka == 0 || ka >= hold {
			return fieldError(path+".timers.keepaliveTimeSeconds", "must be 1 to less than the hold time (%d), got %d", hold, ka)
		}
	}
	if t.ConnectRetryTimeSeconds != nil && *t.ConnectRetryTimeSeconds == 0 {
		return fieldError(path+".timers.connectRetryTimeSeconds", "must be at least 1")
	}
	gr := n.GracefulRestart
	if !gr.Enabled && gr.RestartTimeSeconds != 0 {
		return fieldError(path+".gracefulRestart.restartTimeSeconds", "needs gracefulRestart.enabled")
	}
	if gr.RestartTimeSeconds > MaxBGPRestartTime {
		return fieldError(path+".gracefulRestart.restartTimeSeconds", "must be at most %d, got %d", MaxBGPRestartTime, gr.RestartTimeSeconds)
	}
	return nil
}

func (ad BGPAdvertisement) validate(path string) error {
	switch ad.Type {
	case AdvertisePodCIDR:
		if len(ad.Selector.MatchLabels) > 0 || len(ad.Selector.MatchExpressions) > 0 {
			return fieldError(path+".selector", "selects services: not allowed with type %s", AdvertisePodCIDR)
		}
	case AdvertiseLoadBalancerIP, AdvertiseExternalIP:
		if err := validateSelector(path+".selector", ad.Selector); err != nil {
			return err
		}
	default:
		return fieldError(path+".type", "must be %s, %s or %s, got %q", AdvertisePodCIDR, AdvertiseLoadBalancerIP, AdvertiseExternalIP, ad.Type)
	}
	for i, c := range ad.Communities {
		if _, _, err := ParseCommunity(c); err != nil {
			return fieldError(fmt.Sprintf("%s.communities[%d]", path, i), "%v", err)
		}
	}
	return nil
}

// Well-known communities (RFC 1997, RFC 3765, RFC 7999).
var wellKnownCommunities = map[string]uint32{
	"no-export":           0xFFFFFF01,
	"no-advertise":        0xFFFFFF02,
	"no-export-subconfed": 0xFFFFFF03,
	"no-peer":             0xFFFFFF04,
	"blackhole":           0xFFFF029A,
}

// ParseCommunity parses a standard community ("asn:value", 16 bits each,
// or a well-known name) into std, or a large one ("global:local1:local2",
// 32 bits each) into large; exactly one of them is set.
func ParseCommunity(s string) (std *uint32, large *[3]uint32, err error) {
	if v, ok := wellKnownCommunities[strings.ToLower(s)]; ok {
		return &v, nil, nil
	}
	parts := strings.Split(s, ":")
	switch len(parts) {
	case 2:
		var v [2]uint64
		for i, p := range parts {
			if v[i], err = strconv.ParseUint(p, 10, 16); err != nil {
				return nil, nil, fmt.Errorf("standard community %q: each half must be 0-65535", s)
			}
		}
		c := uint32(v[0]<<16 | v[1])
		return &c, nil, nil
	case 3:
		var l [3]uint32
		for i, p := range parts {
			v, err := strconv.ParseUint(p, 10, 32)
			if err != nil {
				return nil, nil, fmt.Errorf("large community %q: each part must be 0-4294967295", s)
			}
			l[i] = uint32(v)
		}
		return nil, &l, nil
	}
	return nil, nil, fmt.Errorf("community %q: want asn:value, global:local1:local2 or one of no-export, no-advertise, no-export-subconfed, no-peer, blackhole", s)
}
