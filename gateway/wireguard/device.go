package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

const (
	// DefaultListenPort is the UDP port WireGuard listens on unless told
	// otherwise (Cilium's, so firewalls written for it fit).
	DefaultListenPort = 51871
	// DefaultMTU fits a 1500-byte underlay of either IP family.
	DefaultMTU = 1420

	// ModeKernel and ModeUserspace are what Mode reports.
	ModeKernel    = "kernel"
	ModeUserspace = "userspace"
	// ModeUserspaceDaemon (a Config.Mode) prefers the kernel like "", and
	// otherwise adopts the userspace device that another process serves
	// (ServeUserspace: `isthmus-agent wireguard-daemon`) instead of
	// embedding the engine, waiting up to Config.AdoptWait for it. The
	// device, its peers and their sessions then outlive this process: an
	// agent restart does not interrupt the tunnels. Mode() reports
	// ModeUserspace, External() true.
	ModeUserspaceDaemon = "userspace-daemon"

	maxNameLen = 15 // IFNAMSIZ - 1
)

var errClosed = errors.New("wireguard device is closed")

// Config describes the device Open creates.
type Config struct {
	// Name of the interface, at most 15 characters of [A-Za-z0-9_.-]; unique
	// on the host (the UAPI socket path is not per namespace).
	Name string
	// ListenPort is the UDP port; 0 means DefaultListenPort.
	ListenPort int
	// MTU of the device; 0 means DefaultMTU. See MTUFor.
	MTU int
	// KeyFile holds the private key; generated (0600) if missing.
	KeyFile string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Mode forces ModeKernel or ModeUserspace; "" picks the kernel when the
	// module is available and the embedded engine otherwise.
	Mode string
	// FirewallMark is set on the device's own UDP packets (SO_MARK), so
	// policy routing can keep them off the tunnel; 0 leaves them unmarked.
	FirewallMark int
	// AdoptWait bounds the wait for the daemon's device in
	// ModeUserspaceDaemon; 0 means 60s.
	AdoptWait time.Duration
}

// Device is one WireGuard interface, kernel or embedded, configured through
// wgctrl either way. Its methods are safe for concurrent use.
type Device struct {
	name    string
	mode    string
	port    int
	mtu     int
	fwmark  int
	keyFile string
	log     *slog.Logger

	ns netns.NsHandle   // the namespace Open was called in
	nl *netlink.Handle  // netlink bound to ns
	wg *wgctrl.Client   // created inside ns, so its genetlink socket is there
	us *userspaceEngine // nil in kernel mode and for an adopted device
	// external: the device is another process's (ModeUserspaceDaemon);
	// Close leaves it, with its peers, running.
	external bool

	mu     sync.Mutex // serializes configuration (key, peers) and Close
	key    wgtypes.Key
	closed bool
}

// Open creates the device in the network namespace of the calling thread,
// applies the key and port, and brings it up. On error nothing is left
// behind except the key file.
func Open(cfg Config) (*Device, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	if cfg.ListenPort == 0 {
		cfg.ListenPort = DefaultListenPort
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("device", cfg.Name)

	key, err := loadOrCreateKey(cfg.KeyFile, log)
	if err != nil {
		return nil, err
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("wireguard %s: get network namespace: %w", cfg.Name, err)
	}
	d := &Device{
		name: cfg.Name, port: cfg.ListenPort, mtu: cfg.MTU, fwmark: cfg.FirewallMark, keyFile: cfg.KeyFile,
		log: log, ns: ns, key: key,
	}
	if cfg.AdoptWait == 0 {
		cfg.AdoptWait = time.Minute
	}
	if err := d.open(cfg.Mode, cfg.AdoptWait); err != nil {
		d.teardown()
		return nil, fmt.Errorf("wireguard %s: %w", cfg.Name, err)
	}
	log.Info("WireGuard device up", "mode", d.mode, "external", d.external, "port", d.port, "mtu", d.mtu, "publicKey", d.PublicKey())
	return d, nil
}

func (c Config) check() error {
	if err := checkName(c.Name); err != nil {
		return err
	}
	if c.ListenPort < 0 || c.ListenPort > 65535 {
		return fmt.Errorf("wireguard %s: listen port %d out of range", c.Name, c.ListenPort)
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		return fmt.Errorf("wireguard %s: MTU %d out of range [576, 65535]", c.Name, c.MTU)
	}
	if c.KeyFile == "" {
		return fmt.Errorf("wireguard %s: no key file given", c.Name)
	}
	switch c.Mode {
	case "", ModeKernel, ModeUserspace, ModeUserspaceDaemon:
	default:
		return fmt.Errorf("wireguard %s: unknown mode %q (want %q, %q or %q)", c.Name, c.Mode, ModeKernel, ModeUserspace, ModeUserspaceDaemon)
	}
	return nil
}

func checkName(name string) error {
	if name == "" || len(name) > maxNameLen || name == "." || name == ".." {
		return fmt.Errorf("wireguard: device name %q must be 1 to %d characters", name, maxNameLen)
	}
	for _, c := range name {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-'
		if !ok {
			return fmt.Errorf("wireguard: device name %q may only hold letters, digits, '_', '.' and '-'", name)
		}
	}
	return nil
}

func (d *Device) open(mode string, adoptWait time.Duration) error {
	var err error
	if d.nl, err = netlink.NewHandleAt(d.ns); err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	if l, err := d.nl.LinkByName(d.name); err == nil {
		switch {
		case l.Type() == "wireguard" && mode != ModeUserspace:
			// A kernel device of ours outlives a crashed agent; adopt it
			// so its tunnels keep running.
			d.mode = ModeKernel
			d.log.Info("adopting existing kernel WireGuard device")
		case l.Type() == "tuntap" && mode == ModeUserspaceDaemon:
			// The daemon creates the TUN, then its socket.
			if err := d.waitDaemon(adoptWait); err != nil {
				return err
			}
			d.mode, d.external = ModeUserspace, true
		default:
			// Anything else is someone else's.
			return fmt.Errorf("interface %s already exists (type %s)", d.name, l.Type())
		}
	} else if !errors.As(err, &netlink.LinkNotFoundError{}) {
		return fmt.Errorf("look up interface: %w", err)
	}

	if d.mode == "" && mode != ModeUserspace {
		kerr := d.createKernelLink()
		switch {
		case kerr == nil:
			d.mode = ModeKernel
		case mode == ModeKernel:
			return fmt.Errorf("create kernel WireGuard device: %w", kerr)
		case mode == ModeUserspaceDaemon:
			d.log.Info("kernel WireGuard unavailable; waiting for the WireGuard daemon's device", "reason", kerr, "socket", sockPath(d.name), "wait", adoptWait)
			if err := d.waitDaemon(adoptWait); err != nil {
				return err
			}
			d.mode, d.external = ModeUserspace, true
		default:
			d.log.Info("kernel WireGuard unavailable; using the embedded engine", "reason", kerr)
		}
	}
	if d.mode == "" {
		d.mode = ModeUserspace
		if d.us, err = openUserspace(d.name, d.mtu, d.ns, d.log); err != nil {
			return err
		}
	}
	if d.external {
		return d.adopt()
	}

	// After the link exists: creating a kernel link may have loaded the
	// module, and wgctrl looks for its genetlink family only once.
	err = inNetns(d.ns, func() error {
		var err error
		d.wg, err = wgctrl.New()
		return err
	})
	if err != nil {
		return fmt.Errorf("wgctrl: %w", err)
	}
	cfg := wgtypes.Config{PrivateKey: &d.key, ListenPort: &d.port}
	if d.fwmark != 0 {
		cfg.FirewallMark = &d.fwmark
	}
	if err := d.wg.ConfigureDevice(d.name, cfg); err != nil {
		return fmt.Errorf("configure key and port %d: %w", d.port, err)
	}
	return d.up()
}

// waitDaemon waits until a TUN named d.name exists and its UAPI socket
// is there (ServeUserspace opens the socket after the TUN).
func (d *Device) waitDaemon(wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		l, err := d.nl.LinkByName(d.name)
		if err == nil && l.Type() != "tuntap" {
			return fmt.Errorf("interface %s already exists (type %s), not the WireGuard daemon's TUN", d.name, l.Type())
		}
		if err == nil {
			if _, serr := os.Stat(sockPath(d.name)); serr == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no WireGuard daemon serves %s within %v (no TUN %s with the socket %s): is 'isthmus-agent wireguard-daemon' running on this node?",
				d.name, wait, d.name, sockPath(d.name))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// adopt configures the daemon's device: the key, port and mark only where
// they differ (setting the port rebinds the UDP socket), then the MTU and
// link up. Its peers, and their sessions, stay as they are: the agent's
// SyncPeers changes only what its plan changes.
func (d *Device) adopt() error {
	err := inNetns(d.ns, func() error {
		var err error
		d.wg, err = wgctrl.New()
		return err
	})
	if err != nil {
		return fmt.Errorf("wgctrl: %w", err)
	}
	// The daemon binds the socket a moment before it listens on it.
	var have *wgtypes.Device
	for try := 0; ; try++ {
		if have, err = d.wg.Device(d.name); err == nil {
			break
		}
		if try == 20 {
			return fmt.Errorf("the WireGuard daemon's device: %w (socket %s)", err, sockPath(d.name))
		}
		time.Sleep(100 * time.Millisecond)
	}
	var cfg wgtypes.Config
	changed := false
	if have.PrivateKey != d.key {
		cfg.PrivateKey, changed = &d.key, true
	}
	if have.ListenPort != d.port {
		cfg.ListenPort, changed = &d.port, true
	}
	if d.fwmark != 0 && have.FirewallMark != d.fwmark {
		cfg.FirewallMark, changed = &d.fwmark, true
	}
	if changed {
		if err := d.wg.ConfigureDevice(d.name, cfg); err != nil {
			return fmt.Errorf("configure key and port %d: %w", d.port, err)
		}
	}
	d.log.Info("adopted the WireGuard daemon's device", "peers", len(have.Peers), "reconfigured", changed)
	return d.up()
}

func (d *Device) createKernelLink() error {
	la := netlink.NewLinkAttrs()
	la.Name = d.name
	la.MTU = d.mtu
	return d.nl.LinkAdd(&netlink.Wireguard{LinkAttrs: la})
}

// up sets the MTU and brings the link up. A kernel device opens its UDP
// socket here (so a busy port fails here); the embedded engine opens it in
// us.up.
func (d *Device) up() error {
	l, err := d.nl.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("look up interface: %w", err)
	}
	if err := d.nl.LinkSetMTU(l, d.mtu); err != nil {
		return fmt.Errorf("set MTU %d: %w", d.mtu, err)
	}
	if err := d.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("set link up (UDP port %d): %w", d.port, err)
	}
	if d.us != nil {
		if err := d.us.up(); err != nil {
			return fmt.Errorf("bind UDP port %d: %w", d.port, err)
		}
	}
	return nil
}

// Close removes the device (and, for the embedded engine, its UAPI socket).
// The key file stays.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	err := d.teardown()
	if err != nil {
		d.log.Warn("WireGuard device closed with errors", "err", err)
	} else {
		d.log.Info("WireGuard device removed")
	}
	return err
}

func (d *Device) teardown() error {
	var errs []error
	if d.wg != nil {
		errs = append(errs, d.wg.Close())
	}
	if d.us != nil {
		errs = append(errs, d.us.close())
	}
	if d.mode == ModeKernel && !d.external && d.nl != nil {
		if l, err := d.nl.LinkByName(d.name); err == nil {
			if err := d.nl.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete link: %w", err))
			}
		}
	}
	if d.nl != nil {
		d.nl.Close()
	}
	d.ns.Close()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("wireguard %s: close: %w", d.name, err)
	}
	return nil
}

// External reports whether the device is another process's
// (ModeUserspaceDaemon): Close leaves it running.
func (d *Device) External() bool { return d.external }

// Name is the interface name.
func (d *Device) Name() string { return d.name }

// Mode is ModeKernel or ModeUserspace.
func (d *Device) Mode() string { return d.mode }

// ListenPort is the UDP port the device listens on.
func (d *Device) ListenPort() int { return d.port }

// MTU is the device's MTU as configured.
func (d *Device) MTU() int { return d.mtu }

// PublicKey is the device's current public key in base64, as wg(8) prints
// it and as records.Node carries it.
func (d *Device) PublicKey() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.key.PublicKey().String()
}

// Stats is what `isthmus status` shows of the device.
type Stats struct {
	Name       string
	Mode       string
	PublicKey  string
	ListenPort int
	Peers      []PeerStats
}

// PeerStats is one peer as the device sees it. LastHandshake is zero when
// no handshake happened yet.
type PeerStats struct {
	PublicKey           string
	Endpoint            netip.AddrPort
	AllowedIPs          []netip.Prefix
	PersistentKeepalive time.Duration
	LastHandshake       time.Time
	RxBytes             int64
	TxBytes             int64
}

// Stats reads the device's state through wgctrl.
func (d *Device) Stats() (Stats, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return Stats{}, errClosed
	}
	dev, err := d.device()
	if err != nil {
		return Stats{}, err
	}
	s := Stats{Name: d.name, Mode: d.mode, PublicKey: dev.PublicKey.String(), ListenPort: dev.ListenPort}
	for _, p := range dev.Peers {
		s.Peers = append(s.Peers, PeerStats{
			PublicKey:           p.PublicKey.String(),
			Endpoint:            endpointOf(p),
			AllowedIPs:          prefixesOf(p.AllowedIPs),
			PersistentKeepalive: p.PersistentKeepaliveInterval,
			LastHandshake:       p.LastHandshakeTime,
			RxBytes:             p.ReceiveBytes,
			TxBytes:             p.TransmitBytes,
		})
	}
	return s, nil
}

func (d *Device) device() (*wgtypes.Device, error) {
	if d.wg == nil {
		return nil, errClosed
	}
	dev, err := d.wg.Device(d.name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("wireguard %s: device not found through wgctrl (removed, or its UAPI socket deleted?): %w", d.name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("wireguard %s: read device: %w", d.name, err)
	}
	return dev, nil
}
