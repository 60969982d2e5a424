package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// Workloads: servers run in this test process, on sockets opened inside the
// pod's namespace (lab.Netns.Do); only ping runs as a separate command.

// serveTCP listens on port in ns, on IPv4 and IPv6, and runs handle for every
// accepted connection until the test ends.
func serveTCP(t *testing.T, ns *lab.Netns, port int, handle func(net.Conn)) {
	t.Helper()
	for _, network := range []string{"tcp4", "tcp6"} {
		var ln net.Listener
		err := ns.Do(func() (err error) {
			ln, err = net.Listen(network, fmt.Sprintf(":%d", port))
			return err
		})
		if err != nil {
			t.Fatalf("listen %s/%d in %s: %v", network, port, ns.Name(), err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go handle(c)
			}
		}()
	}
}

// echo copies what it reads back to the sender until EOF.
func echo(c net.Conn) {
	defer c.Close()
	_, _ = io.Copy(c, c)
}

// sayName answers every connection with name and a newline.
func sayName(name string) func(net.Conn) {
	return func(c net.Conn) {
		defer c.Close()
		_, _ = io.WriteString(c, name+"\n")
	}
}

// serveUDPEcho answers every datagram to port in ns with the same bytes.
func serveUDPEcho(t *testing.T, ns *lab.Netns, port int) {
	t.Helper()
	for _, network := range []string{"udp4", "udp6"} {
		var pc net.PacketConn
		err := ns.Do(func() (err error) {
			pc, err = net.ListenPacket(network, fmt.Sprintf(":%d", port))
			return err
		})
		if err != nil {
			t.Fatalf("listen %s/%d in %s: %v", network, port, ns.Name(), err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}()
	}
}

// dialTCP connects from inside ns.
func dialTCP(ns *lab.Netns, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", dst.String(), timeout)
		return err
	})
	return c, err
}

// payload returns n random bytes that start with a readable tag.
func payload(tag string, n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	copy(b, tag)
	return b
}

// tcpEcho sends a payload larger than one segment to an echo server at dst
// and checks that exactly those bytes come back.
func tcpEcho(ns *lab.Netns, dst netip.AddrPort) error {
	c, err := dialTCP(ns, dst, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	want := payload(fmt.Sprintf("tcp %s -> %s|", ns.Name(), dst), 3000)
	if _, err := c.Write(want); err != nil {
		return fmt.Errorf("write to %s: %w", dst, err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("close write to %s: %w", dst, err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read echo from %s: %w (got %d of %d bytes)", dst, err, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("echo from %s: got %d bytes that differ from the %d sent", dst, len(got), len(want))
	}
	return nil
}

// udpEcho sends a datagram to an echo server at dst and checks the answer;
// it tries three times, since UDP may lose a datagram.
func udpEcho(ns *lab.Netns, dst netip.AddrPort) error {
	var c net.Conn
	if err := ns.Do(func() (err error) {
		c, err = net.Dial("udp", dst.String())
		return err
	}); err != nil {
		return err
	}
	defer c.Close()
	want := payload(fmt.Sprintf("udp %s -> %s|", ns.Name(), dst), 1200)
	buf := make([]byte, 2048)
	var err error
	for range 3 {
		if _, err = c.Write(want); err != nil {
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(700 * time.Millisecond))
		var n int
		n, err = c.Read(buf)
		if err != nil {
			continue
		}
		if !bytes.Equal(buf[:n], want) {
			return fmt.Errorf("udp echo from %s: got %d bytes that differ from the %d sent", dst, n, len(want))
		}
		return nil
	}
	return fmt.Errorf("udp echo from %s: no answer to 3 datagrams: %w", dst, err)
}

// fetchName connects to dst and returns the line a sayName server sends.
func fetchName(ns *lab.Netns, dst netip.AddrPort) (string, error) {
	c, err := dialTCP(ns, dst, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", dst, err)
	}
	return strings.TrimSpace(line), nil
}

// ping sends one ICMP (or ICMPv6) echo request from ns to ip.
func ping(ctx context.Context, ns *lab.Netns, ip netip.Addr, waitSeconds int) error {
	args := []string{"ping", "-c", "1", "-W", fmt.Sprint(waitSeconds)}
	if ip.Is6() {
		args = append(args, "-6")
	}
	_, err := ns.Exec(ctx, append(args, ip.String())...)
	return err
}

// connectTimesOut reports nil when a connection from ns to dst times out, as
// it does when the datapath drops the SYN. A refused connection (RST: the
// port is closed) or one that succeeds is an error.
func connectTimesOut(ns *lab.Netns, dst netip.AddrPort, timeout time.Duration) error {
	c, err := dialTCP(ns, dst, timeout)
	switch {
	case err == nil:
		c.Close()
		return fmt.Errorf("connection from %s to %s was accepted, want it dropped", ns.Name(), dst)
	case isTimeout(err):
		return nil
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("connection from %s to %s was refused (RST), want it dropped silently: %w", ns.Name(), dst, err)
	default:
		return fmt.Errorf("connection from %s to %s: want a timeout, got: %w", ns.Name(), dst, err)
	}
}

// udpTimesOut reports nil when datagrams from ns to dst get no answer at
// all, as when the datapath drops them. An answer, an ICMP port-unreachable
// (ECONNREFUSED) or any other error is an error.
func udpTimesOut(ns *lab.Netns, dst netip.AddrPort) error {
	err := udpEcho(ns, dst)
	switch {
	case err == nil:
		return fmt.Errorf("udp from %s to %s was answered, want it dropped", ns.Name(), dst)
	case isTimeout(err):
		return nil
	default:
		return fmt.Errorf("udp from %s to %s: want no answer (a timeout), got: %w", ns.Name(), dst, err)
	}
}

// pingTimesOut reports nil when one echo request from ns to ip gets no
// reply (ping exits 1). A reply, or ping failing for another reason (exit
// 2: no route, bad address), is an error.
func pingTimesOut(ctx context.Context, ns *lab.Netns, ip netip.Addr) error {
	err := ping(ctx, ns, ip, 1)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return fmt.Errorf("ping from %s to %s was answered, want it dropped", ns.Name(), ip)
	case errors.As(err, &ee) && ee.ExitCode() == 1:
		return nil
	default:
		return fmt.Errorf("ping from %s to %s: want no reply, got: %w", ns.Name(), ip, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// eventually calls f until it returns nil or d has passed, and returns f's
// last error.
func eventually(d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// familyName is "IPv4" or "IPv6".
func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}
