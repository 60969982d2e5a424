package l2

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"

	"github.com/mdlayher/ndp"
	"golang.org/x/net/bpf"
)

const (
	etherTypeIPv6 = 0x86dd
	ethHeaderLen  = 14
	ipv6HeaderLen = 40
	protoICMPv6   = 58
	icmpTypeNS    = 135
	ndpHopLimit   = 255
)

// allNodes is where unsolicited advertisements (and answers to duplicate
// address detection, whose source is ::) go.
var (
	allNodes    = netip.MustParseAddr("ff02::1")
	allNodesMAC = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
)

// nsFilter keeps IPv6 frames that carry a neighbour solicitation directly
// (next header ICMPv6, type 135) with hop limit 255 (RFC 4861 7.1.1: any
// other was forwarded and must be ignored).
var nsFilter = func() []bpf.RawInstruction {
	prog, err := bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 12, Size: 2},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: etherTypeIPv6, SkipTrue: 7},
		bpf.LoadAbsolute{Off: ethHeaderLen + 6, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: protoICMPv6, SkipTrue: 5},
		bpf.LoadAbsolute{Off: ethHeaderLen + 7, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: ndpHopLimit, SkipTrue: 3},
		bpf.LoadAbsolute{Off: ethHeaderLen + ipv6HeaderLen, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: icmpTypeNS, SkipTrue: 1},
		bpf.RetConstant{Val: 1 << 16},
		bpf.RetConstant{Val: 0},
	})
	if err != nil {
		panic(err)
	}
	return prog
}()

// solicitation is a neighbour solicitation read from the wire.
type solicitation struct {
	srcMAC net.HardwareAddr // the frame's, or the source link-layer option's
	src    netip.Addr       // :: for duplicate address detection
	dst    netip.Addr       // solicited-node group or the target itself
	target netip.Addr
}

var errNotNS = errors.New("not a neighbour solicitation")

// parseNS parses an Ethernet frame the filter let through.
func parseNS(frame []byte) (solicitation, error) {
	if len(frame) < ethHeaderLen+ipv6HeaderLen+4 || binary.BigEndian.Uint16(frame[12:]) != etherTypeIPv6 {
		return solicitation{}, errNotNS
	}
	ip := frame[ethHeaderLen:]
	plen := int(binary.BigEndian.Uint16(ip[4:]))
	if ip[0]>>4 != 6 || ip[6] != protoICMPv6 || ip[7] != ndpHopLimit || len(ip) < ipv6HeaderLen+plen {
		return solicitation{}, errNotNS
	}
	m, err := ndp.ParseMessage(ip[ipv6HeaderLen : ipv6HeaderLen+plen])
	if err != nil {
		return solicitation{}, err
	}
	ns, ok := m.(*ndp.NeighborSolicitation)
	if !ok {
		return solicitation{}, errNotNS
	}
	s := solicitation{
		srcMAC: net.HardwareAddr(append([]byte(nil), frame[6:12]...)),
		src:    netip.AddrFrom16([16]byte(ip[8:24])),
		dst:    netip.AddrFrom16([16]byte(ip[24:40])),
		target: ns.TargetAddress,
	}
	for _, o := range ns.Options {
		if lla, ok := o.(*ndp.LinkLayerAddress); ok && lla.Direction == ndp.Source && len(lla.Addr) == 6 {
			s.srcMAC = lla.Addr
		}
	}
	return s, nil
}

// advertisement builds the Ethernet frame of a neighbour advertisement for
// target from mac, sent from target itself to dst at dstMAC. Override is
// always set: this node owns the address while it leads it, and a
// takeover must replace the MAC a client cached for the previous leader.
func advertisement(mac net.HardwareAddr, target, dst netip.Addr, dstMAC net.HardwareAddr, solicited bool) ([]byte, error) {
	na := &ndp.NeighborAdvertisement{
		Solicited: solicited, Override: true, TargetAddress: target,
		Options: []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: mac}},
	}
	icmp, err := ndp.MarshalMessageChecksum(na, target, dst)
	if err != nil {
		return nil, err
	}
	f := make([]byte, ethHeaderLen+ipv6HeaderLen, ethHeaderLen+ipv6HeaderLen+len(icmp))
	copy(f[0:6], dstMAC)
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:], etherTypeIPv6)
	ip := f[ethHeaderLen:]
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:], uint16(len(icmp)))
	ip[6] = protoICMPv6
	ip[7] = ndpHopLimit
	t16, d16 := target.As16(), dst.As16()
	copy(ip[8:24], t16[:])
	copy(ip[24:40], d16[:])
	return append(f, icmp...), nil
}

// answerTo returns where the answer to s goes and whether it is a
// solicited one: duplicate address detection (source ::) is answered to
// all nodes, unsolicited (RFC 4861 7.2.4).
func (s solicitation) answerTo() (netip.Addr, net.HardwareAddr, bool) {
	if s.src.IsUnspecified() {
		return allNodes, allNodesMAC, false
	}
	return s.src, s.srcMAC, true
}
