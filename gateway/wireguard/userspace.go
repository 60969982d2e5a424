package wireguard

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

// uapiDir is where wireguard-go (ipc.UAPIOpen) puts its sockets and where
// wg(8) and wgctrl look for them.
const uapiDir = "/var/run/wireguard"

// userspaceEngine is the embedded golang.zx2c4.com/wireguard: a TUN with
// virtio-net headers (TSO/USO in, GRO out), the standard UDP bind (UDP GSO
// and GRO) and a UAPI listener that wgctrl configures it through.
type userspaceEngine struct {
	name    string
	dev     *device.Device
	nl      *netlink.Handle // bound to the device's namespace, for netnsTUN
	uapi    net.Listener
	done    chan struct{} // closed when the UAPI accept loop ends
	closing atomic.Bool
	log     *slog.Logger
}

func openUserspace(name string, mtu int, ns netns.NsHandle, log *slog.Logger) (*userspaceEngine, error) {
	// TUNSETIFF creates the interface in the namespace of the calling
	// thread, and the TUN's own netlink listener must watch that namespace.
	var tdev tun.Device
	err := inNetns(ns, func() error {
		var err error
		tdev, err = tun.CreateTUN(name, mtu)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create TUN: %w", err)
	}
	if got, err := tdev.Name(); err != nil || got != name {
		tdev.Close()
		return nil, fmt.Errorf("create TUN: kernel named it %q (%v)", got, err)
	}
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		tdev.Close()
		return nil, fmt.Errorf("netlink: %w", err)
	}
	link, err := nl.LinkByName(name)
	if err != nil {
		nl.Close()
		tdev.Close()
		return nil, fmt.Errorf("look up TUN: %w", err)
	}

	e := &userspaceEngine{name: name, nl: nl, done: make(chan struct{}), log: log}
	ntun := &netnsTUN{Device: tdev, nl: nl, index: link.Attrs().Index}
	e.dev = device.NewDevice(ntun, &netnsBind{Bind: conn.NewDefaultBind(), ns: ns}, engineLogger(log))

	f, err := ipc.UAPIOpen(name)
	if err != nil {
		e.dev.Close()
		nl.Close()
		return nil, fmt.Errorf("open UAPI socket %s: %w", sockPath(name), err)
	}
	e.uapi, err = ipc.UAPIListen(name, f)
	f.Close() // UAPIListen holds its own duplicate
	if err != nil {
		e.dev.Close()
		nl.Close()
		os.Remove(sockPath(name))
		return nil, fmt.Errorf("listen on UAPI socket %s: %w", sockPath(name), err)
	}
	go e.serve()
	return e, nil
}

func sockPath(name string) string { return filepath.Join(uapiDir, name+".sock") }

// ServeUserspace runs the embedded engine for a device named name in the
// calling thread's network namespace until ctx is done, then removes it:
// the WireGuard daemon (`isthmus-agent wireguard-daemon`) of an agent that
// runs with ModeUserspaceDaemon, so the device, its peers and their
// sessions outlive the agent's restarts. It configures nothing: the agent
// sets the key, port, mark, MTU and peers through the UAPI socket and
// netlink, as it does for a kernel device. When the kernel can create
// WireGuard devices, the agent uses one and the daemon only waits.
func ServeUserspace(ctx context.Context, name string, log *slog.Logger) error {
	if err := checkName(name); err != nil {
		return err
	}
	if log == nil {
		log = slog.Default()
	}
	log = log.With("device", name)
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("wireguard %s: get network namespace: %w", name, err)
	}
	defer ns.Close()
	if kernelAvailable(ns) {
		log.Info("kernel WireGuard is available: the agent creates a kernel device, this daemon has nothing to serve")
		<-ctx.Done()
		return nil
	}
	if _, err := os.Stat(sockPath(name)); err == nil {
		// A live daemon would be serving it; a dead one's socket is stale.
		if c, derr := net.Dial("unix", sockPath(name)); derr == nil {
			c.Close()
			return fmt.Errorf("wireguard %s: another process serves %s", name, sockPath(name))
		}
		os.Remove(sockPath(name))
	}
	e, err := openUserspace(name, DefaultMTU, ns, log)
	if err != nil {
		return fmt.Errorf("wireguard %s: %w", name, err)
	}
	if err := e.up(); err != nil {
		e.close()
		return fmt.Errorf("wireguard %s: up: %w", name, err)
	}
	log.Info("serving the userspace WireGuard device", "socket", sockPath(name))
	<-ctx.Done()
	log.Info("removing the userspace WireGuard device: encrypted traffic of this node stops until it is back")
	return e.close()
}

// kernelAvailable probes whether the kernel creates WireGuard links in ns.
func kernelAvailable(ns netns.NsHandle) bool {
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false
	}
	defer nl.Close()
	la := netlink.NewLinkAttrs()
	la.Name = fmt.Sprintf("isthwgprobe%d", os.Getpid()%10000)
	if err := nl.LinkAdd(&netlink.Wireguard{LinkAttrs: la}); err != nil {
		return false
	}
	if l, err := nl.LinkByName(la.Name); err == nil {
		_ = nl.LinkDel(l)
	}
	return true
}

func (e *userspaceEngine) serve() {
	defer close(e.done)
	for {
		c, err := e.uapi.Accept()
		if err != nil {
			if !e.closing.Load() {
				// Most likely someone deleted the socket file: wg(8),
				// wgctrl and so this package lose the device.
				e.log.Error("WireGuard UAPI socket stopped accepting; the device can no longer be configured", "socket", sockPath(e.name), "err", err)
			}
			return
		}
		go e.dev.IpcHandle(c)
	}
}

// up opens the UDP socket now instead of waiting for the TUN's link-up
// event, so a busy port is an error of Open rather than a log line. A later
// link-up event finds the device up and does nothing.
func (e *userspaceEngine) up() error { return e.dev.Up() }

func (e *userspaceEngine) close() error {
	e.closing.Store(true)
	err := e.uapi.Close() // unlinks the socket
	<-e.done
	e.dev.Close() // closes the TUN, which deletes the interface, and the bind
	e.nl.Close()
	if rerr := os.Remove(sockPath(e.name)); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// netnsTUN reads the TUN's MTU through netlink in the device's namespace.
// wireguard-go's own MTU() asks an AF_INET socket opened on the calling
// thread, and its event goroutine may run in another namespace, where the
// name is unknown or, worse, another interface's. The engine uses the MTU
// to bound padding.
type netnsTUN struct {
	tun.Device
	nl    *netlink.Handle // used by the engine's TUN event goroutine only
	index int
}

func (t *netnsTUN) MTU() (int, error) {
	l, err := t.nl.LinkByIndex(t.index)
	if err != nil {
		return 0, fmt.Errorf("get MTU of TUN device: %w", err)
	}
	return l.Attrs().MTU, nil
}

// netnsBind opens the UDP sockets inside the device's namespace. The engine
// opens them whenever the device goes up or the port changes, from whatever
// goroutine handles that event or UAPI request, and that goroutine's thread
// may sit in another namespace.
//
// Wrapping the bind also turns off wireguard-go's sticky-socket route
// listener (it only runs for a bare *conn.StdNetBind); it tracks source
// address changes on multi-homed hosts and would watch the wrong namespace
// from here anyway.
type netnsBind struct {
	conn.Bind
	ns netns.NsHandle
}

func (b *netnsBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	var (
		fns    []conn.ReceiveFunc
		actual uint16
	)
	err := inNetns(b.ns, func() error {
		var err error
		fns, actual, err = b.Bind.Open(port)
		return err
	})
	return fns, actual, err
}

// engineLogger routes wireguard-go's logs to slog. Verbose lines are only
// formatted when debug logging is on.
func engineLogger(log *slog.Logger) *device.Logger {
	l := &device.Logger{
		Verbosef: device.DiscardLogf,
		Errorf: func(format string, args ...any) {
			log.Error("wireguard-go: " + fmt.Sprintf(format, args...))
		},
	}
	if log.Enabled(context.Background(), slog.LevelDebug) {
		l.Verbosef = func(format string, args ...any) {
			log.Debug("wireguard-go: " + fmt.Sprintf(format, args...))
		}
	}
	return l
}
