package bpf

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
)

// Crafted packets for BPF_PROG_TEST_RUN: just enough of Ethernet, IPv4/IPv6,
// TCP/UDP/ICMP to exercise the datapath, with real checksums so rewrites can
// be verified.

type testPkt struct {
	src, dst     netip.Addr
	proto        Proto
	sport, dport uint16 // echo id in sport for requests, dport for replies
	tcpFlags     uint8
	icmpReply    bool
	payload      []byte
}

var (
	macA = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0a}
	macB = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0b}
)

func csumAdd(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func csumFold(sum uint32) uint16 {
	for sum>>16 != 0 {
		sum = (sum & 0xffff) + sum>>16
	}
	return ^uint16(sum)
}

func pseudoSum(src, dst netip.Addr, proto Proto, l4len int) uint32 {
	var sum uint32
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		sum = csumAdd(sum, s[:])
		sum = csumAdd(sum, d[:])
		sum += uint32(proto) + uint32(l4len)
	} else {
		s, d := src.As16(), dst.As16()
		sum = csumAdd(sum, s[:])
		sum = csumAdd(sum, d[:])
		sum += uint32(l4len>>16) + uint32(l4len&0xffff) + uint32(proto)
	}
	return sum
}

func (p testPkt) l4() []byte {
	var l4 []byte
	switch p.proto {
	case ProtoTCP:
		l4 = make([]byte, 20+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.sport)
		binary.BigEndian.PutUint16(l4[2:], p.dport)
		binary.BigEndian.PutUint32(l4[4:], 1000)
		l4[12] = 5 << 4
		flags := p.tcpFlags
		if flags == 0 {
			flags = 0x02 // SYN
		}
		l4[13] = flags
		binary.BigEndian.PutUint16(l4[14:], 65535)
		copy(l4[20:], p.payload)
	case ProtoUDP:
		l4 = make([]byte, 8+len(p.payload))
		binary.BigEndian.PutUint16(l4[0:], p.sport)
		binary.BigEndian.PutUint16(l4[2:], p.dport)
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		copy(l4[8:], p.payload)
	case ProtoICMP, ProtoICMPv6:
		l4 = make([]byte, 8+len(p.payload))
		id := p.sport
		if p.icmpReply {
			id = p.dport
		}
		switch {
		case p.proto == ProtoICMP && !p.icmpReply:
			l4[0] = 8
		case p.proto == ProtoICMP:
			l4[0] = 0
		case !p.icmpReply:
			l4[0] = 128
		default:
			l4[0] = 129
		}
		binary.BigEndian.PutUint16(l4[4:], id)
		binary.BigEndian.PutUint16(l4[6:], 1)
		copy(l4[8:], p.payload)
	default:
		l4 = append([]byte(nil), p.payload...)
	}
	var sum uint32
	switch p.proto {
	case ProtoTCP, ProtoUDP, ProtoICMPv6:
		sum = pseudoSum(p.src, p.dst, p.proto, len(l4))
	}
	sum = csumAdd(sum, l4)
	c := csumFold(sum)
	switch p.proto {
	case ProtoTCP:
		binary.BigEndian.PutUint16(l4[16:], c)
	case ProtoUDP:
		if c == 0 {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[6:], c)
	case ProtoICMP, ProtoICMPv6:
		binary.BigEndian.PutUint16(l4[2:], c)
	}
	return l4
}

func (p testPkt) bytes() []byte {
	l4 := p.l4()
	eth := make([]byte, 14)
	copy(eth[0:], macB)
	copy(eth[6:], macA)
	if p.src.Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
		ip[8] = 64
		ip[9] = byte(p.proto)
		s, d := p.src.As4(), p.dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], csumFold(csumAdd(0, ip)))
		return append(append(eth, ip...), l4...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(l4)))
	ip[6] = byte(p.proto)
	ip[7] = 64
	s, d := p.src.As16(), p.dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(eth, ip...), l4...)
}

// parsed is what a test reads back out of a packet the program returned.
type parsed struct {
	dstMAC, srcMAC net.HardwareAddr
	src, dst       netip.Addr
	sport, dport   uint16
}

// parsePkt decodes a packet and verifies its IPv4 and L4 checksums.
func parsePkt(t *testing.T, b []byte, proto Proto) parsed {
	t.Helper()
	var out parsed
	out.dstMAC = net.HardwareAddr(b[0:6])
	out.srcMAC = net.HardwareAddr(b[6:12])
	var l4 []byte
	if binary.BigEndian.Uint16(b[12:]) == 0x0800 {
		ip := b[14:34]
		if csumFold(csumAdd(0, ip)) != 0 {
			t.Fatalf("bad IPv4 header checksum")
		}
		out.src = netip.AddrFrom4([4]byte(ip[12:16]))
		out.dst = netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = b[34:]
	} else {
		ip := b[14:54]
		out.src = netip.AddrFrom16([16]byte(ip[8:24]))
		out.dst = netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = b[54:]
	}
	if proto == ProtoTCP || proto == ProtoUDP {
		out.sport = binary.BigEndian.Uint16(l4[0:])
		out.dport = binary.BigEndian.Uint16(l4[2:])
		if csumFold(csumAdd(pseudoSum(out.src, out.dst, proto, len(l4)), l4)) != 0 {
			t.Fatalf("bad %s checksum after rewrite", proto)
		}
	}
	return out
}
