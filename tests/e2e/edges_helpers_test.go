package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
	"golang.org/x/sys/unix"
)

// Helpers for the datapath-edges stories (edges_test.go): datagrams of any
// size, TCP with IPv6 extension headers set on the socket, large TCP
// transfers, path MTU in a namespace's route cache, and ICMP errors crafted
// with raw sockets.

// udpConn is a connected UDP socket opened in ns.
func udpConn(ns *lab.Netns, dst netip.AddrPort) (*net.UDPConn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.Dial("udp", dst.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.UDPConn), nil
}

// udpEchoOn sends a datagram of size bytes on c to an echo server and
// checks that the same bytes come back; it tries three times, since UDP may
// lose a datagram (and a lost fragment loses it whole).
func udpEchoOn(c *net.UDPConn, size int) error {
	want := payload(fmt.Sprintf("udp %d bytes %s -> %s|", size, c.LocalAddr(), c.RemoteAddr()), size)
	buf := make([]byte, 64<<10)
	var err error
	for range 3 {
		if _, err = c.Write(want); err != nil {
			if softErr(err) { // an ICMP error left on the socket
				return fmt.Errorf("udp echo of %d bytes to %s: %w", size, c.RemoteAddr(), err)
			}
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		var n int
		n, err = c.Read(buf)
		if err != nil {
			if !isTimeout(err) {
				return fmt.Errorf("udp echo of %d bytes from %s: %w", size, c.RemoteAddr(), err)
			}
			continue
		}
		if !bytes.Equal(buf[:n], want) {
			return fmt.Errorf("udp echo from %s: got %d bytes that differ from the %d sent", c.RemoteAddr(), n, size)
		}
		return nil
	}
	return fmt.Errorf("udp echo of %d bytes from %s: no answer to 3 datagrams: %w", size, c.RemoteAddr(), err)
}

// udpEchoSize opens a connected socket in ns and runs udpEchoOn.
func udpEchoSize(ns *lab.Netns, dst netip.AddrPort, size int) error {
	c, err := udpConn(ns, dst)
	if err != nil {
		return err
	}
	defer c.Close()
	return udpEchoOn(c, size)
}

// udpNoAnswer sends one datagram of size bytes from ns to dst and reports
// nil when nothing comes back within wait.
func udpNoAnswer(ns *lab.Netns, dst netip.AddrPort, size int, wait time.Duration) error {
	c, err := udpConn(ns, dst)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write(payload("denied|", size)); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	n, err := c.Read(make([]byte, 64<<10))
	if err == nil {
		return fmt.Errorf("%d-byte datagram to %s was answered (%d bytes), want it dropped", size, dst, n)
	}
	if !isTimeout(err) {
		return fmt.Errorf("%d-byte datagram to %s: want silence, got %w", size, dst, err)
	}
	return nil
}

// Linux socket options that put IPv6 extension headers on every packet of
// a socket (linux/in6.h).
const (
	ipv6HopOpts = 54
	ipv6DstOpts = 59
)

// padOpts is an 8-byte options header carrying one PadN option (its next
// header byte is filled in by the kernel).
var padOpts = string([]byte{0, 0, 1, 4, 0, 0, 0, 0})

// dialTCPExt connects from ns to dst (IPv6) with a hop-by-hop options header
// (when hop) and a destination options header on every packet the client
// sends.
func dialTCPExt(ns *lab.Netns, dst netip.AddrPort, hop bool, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout, Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if hop {
				if serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, ipv6HopOpts, padOpts); serr != nil {
					return
				}
			}
			serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, ipv6DstOpts, padOpts)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = d.Dial("tcp6", dst.String())
		return err
	})
	return c, err
}

// echoOver writes n bytes on c (to an echo server) while reading them back,
// and checks they come back whole and unchanged within timeout.
func echoOver(c net.Conn, n int, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	want := payload(fmt.Sprintf("tcp %d bytes %s -> %s|", n, c.LocalAddr(), c.RemoteAddr()), n)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(want)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read echo from %s: %w (got %d of %d bytes)", c.RemoteAddr(), err, len(got), n)
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write to %s: %w", c.RemoteAddr(), err)
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("echo from %s: got %d bytes that differ from the %d sent", c.RemoteAddr(), len(got), n)
	}
	return nil
}

var mtuRE = regexp.MustCompile(`\bmtu (\d+)\b`)

// routeMTU returns the path MTU the kernel in ns has learned for dst (a
// route cache exception from a frag-needed or packet-too-big, which
// expires), or 0. An MTU configured on the route itself (BIG TCP's on a
// pod's IPv6 default route) is not learned: 0.
func routeMTU(ctx context.Context, ns *lab.Netns, dst netip.Addr) (int, error) {
	args := []string{"ip", "-4", "route", "get", dst.String()}
	if dst.Is6() {
		args[1] = "-6"
	}
	out, err := ns.Exec(ctx, args...)
	if err != nil {
		return 0, err
	}
	m := mtuRE.FindSubmatch(out)
	if m == nil || !bytes.Contains(out, []byte(" expires ")) {
		return 0, nil
	}
	return strconv.Atoi(string(m[1]))
}

// quotedUDP is the start of a UDP datagram src -> dst as an ICMP error
// quotes it: the IP header and the UDP header.
func quotedUDP(src, dst netip.AddrPort) []byte {
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], 8+100)
	if src.Addr().Is4() {
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], 20+8+100)
		ip[6] = 0x40 // DF
		ip[8] = 64
		ip[9] = syscall.IPPROTO_UDP
		s, d := src.Addr().As4(), dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], inetChecksum(ip))
		return append(ip, udp...)
	}
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], 8+100)
	ip[6] = syscall.IPPROTO_UDP
	ip[7] = 64
	s, d := src.Addr().As16(), dst.Addr().As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(ip, udp...)
}

func inetChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// ICMP error kinds a forger sends.
type icmpKind int

const (
	portUnreachable icmpKind = iota
	tooBig                   // frag-needed (IPv4), packet-too-big (IPv6)
)

// sendICMPError sends, from a raw socket in ns, an ICMP (or ICMPv6) error
// of kind to dst quoting quoted; mtu is what frag-needed and packet-too-big
// announce. The kernel writes the IP header with ns's own source address
// (and the ICMPv6 checksum).
func sendICMPError(ns *lab.Netns, dst netip.Addr, kind icmpKind, mtu int, quoted []byte) error {
	msg := make([]byte, 8, 8+len(quoted))
	if dst.Is4() {
		msg[0], msg[1] = 3, 3 // destination unreachable, port unreachable
		if kind == tooBig {
			msg[1] = 4 // fragmentation needed
			binary.BigEndian.PutUint16(msg[6:], uint16(mtu))
		}
	} else {
		msg[0], msg[1] = 1, 4 // destination unreachable, port unreachable
		if kind == tooBig {
			msg[0], msg[1] = 2, 0
			binary.BigEndian.PutUint32(msg[4:], uint32(mtu))
		}
	}
	msg = append(msg, quoted...)
	return ns.Do(func() error {
		if dst.Is4() {
			binary.BigEndian.PutUint16(msg[2:], inetChecksum(msg))
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Sendto(fd, msg, 0, &unix.SockaddrInet4{Addr: dst.As4()})
		}
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_ICMPV6)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, msg, 0, &unix.SockaddrInet6{Addr: dst.As16()})
	})
}

// softErr reports whether err is one an ICMP error puts on a socket.
func softErr(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EMSGSIZE) || errors.Is(err, syscall.EHOSTUNREACH)
}
