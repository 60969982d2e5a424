package bgp

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// shutdownConnections shuts down, in both directions, every TCP socket of
// this process whose remote end is one of remotes (or, with listenPort,
// whose local port is listenPort and remote address one of remotes'): the
// peer reads end-of-file, as when the process dies, and nothing written
// afterwards (GoBGP's Cease) leaves. GoBGP does not expose its
// connections, so they are found in /proc/self/fd. It returns how many
// sockets it shut down.
func shutdownConnections(remotes []netip.AddrPort, listenPort uint16) (int, error) {
	want := map[netip.AddrPort]bool{}
	peers := map[netip.Addr]bool{}
	for _, r := range remotes {
		want[r] = true
		peers[r.Addr()] = true
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, fmt.Errorf("list own sockets: %w", err)
	}
	n := 0
	var errs []error
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || !strings.HasPrefix(target, "socket:") {
			continue
		}
		remote, ok := sockAddr(unix.Getpeername(fd))
		if !ok {
			continue
		}
		match := want[remote]
		if !match && listenPort != 0 && peers[remote.Addr()] {
			local, ok := sockAddr(unix.Getsockname(fd))
			match = ok && local.Port() == listenPort
		}
		if !match {
			continue
		}
		if err := unix.Shutdown(fd, unix.SHUT_RDWR); err != nil && !errors.Is(err, unix.ENOTCONN) {
			errs = append(errs, fmt.Errorf("shutdown session to %s: %w", remote, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

func sockAddr(sa unix.Sockaddr, err error) (netip.AddrPort, bool) {
	if err != nil {
		return netip.AddrPort{}, false
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), true
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port)), true
	}
	return netip.AddrPort{}, false
}
