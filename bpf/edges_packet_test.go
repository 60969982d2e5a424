package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"sort"
	"testing"
)

// Crafted packets for the edges of the datapath: IPv4 and IPv6 fragments,
// IPv6 extension headers and ICMP errors quoting other packets, with real
// checksums, and decoders that verify every checksum after a rewrite.

func ethHdr(v6 bool) []byte {
	eth := make([]byte, 14)
	copy(eth[0:], macB)
	copy(eth[6:], macA)
	binary.BigEndian.PutUint16(eth[12:], 0x0800)
	if v6 {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	}
	return eth
}

// ip4Hdr is an IPv4 header; fragOff is in bytes (a multiple of 8).
func ip4Hdr(src, dst netip.Addr, proto uint8, id uint16, fragOff int, more bool, payloadLen int) []byte {
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+payloadLen))
	binary.BigEndian.PutUint16(ip[4:], id)
	fo := uint16(fragOff / 8)
	if more {
		fo |= 0x2000
	}
	binary.BigEndian.PutUint16(ip[6:], fo)
	ip[8] = 64
	ip[9] = proto
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], csumFold(csumAdd(0, ip)))
	return ip
}

func ip6Hdr(src, dst netip.Addr, nexthdr uint8, payloadLen int) []byte {
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(payloadLen))
	ip[6] = nexthdr
	ip[7] = 64
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return ip
}

// IPv6 extension header types.
const (
	extHop      = 0
	extRouting  = 43
	extFragment = 44
	extAuth     = 51
	extDest     = 60
	extExp1     = 253
)

// extHdr returns one extension header of type t (8 bytes, 24 for AH) whose
// next header is next: options headers carry PadN, the routing header is
// an empty segment routing header, AH an empty ICV, the fragment header
// an atomic fragment.
func extHdr(t, next uint8) []byte {
	switch t {
	case extAuth:
		h := make([]byte, 24)
		h[0], h[1] = next, 4 // (4+2)*4 = 24 bytes
		binary.BigEndian.PutUint32(h[4:], 0x100)
		return h
	case extRouting:
		return []byte{next, 0, 4, 0, 0, 0, 0, 0}
	case extFragment: // an atomic fragment: offset 0, no more fragments
		return []byte{next, 0, 0, 0, 0, 0, 0x12, 0x34}
	default: // hop-by-hop, destination options, unknown: PadN over 6 bytes
		return []byte{next, 0, 1, 4, 0, 0, 0, 0}
	}
}

// v6WithExt is p as IPv6 with the extension headers exts (in order) between
// the IPv6 header and the L4 header.
func v6WithExt(p testPkt, exts ...uint8) []byte {
	l4 := p.l4()
	var chain []byte
	for i, t := range exts {
		next := uint8(p.proto)
		if i+1 < len(exts) {
			next = exts[i+1]
		}
		chain = append(chain, extHdr(t, next)...)
	}
	first := uint8(p.proto)
	if len(exts) > 0 {
		first = exts[0]
	}
	out := append(ethHdr(true), ip6Hdr(p.src, p.dst, first, len(chain)+len(l4))...)
	return append(append(out, chain...), l4...)
}

// fragments splits p's L4 datagram (checksum over the whole of it) into
// IPv4 or IPv6 fragments of at most size bytes of data each.
func fragments(p testPkt, id uint32, size int) [][]byte {
	l4 := p.l4()
	size &^= 7
	var out [][]byte
	for off := 0; off < len(l4); off += size {
		end := min(off+size, len(l4))
		more := end < len(l4)
		chunk := l4[off:end]
		var f []byte
		if p.src.Is4() {
			f = append(ethHdr(false), ip4Hdr(p.src, p.dst, uint8(p.proto), uint16(id), off, more, len(chunk))...)
		} else {
			fh := make([]byte, 8)
			fh[0] = uint8(p.proto)
			fo := uint16(off)
			if more {
				fo |= 1
			}
			binary.BigEndian.PutUint16(fh[2:], fo)
			binary.BigEndian.PutUint32(fh[4:], id)
			f = append(ethHdr(true), ip6Hdr(p.src, p.dst, extFragment, 8+len(chunk))...)
			f = append(f, fh...)
		}
		out = append(out, append(f, chunk...))
	}
	return out
}

// reassemble puts fragments (IPv4, or IPv6 with only a fragment header) back
// together, checking each IPv4 header checksum and that the addresses agree,
// and verifies the L4 checksum of the datagram against those addresses.
func reassemble(t *testing.T, frags [][]byte) (src, dst netip.Addr, l4 []byte) {
	t.Helper()
	type piece struct {
		off  int
		data []byte
	}
	var pieces []piece
	var proto Proto
	for i, f := range frags {
		var s, d netip.Addr
		var off int
		var data []byte
		if binary.BigEndian.Uint16(f[12:]) == 0x0800 {
			ip := f[14:34]
			if csumFold(csumAdd(0, ip)) != 0 {
				t.Fatalf("fragment %d: bad IPv4 header checksum", i)
			}
			s, d = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
			off = int(binary.BigEndian.Uint16(ip[6:])&0x1fff) * 8
			proto = Proto(ip[9])
			data = f[34 : 14+int(binary.BigEndian.Uint16(ip[2:]))]
		} else {
			ip := f[14:54]
			if ip[6] != extFragment {
				t.Fatalf("fragment %d: next header %d, want a fragment header", i, ip[6])
			}
			s, d = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
			fh := f[54:62]
			proto = Proto(fh[0])
			off = int(binary.BigEndian.Uint16(fh[2:]) &^ 7)
			data = f[62 : 54+int(binary.BigEndian.Uint16(ip[4:]))]
		}
		if i == 0 {
			src, dst = s, d
		} else if s != src || d != dst {
			t.Fatalf("fragment %d: %s -> %s, the first was %s -> %s", i, s, d, src, dst)
		}
		pieces = append(pieces, piece{off, data})
	}
	sort.Slice(pieces, func(i, j int) bool { return pieces[i].off < pieces[j].off })
	for _, p := range pieces {
		if p.off != len(l4) {
			t.Fatalf("fragments leave a hole at %d", len(l4))
		}
		l4 = append(l4, p.data...)
	}
	if csumFold(csumAdd(pseudoSum(src, dst, proto, len(l4)), l4)) != 0 {
		t.Fatalf("reassembled %s datagram %s -> %s: bad checksum", proto, src, dst)
	}
	return src, dst, l4
}

// ICMP error types used by the tests.
const (
	icmp4DestUnreach = 3
	icmp4FragNeeded  = 4 // code of dest unreachable
	icmp4PortUnreach = 3 // code of dest unreachable
	icmp6DestUnreach = 1
	icmp6PktTooBig   = 2
	icmp6PortUnreach = 4 // code of dest unreachable
)

// icmpError builds an ICMP (IPv4) or ICMPv6 error from src to dst quoting
// the packet quoted (an Ethernet frame; its IP packet is quoted, cut to at
// most quoteLen bytes when quoteLen > 0). mtu goes where frag-needed and
// packet-too-big carry it.
func icmpError(src, dst netip.Addr, typ, code uint8, mtu uint32, quoted []byte, quoteLen int) []byte {
	q := quoted[14:]
	if quoteLen > 0 && len(q) > quoteLen {
		q = q[:quoteLen]
	}
	icmp := make([]byte, 8, 8+len(q))
	icmp[0], icmp[1] = typ, code
	if src.Is4() {
		binary.BigEndian.PutUint16(icmp[6:], uint16(mtu))
	} else {
		binary.BigEndian.PutUint32(icmp[4:], mtu)
	}
	icmp = append(icmp, q...)
	if src.Is4() {
		binary.BigEndian.PutUint16(icmp[2:], csumFold(csumAdd(0, icmp)))
		return append(append(ethHdr(false), ip4Hdr(src, dst, 1, 1, 0, false, len(icmp))...), icmp...)
	}
	binary.BigEndian.PutUint16(icmp[2:], csumFold(csumAdd(pseudoSum(src, dst, ProtoICMPv6, len(icmp)), icmp)))
	return append(append(ethHdr(true), ip6Hdr(src, dst, 58, len(icmp))...), icmp...)
}

// icmpErr is an ICMP error as a test reads it back.
type icmpErr struct {
	src, dst           netip.Addr // outer
	inSrc, inDst       netip.Addr // quoted
	inSport, inDport   uint16
	inProto            Proto
	inL4CsumOK, inFull bool // quoted L4 checksum verified (the whole packet was quoted)
}

// parseICMPErr decodes an ICMP error and verifies the outer IPv4 header
// checksum, the ICMP checksum (with the IPv6 pseudo header), the quoted IPv4
// header checksum and, when the whole quoted packet is there, its L4 checksum.
func parseICMPErr(t *testing.T, b []byte) icmpErr {
	t.Helper()
	var e icmpErr
	var icmp []byte
	if binary.BigEndian.Uint16(b[12:]) == 0x0800 {
		ip := b[14:34]
		if csumFold(csumAdd(0, ip)) != 0 {
			t.Fatal("ICMP error: bad outer IPv4 header checksum")
		}
		e.src, e.dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		icmp = b[34 : 14+int(binary.BigEndian.Uint16(ip[2:]))]
		if csumFold(csumAdd(0, icmp)) != 0 {
			t.Fatal("ICMP error: bad ICMP checksum")
		}
		in := icmp[8:]
		if csumFold(csumAdd(0, in[:20])) != 0 {
			t.Fatal("ICMP error: bad quoted IPv4 header checksum")
		}
		e.inSrc, e.inDst = netip.AddrFrom4([4]byte(in[12:16])), netip.AddrFrom4([4]byte(in[16:20]))
		e.inProto = Proto(in[9])
		total := int(binary.BigEndian.Uint16(in[2:]))
		l4 := in[20:]
		e.inSport, e.inDport = binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
		if len(in) >= total {
			e.inFull = true
			l4 = in[20:total]
			e.inL4CsumOK = csumFold(csumAdd(pseudoSum(e.inSrc, e.inDst, e.inProto, len(l4)), l4)) == 0
		}
		return e
	}
	ip := b[14:54]
	e.src, e.dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
	icmp = b[54 : 54+int(binary.BigEndian.Uint16(ip[4:]))]
	if csumFold(csumAdd(pseudoSum(e.src, e.dst, ProtoICMPv6, len(icmp)), icmp)) != 0 {
		t.Fatal("ICMPv6 error: bad ICMPv6 checksum")
	}
	in := icmp[8:]
	e.inSrc, e.inDst = netip.AddrFrom16([16]byte(in[8:24])), netip.AddrFrom16([16]byte(in[24:40]))
	e.inProto = Proto(in[6])
	total := 40 + int(binary.BigEndian.Uint16(in[4:]))
	l4 := in[40:]
	e.inSport, e.inDport = binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
	if len(in) >= total {
		e.inFull = true
		l4 = in[40:total]
		e.inL4CsumOK = csumFold(csumAdd(pseudoSum(e.inSrc, e.inDst, e.inProto, len(l4)), l4)) == 0
	}
	return e
}

// l4At reads the ports at off and verifies the L4 checksum of the packet b
// (an Ethernet frame whose L4 header starts at off).
func l4At(t *testing.T, b []byte, off int, proto Proto) (src, dst netip.Addr, sport, dport uint16) {
	t.Helper()
	if binary.BigEndian.Uint16(b[12:]) == 0x0800 {
		src, dst = netip.AddrFrom4([4]byte(b[26:30])), netip.AddrFrom4([4]byte(b[30:34]))
	} else {
		src, dst = netip.AddrFrom16([16]byte(b[22:38])), netip.AddrFrom16([16]byte(b[38:54]))
	}
	l4 := b[off:]
	if csumFold(csumAdd(pseudoSum(src, dst, proto, len(l4)), l4)) != 0 {
		t.Fatalf("bad %s checksum at offset %d", proto, off)
	}
	return src, dst, binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
}

var _ = bytes.Equal
