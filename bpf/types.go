package bpf

import (
	"fmt"
	"net"
	"net/netip"
)

// Proto is an IP protocol number as carried in the datapath maps.
type Proto uint8

const (
	ProtoAny    Proto = 0
	ProtoICMP   Proto = 1
	ProtoTCP    Proto = 6
	ProtoUDP    Proto = 17
	ProtoICMPv6 Proto = 58
)

func (p Proto) String() string {
	switch p {
	case ProtoAny:
		return "any"
	case ProtoICMP:
		return "icmp"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMPv6:
		return "icmpv6"
	}
	return fmt.Sprintf("proto-%d", uint8(p))
}

// Direction of a policy entry, seen from the endpoint that owns it.
type Direction uint8

const (
	Ingress Direction = 1
	Egress  Direction = 2
)

func (d Direction) String() string {
	if d == Ingress {
		return "ingress"
	}
	return "egress"
}

// Reserved identities (see ARCHITECTURE.md, "Identities").
const (
	IdentityUnknown   uint32 = 0
	IdentityHost      uint32 = 1
	IdentityWorld     uint32 = 2
	IdentityUnmanaged uint32 = 3
	IdentityHealth    uint32 = 4
	IdentityRemote    uint32 = 6
)

// IPCacheEntry maps an IP prefix to the identity of whatever owns it.
type IPCacheEntry struct {
	Identity uint32
	// HostIP is the node that hosts the address (zero for local or unknown).
	HostIP netip.Addr
}

// EndpointInfo describes a pod attached to this node's datapath.
type EndpointInfo struct {
	ID       uint32 // node-local endpoint ID, keys the policy map
	IfIndex  uint32 // host-side veth
	Identity uint32
	PodMAC   net.HardwareAddr // MAC inside the pod (destination of redirected frames)
	HostMAC  net.HardwareAddr // MAC of the host-side veth (source of redirected frames)
	// Policy enforcement per direction: when false, everything is allowed.
	PolicyIngress bool
	PolicyEgress  bool
}

// Frontend is one service address: VIP, port and protocol.
type Frontend struct {
	VIP   netip.Addr
	Port  uint16
	Proto Proto
}

func (f Frontend) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(f.VIP, f.Port), f.Proto)
}

// NodePort returns the services-map frontend of a node port: the
// unspecified address of the family (0.0.0.0 or ::) stands for every
// node's addresses of that family. from_pod takes it for a new flow to
// an address the ipcache says is a node's (host or remote-node) when no
// frontend at that address matches (c/datapath.c, nodeport_lookup).
func NodePort(ipv6 bool, port uint16, proto Proto) Frontend {
	vip := netip.IPv4Unspecified()
	if ipv6 {
		vip = netip.IPv6Unspecified()
	}
	return Frontend{VIP: vip, Port: port, Proto: proto}
}

// IsNodePort reports whether f is a NodePort frontend (any node address).
func (f Frontend) IsNodePort() bool { return f.VIP.IsUnspecified() && f.Port != 0 }

// Backend is one destination of a service frontend.
type Backend struct {
	Addr      netip.Addr
	Port      uint16
	ClusterID uint32
}

// PolicyKey is one allow rule in the policy map. PeerIdentity 0 means any
// identity, Port 0 any port of Proto, Proto 0 any protocol (Port must then be 0).
type PolicyKey struct {
	EndpointID   uint32
	PeerIdentity uint32
	Port         uint16
	Proto        Proto
	Direction    Direction
}

// Reason indexes the metrics map: what the datapath did with a packet.
type Reason uint32

const (
	ReasonForwardStack    Reason = 0 // handed to the kernel's routing
	ReasonForwardLocal    Reason = 1 // redirected straight into a local pod
	ReasonServiceNAT      Reason = 2 // a new flow translated to a service backend
	ReasonDropPolicyEgr   Reason = 3
	ReasonDropPolicyIngr  Reason = 4
	ReasonDropNoBackend   Reason = 5
	ReasonDropInvalid     Reason = 6 // truncated or malformed packet
	ReasonDropSpoofed     Reason = 7 // source address is not the endpoint's
	ReasonDropUnknownDest Reason = 8
	ReasonDeliveredToPod  Reason = 9 // passed the to-pod program
	// A non-first fragment whose first fragment was not seen (or was seen
	// too long ago): without it there are no ports to judge or translate.
	ReasonDropFragUnknown Reason = 10
	// An IPv6 extension header chain longer than the datapath walks, or
	// with a header it does not know.
	ReasonDropExtHeader Reason = 11
	// An ICMP or ICMPv6 error that quotes no flow of the pod it is about.
	ReasonDropICMPUnrelated Reason = 12
	// From outside the mesh to a known load-balancer or external address,
	// on a port (or protocol) no frontend takes.
	ReasonDropNoFrontend Reason = 13
	// From outside the mesh to a frontend: translated to its backend
	// (every packet; new flows count service_nat too).
	ReasonExternalIn Reason = 14
	// Replies of flows from outside, translated back to the frontend.
	ReasonExternalOut Reason = 15
	ReasonCount       Reason = 16
)

var reasonNames = map[Reason]string{
	ReasonForwardStack:      "forward_stack",
	ReasonForwardLocal:      "forward_local",
	ReasonServiceNAT:        "service_nat",
	ReasonDropPolicyEgr:     "drop_policy_egress",
	ReasonDropPolicyIngr:    "drop_policy_ingress",
	ReasonDropNoBackend:     "drop_no_backend",
	ReasonDropInvalid:       "drop_invalid",
	ReasonDropSpoofed:       "drop_spoofed_source",
	ReasonDeliveredToPod:    "delivered_to_pod",
	ReasonDropFragUnknown:   "drop_frag_unknown",
	ReasonDropExtHeader:     "drop_ext_header",
	ReasonDropICMPUnrelated: "drop_icmp_unrelated",
	ReasonDropNoFrontend:    "drop_no_frontend",
	ReasonExternalIn:        "external_in",
	ReasonExternalOut:       "external_out",
}

func (r Reason) String() string {
	if s, ok := reasonNames[r]; ok {
		return s
	}
	return fmt.Sprintf("reason-%d", uint32(r))
}

// IsDrop reports whether the reason counts dropped packets.
func (r Reason) IsDrop() bool {
	switch r {
	case ReasonDropPolicyEgr, ReasonDropPolicyIngr, ReasonDropNoBackend, ReasonDropInvalid, ReasonDropSpoofed, ReasonDropUnknownDest,
		ReasonDropFragUnknown, ReasonDropExtHeader, ReasonDropICMPUnrelated, ReasonDropNoFrontend:
		return true
	}
	return false
}

// Counter is a packets/bytes pair summed over CPUs.
type Counter struct {
	Packets uint64
	Bytes   uint64
}
