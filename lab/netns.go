package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Namespace is anything that lives in a lab network namespace: *Netns and *Node.
type Namespace interface {
	NS() *Netns
}

// Netns is a named network namespace of a lab: a pod, or the namespace of a Node.
type Netns struct {
	lab  *Lab
	name string // short name given by the caller
	full string // <prefix>-<name>

	ifNames map[string]bool // interface names the lab created in it
}

// Node is a namespace with IP forwarding on: a cluster node, a fabric router,
// a VM or an external peer.
type Node struct {
	*Netns
	dir string
}

// NS returns ns itself (it implements Namespace).
func (ns *Netns) NS() *Netns { return ns }

// Name returns the short name given when the namespace was created.
func (ns *Netns) Name() string { return ns.name }

// FullName returns the namespace's name on the host, "<prefix>-<name>".
func (ns *Netns) FullName() string { return ns.full }

// Path returns /var/run/netns/<prefix>-<name>.
func (ns *Netns) Path() string { return filepath.Join(NetnsDir, ns.full) }

// Lab returns the lab the namespace belongs to.
func (ns *Netns) Lab() *Lab { return ns.lab }

// Dir returns the node's own directory inside the lab dir (for its state
// dir, sockets and config).
func (n *Node) Dir() string { return n.dir }

// NodeName returns the name under which an agent should run on this node;
// it equals FullName so pin dirs and records carry the lab prefix.
func (n *Node) NodeName() string { return n.full }

// PinDir returns /sys/fs/bpf/isthmus/<prefix>-<name>, the node's bpffs pin dir
// (removed on Close).
func (n *Node) PinDir() string { return filepath.Join(PinRoot, n.full) }

// AddNode creates the namespace <prefix>-<name> with lo up, IPv4 and IPv6
// forwarding on, rp_filter off and IPv6 DAD off, plus a directory under Dir.
func (l *Lab) AddNode(name string) (*Node, error) {
	ns, err := l.addNetns(name, true)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(l.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	return &Node{Netns: ns, dir: dir}, nil
}

// AddRouter creates a node used as a fabric router (same as AddNode).
func (l *Lab) AddRouter(name string) (*Node, error) { return l.AddNode(name) }

// AddPodNetns creates an empty namespace with only lo up; the agent creates
// the pod's veth into it. Kernel defaults (DAD, no forwarding) are kept so the
// agent meets what it meets in production.
func (l *Lab) AddPodNetns(name string) (*Netns, error) { return l.addNetns(name, false) }

func (l *Lab) addNetns(name string, forwarding bool) (*Netns, error) {
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: bad name %q: want [a-z0-9-], at most 40 characters, starting with a letter or digit", name)
	}
	l.mu.Lock()
	if err := l.checkOpen(); err != nil {
		l.mu.Unlock()
		return nil, err
	}
	if _, dup := l.spaces[name]; dup {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: namespace %q already exists in lab %s", name, l.prefix)
	}
	ns := &Netns{lab: l, name: name, full: l.Name(name), ifNames: map[string]bool{}}
	l.spaces[name] = ns
	l.mu.Unlock()

	if out, err := exec.Command("ip", "netns", "add", ns.full).CombinedOutput(); err != nil {
		l.mu.Lock()
		delete(l.spaces, name)
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: ip netns add %s: %w: %s", ns.full, err, bytes.TrimSpace(out))
	}
	sysctls := map[string]string{}
	if forwarding {
		sysctls = map[string]string{
			"net/ipv4/ip_forward":              "1",
			"net/ipv4/conf/all/forwarding":     "1",
			"net/ipv4/conf/default/forwarding": "1",
			"net/ipv4/conf/all/rp_filter":      "0",
			"net/ipv4/conf/default/rp_filter":  "0",
			"net/ipv6/conf/all/forwarding":     "1",
			"net/ipv6/conf/default/forwarding": "1",
			"net/ipv6/conf/all/accept_dad":     "0",
			"net/ipv6/conf/default/accept_dad": "0",
		}
	}
	err := ns.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		for _, k := range slices.Sorted(maps.Keys(sysctls)) {
			if err := os.WriteFile("/proc/sys/"+k, []byte(sysctls[k]), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lab: set up netns %s: %w", ns.full, err)
	}
	return ns, nil
}

// Do runs fn on an OS thread switched into the namespace and switches the
// thread back afterwards. Sockets that fn opens live in the namespace;
// goroutines that fn starts do not run in it.
func (ns *Netns) Do(fn func() error) (err error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("lab: current netns: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(ns.Path())
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("lab: open netns %s: %w", ns.full, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("lab: enter netns %s: %w", ns.full, err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			// Leave the thread locked: the runtime then terminates it
			// instead of reusing a thread in the wrong namespace.
			err = errors.Join(err, fmt.Errorf("lab: restore netns: %w", rerr))
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}

// Handle returns a netlink handle that operates in the namespace; Close it
// (Handle.Close) when done.
func (ns *Netns) Handle() (*netlink.Handle, error) {
	h, err := netns.GetFromPath(ns.Path())
	if err != nil {
		return nil, fmt.Errorf("lab: open netns %s: %w", ns.full, err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("lab: netlink handle in %s: %w", ns.full, err)
	}
	return nh, nil
}

// Command returns an *exec.Cmd that runs args in the namespace through
// `nsenter --net=<path> --`, in its own process group, with EnvPrefix set.
// Exec and Start use it; it is exported for callers that need stdin or pipes,
// who start it with StartCommand or CombinedOutput (see spawn.go: the
// command dies with the thread that started it).
func (ns *Netns) Command(ctx context.Context, args ...string) *exec.Cmd {
	argv := append([]string{"--net=" + ns.Path(), "--"}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", argv...)
	cmd.Env = append(os.Environ(), EnvPrefix+"="+ns.lab.prefix)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if !ns.lab.detached {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	cmd.Cancel = func() error {
		if cmd.Process == nil {
			return nil
		}
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

// Exec runs args in the namespace and returns the combined output; the error
// names the command and the namespace and includes the output.
func (ns *Netns) Exec(ctx context.Context, args ...string) ([]byte, error) {
	if len(args) == 0 {
		return nil, errors.New("lab: Exec: no command")
	}
	out, err := CombinedOutput(ns.Command(ctx, args...))
	if err != nil {
		return out, fmt.Errorf("lab: %q in %s: %w: %s", strings.Join(args, " "), ns.full, err, bytes.TrimSpace(out))
	}
	return out, nil
}

// AddRoute adds (or replaces) a route to dst via the gateway via. A zero dst
// means the default route of via's address family.
func (ns *Netns) AddRoute(dst netip.Prefix, via netip.Addr) error {
	h, err := ns.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	if !dst.IsValid() {
		dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if via.Is6() {
			dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
	}
	r := &netlink.Route{Dst: prefixToIPNet(dst.Masked()), Gw: net.IP(via.AsSlice())}
	if err := h.RouteReplace(r); err != nil {
		return fmt.Errorf("lab: route %s via %s in %s: %w", dst, via, ns.full, err)
	}
	return nil
}

// Link is a veth pair created by the lab. A nil A means the host namespace.
type Link struct {
	lab            *Lab
	A, B           *Netns
	AName, BName   string
	AIndex, BIndex int
	AMAC, BMAC     net.HardwareAddr
}

// LinkOptions describe a veth pair. A nil A puts that end in the host
// namespace (its name then gets the lab prefix).
type LinkOptions struct {
	A, B Namespace
	// AName and BName default to "v-<peer name>" (truncated to 15 characters)
	// inside namespaces and "<prefix>h<n>" in the host namespace.
	AName, BName   string
	AAddrs, BAddrs []netip.Prefix
	MTU            int
}

// Link connects a and b with a veth pair and assigns aIP to a's end and bIP
// to b's end (a zero Prefix assigns nothing; add the other address family
// with Link.AddAddrs). Both ends are up.
func (l *Lab) Link(a, b Namespace, aIP, bIP netip.Prefix) (*Link, error) {
	o := LinkOptions{A: a, B: b}
	if aIP.IsValid() {
		o.AAddrs = []netip.Prefix{aIP}
	}
	if bIP.IsValid() {
		o.BAddrs = []netip.Prefix{bIP}
	}
	return l.LinkWith(o)
}

// LinkWith creates a veth pair as described by o.
func (l *Lab) LinkWith(o LinkOptions) (*Link, error) {
	if o.B == nil || o.B.NS() == nil {
		return nil, errors.New("lab: link needs a B namespace")
	}
	lk := &Link{lab: l, B: o.B.NS()}
	if o.A != nil {
		lk.A = o.A.NS()
	}
	if lk.A == lk.B {
		return nil, errors.New("lab: link ends in the same namespace")
	}
	l.mu.Lock()
	if err := l.checkOpen(); err != nil {
		l.mu.Unlock()
		return nil, err
	}
	var err error
	lk.AName, err = l.pickIfName(lk.A, o.AName, lk.B)
	if err == nil {
		lk.BName, err = l.pickIfName(lk.B, o.BName, lk.A)
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}

	hA, err := l.handleFor(lk.A)
	if err != nil {
		return nil, err
	}
	defer hA.Close()
	fdB, err := netns.GetFromPath(lk.B.Path())
	if err != nil {
		return nil, fmt.Errorf("lab: open netns %s: %w", lk.B.full, err)
	}
	defer fdB.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: lk.AName, MTU: o.MTU},
		PeerName:      lk.BName,
		PeerNamespace: netlink.NsFd(int(fdB)),
	}
	if err := hA.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("lab: veth %s (%s) <-> %s (%s): %w", lk.AName, nsName(lk.A), lk.BName, lk.B.full, err)
	}
	hB, err := lk.B.Handle()
	if err != nil {
		return nil, err
	}
	defer hB.Close()
	for _, end := range []struct {
		h     *netlink.Handle
		name  string
		addrs []netip.Prefix
		index *int
		mac   *net.HardwareAddr
	}{
		{hA, lk.AName, o.AAddrs, &lk.AIndex, &lk.AMAC},
		{hB, lk.BName, o.BAddrs, &lk.BIndex, &lk.BMAC},
	} {
		link, err := end.h.LinkByName(end.name)
		if err != nil {
			return nil, fmt.Errorf("lab: find %s: %w", end.name, err)
		}
		for _, p := range end.addrs {
			if err := addAddr(end.h, link, p); err != nil {
				return nil, err
			}
		}
		if err := end.h.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("lab: set %s up: %w", end.name, err)
		}
		*end.index = link.Attrs().Index
		*end.mac = link.Attrs().HardwareAddr
	}
	return lk, nil
}

// AddAddrs assigns one more address to each end (either may be zero).
func (lk *Link) AddAddrs(aIP, bIP netip.Prefix) error {
	for _, end := range []struct {
		ns   *Netns
		name string
		p    netip.Prefix
	}{{lk.A, lk.AName, aIP}, {lk.B, lk.BName, bIP}} {
		if !end.p.IsValid() {
			continue
		}
		h, err := lk.lab.handleFor(end.ns)
		if err != nil {
			return err
		}
		link, err := h.LinkByName(end.name)
		if err == nil {
			err = addAddr(h, link, end.p)
		}
		h.Close()
		if err != nil {
			return fmt.Errorf("lab: add %s to %s: %w", end.p, end.name, err)
		}
	}
	return nil
}

func addAddr(h *netlink.Handle, link netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: prefixToIPNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(link, a); err != nil {
		return fmt.Errorf("lab: address %s on %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

// handleFor returns a netlink handle in ns, or in the host namespace for nil.
func (l *Lab) handleFor(ns *Netns) (*netlink.Handle, error) {
	if ns != nil {
		return ns.Handle()
	}
	h, err := netns.GetFromPath("/proc/self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("lab: open host netns: %w", err)
	}
	defer h.Close()
	return netlink.NewHandleAt(h)
}

// pickIfName chooses (and records) an interface name in ns; l.mu is held.
func (l *Lab) pickIfName(ns *Netns, want string, peer *Netns) (string, error) {
	if ns == nil { // host namespace: always carry the prefix
		if want == "" {
			l.hostSeq++
			want = fmt.Sprintf("h%d", l.hostSeq)
		}
		if !strings.HasPrefix(want, l.prefix) {
			want = l.prefix + want
		}
		if len(want) > MaxIfNameLen {
			return "", fmt.Errorf("lab: interface name %q longer than %d characters", want, MaxIfNameLen)
		}
		return want, nil
	}
	if want != "" {
		if len(want) > MaxIfNameLen {
			return "", fmt.Errorf("lab: interface name %q longer than %d characters", want, MaxIfNameLen)
		}
		if ns.ifNames[want] {
			return "", fmt.Errorf("lab: interface %q already exists in %s", want, ns.full)
		}
		ns.ifNames[want] = true
		return want, nil
	}
	base := "v-host"
	if peer != nil {
		base = "v-" + peer.name
	}
	for i := 1; ; i++ {
		n := base
		if i > 1 {
			n = fmt.Sprintf("%s-%d", base, i)
		}
		if len(n) > MaxIfNameLen {
			suffix := ""
			if i > 1 {
				suffix = fmt.Sprintf("-%d", i)
			}
			n = base[:MaxIfNameLen-len(suffix)] + suffix
		}
		if !ns.ifNames[n] {
			ns.ifNames[n] = true
			return n, nil
		}
	}
}

func nsName(ns *Netns) string {
	if ns == nil {
		return "host"
	}
	return ns.full
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	bits := 32
	if p.Addr().Is6() {
		bits = 128
	}
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), bits)}
}

// Forward listens on a loopback port of the calling process's namespace
// and relays every connection to target (host:port), dialled from inside
// ns: how a process on the host reaches a server that listens in a lab
// namespace. It returns the local address and a function that stops
// listening (open relays end with their connections).
func (ns *Netns) Forward(target string) (addr string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	go func() {
		for {
			down, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer down.Close()
				var up net.Conn
				if err := ns.Do(func() (err error) {
					up, err = net.DialTimeout("tcp", target, 5*time.Second)
					return err
				}); err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{}, 2)
				go func() { io.Copy(up, down); up.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
				go func() { io.Copy(down, up); down.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
				<-done
				<-done
			}()
		}
	}()
	return ln.Addr().String(), func() { ln.Close() }, nil
}
