package bigtcp

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
	"github.com/isthmus-mesh/isthmus/agent/node"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
	"github.com/isthmus-mesh/isthmus/agent/state"
)

// Device roles in the status.
const (
	RoleUnderlay  = node.RoleUnderlay // holds a node IP: traffic to other nodes in the clear
	RoleOutside   = node.RoleOutside  // holds a default route
	RoleWireGuard = "wireguard"       // the node's WireGuard device
	RolePodHost   = "pod-host"        // host end of a pod veth
	RolePod       = "pod"             // pod end of a pod veth (in the pod's netns)
)

// Input is what one run converges: the endpoints, and what tells the
// node's external devices apart.
type Input struct {
	Endpoints []state.Endpoint
	// NodeIPs are the underlay addresses (cluster mode); their devices
	// carry traffic to other nodes in the clear. Empty: standalone.
	NodeIPs []netip.Addr
	// WireGuard is the WireGuard device ("" without encryption); Encrypted
	// says pod traffic to other nodes goes through it.
	WireGuard string
	// EndpointsGen is the generation of Endpoints (state.Store): equal to
	// the last run's, the endpoints did not change (0: unknown).
	EndpointsGen uint64
	// EndpointsChangedSince, when not nil, returns the keys of the
	// endpoints changed since an earlier EndpointsGen (ok false: not
	// known; desired.State's): a run then visits those alone, without
	// going over every endpoint. Endpoints are sorted by key.
	EndpointsChangedSince func(since uint64) (keys []string, ok bool)
	// NodeAddrs are the node's addresses: when they change, its external
	// devices may have.
	NodeAddrs []netip.Addr
}

// epDone is an endpoint as the last run that visited it left it.
type epDone struct {
	plumbing string // what identifies its veth: host name, ifindex, netns
	eb       api.EndpointBigTCP
	devs     []api.BigTCPDevice
	err      error
}

// sizedEp is an endpoint its add sized, and when.
type sizedEp struct {
	epDone
	at time.Time
}

func plumbingOf(e state.Endpoint) string {
	return fmt.Sprint(e.HostIfName, "/", e.IfIndex, "/", e.NetnsPath)
}

// Reconciler converges the BIG TCP sizes of the node's devices and keeps
// their status.
type Reconciler struct {
	cfg  Config
	log  *slog.Logger
	v4ok bool

	// What the last runs did, written by the reconcile loop under mu: a
	// run does only what changed since (the endpoints that changed, those
	// that failed), and visits everything every reconcile.ResyncInterval
	// (fullAt). Visiting a pod means entering its network namespace: at a
	// thousand pods, visiting them all takes a quarter of a second, and
	// finding the external devices dumps every route (one per pod). The
	// status is built from it when asked for, not by every run.
	mu     sync.Mutex
	ran    bool
	done   map[string]epDone  // by endpoint key
	failed map[string]bool    // keys of done whose visit failed: visited by every run
	ext    []api.BigTCPDevice // the external devices as last converged
	extErr error
	paths  pathInput                     // what the last run's paths depend on
	eps    map[string]api.EndpointBigTCP // by key: done's, and what adds sized since
	status *api.BigTCPStatus             // built from the above; nil: build again
	// sized are the endpoints their adds sized (SizeEndpoint) since the
	// last run, by key; guarded by mu. The next run takes them instead of
	// visiting the pods again.
	sized map[string]sizedEp

	// The reconcile loop's only.
	extKey  string // the node's addresses, IPs and WireGuard device ext was found with
	gen     uint64 // the EndpointsGen of the last run
	lastErr error
	fullAt  time.Time
	warned  map[string]string // <endpoint>/<device> -> the reason last logged
}

// pathInput is what the paths in the status depend on besides the devices.
type pathInput struct {
	nodeIPs   []netip.Addr
	wireGuard string
}

// New checks cfg against the kernel: --ipv4-big-tcp=on on a kernel
// without the IPv4 attributes is an error; auto then leaves IPv4 off.
func New(cfg Config, log *slog.Logger) (*Reconciler, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("big tcp: probe the kernel on lo: %w", err)
	}
	r := &Reconciler{cfg: cfg, log: log, v4ok: sizesOf(lo).v4Supported(), eps: map[string]api.EndpointBigTCP{}, warned: map[string]string{},
		done: map[string]epDone{}, failed: map[string]bool{}}
	if cfg.IPv4 == On && !r.v4ok {
		return nil, errors.New("--ipv4-big-tcp=on: this kernel has no IPv4 BIG TCP (gso_ipv4_max_size needs Linux 6.3 or later); use auto or off")
	}
	return r, nil
}

// Config returns the setting in force.
func (r *Reconciler) Config() Config { return r.cfg }

func (r *Reconciler) baseStatus() api.BigTCPStatus {
	return api.BigTCPStatus{IPv6: string(r.cfg.IPv6), IPv4: string(r.cfg.IPv4), Size: r.cfg.Size, IPv4Supported: r.v4ok}
}

// Status returns the status of the last run (a copy).
func (r *Reconciler) Status() *api.BigTCPStatus {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status == nil {
		r.status = r.buildStatus()
	}
	st := *r.status
	st.Paths = slices.Clone(st.Paths)
	st.Devices = slices.Clone(st.Devices)
	st.Endpoints = slices.Clone(st.Endpoints)
	return &st
}

// buildStatus is the status of what the last runs did; callers hold mu.
func (r *Reconciler) buildStatus() *api.BigTCPStatus {
	st := r.baseStatus()
	if !r.ran {
		return &st
	}
	st.Devices = append(st.Devices, r.ext...)
	errs := []error{r.extErr}
	for _, k := range slices.Sorted(maps.Keys(r.done)) {
		d := r.done[k]
		st.Endpoints = append(st.Endpoints, d.eb)
		st.Devices = append(st.Devices, d.devs...)
		errs = append(errs, d.err)
	}
	st.Paths = r.pathsOf(st, r.paths)
	if err := errors.Join(errs...); err != nil {
		st.LastError = err.Error()
	}
	return &st
}

// Endpoint returns one endpoint's BIG TCP after the last run.
func (r *Reconciler) Endpoint(key string) *api.EndpointBigTCP {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.eps[key]
	if !ok {
		return nil
	}
	return &e
}

// Sync converges every device of in and records the status. A device
// that refuses is rolled back and reported; that is not an error of the
// run. The error is for what could not be read at all (and is in the
// status too).
func (r *Reconciler) Sync(in Input) error {
	full := time.Since(r.fullAt) >= reconcile.ResyncInterval
	extKey := fmt.Sprint(in.NodeAddrs, in.NodeIPs, in.WireGuard)
	devices := full || extKey != r.extKey || r.extErr != nil || r.ext == nil
	if !devices && in.EndpointsGen != 0 && in.EndpointsGen == r.gen && r.lastErr == nil {
		return nil // nothing changed
	}
	var changed []string
	known := false
	if !full && r.ran && r.gen != 0 && in.EndpointsGen != 0 && in.EndpointsChangedSince != nil {
		changed, known = in.EndpointsChangedSince(r.gen)
	}
	err := r.sync(in, full, devices, changed, known)
	r.gen, r.extKey, r.lastErr = in.EndpointsGen, extKey, err
	if full {
		r.fullAt = time.Now()
	}
	return err
}

// sync is one run: the external devices when devices is set, the pod
// veths that are new or plumbed anew: among the endpoints of changed and
// those that failed when known, else among all (every one when full).
func (r *Reconciler) sync(in Input, full, devices bool, changed []string, known bool) error {
	ext, extErr := r.ext, r.extErr
	if devices {
		ext, extErr = r.externalDevices(in)
		r.forget(r.ext, ext)
	}

	// Pod veths, both ends; an endpoint that refuses is rolled back alone.
	r.mu.Lock()
	sized := r.sized
	r.sized = map[string]sizedEp{}
	keys := changed
	for k := range r.failed {
		keys = append(keys, k)
	}
	r.mu.Unlock()
	next := map[string]*epDone{} // nil: gone
	visit := func(e state.Endpoint) {
		d, ok := r.done[e.Key()]
		if ok && !full && d.err == nil && d.plumbing == plumbingOf(e) {
			return
		}
		old := d.devs
		if s, ok := sized[e.Key()]; ok && !full && s.err == nil && s.plumbing == plumbingOf(e) {
			d = s.epDone // its add sized it
		} else {
			d.plumbing = plumbingOf(e)
			d.eb, d.devs, d.err = r.endpoint(e)
		}
		for _, dev := range d.devs {
			r.note(dev)
		}
		r.forget(old, d.devs)
		next[e.Key()] = &d
	}
	if known {
		for _, k := range keys {
			if _, dup := next[k]; dup {
				continue // changed and failed before
			}
			if i, ok := state.SearchEndpoints(in.Endpoints, k); ok {
				visit(in.Endpoints[i])
			} else if _, had := r.done[k]; had {
				next[k] = nil
			}
		}
	} else {
		present := make(map[string]bool, len(in.Endpoints))
		for _, e := range in.Endpoints {
			present[e.Key()] = true
			visit(e)
		}
		for k := range r.done {
			if !present[k] {
				next[k] = nil
			}
		}
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	for k, d := range next {
		if d == nil {
			r.forget(r.done[k].devs, nil)
			delete(r.done, k)
			delete(r.failed, k)
			delete(r.eps, k)
			continue
		}
		r.done[k], r.eps[k] = *d, d.eb
		if d.err != nil {
			r.failed[k] = true
		} else {
			delete(r.failed, k)
		}
	}
	// An add that sized its pod and is not in the endpoints yet (or
	// failed): kept for the next run while the add may still be on.
	for k, s := range sized {
		_, newer := r.sized[k]
		switch {
		case next[k] == nil && !newer && time.Since(s.at) < reconcile.ConvergeTimeout:
			r.sized[k] = s
		case !newer:
			if _, ok := r.done[k]; !ok {
				delete(r.eps, k) // an add that did not make it
			}
		}
	}
	r.ran, r.ext, r.extErr, r.status = true, ext, extErr, nil
	r.paths = pathInput{nodeIPs: in.NodeIPs, wireGuard: in.WireGuard}
	errs := []error{extErr}
	for _, k := range slices.Sorted(maps.Keys(r.failed)) {
		errs = append(errs, r.done[k].err)
	}
	return errors.Join(errs...)
}

// forget drops the warnings logged for the devices of old that are not
// among now (gone, or their endpoint is), so that they are logged again
// should they come back.
func (r *Reconciler) forget(old, now []api.BigTCPDevice) {
	for _, d := range old {
		if !slices.ContainsFunc(now, func(n api.BigTCPDevice) bool { return n.Endpoint == d.Endpoint && n.Name == d.Name }) {
			delete(r.warned, d.Endpoint+"/"+d.Name)
		}
	}
}

// device converges one device in the handle's netns and logs what
// changed in why it is left at 65536 (reconcile loop only).
func (r *Reconciler) device(h *netlink.Handle, l netlink.Link, role, ep string) api.BigTCPDevice {
	d := r.size(h, l, role, ep)
	r.note(d)
	return d
}

// size converges one device in the handle's netns. It reads only the
// configuration, so adds size their pods' veths side by side.
func (r *Reconciler) size(h *netlink.Handle, l netlink.Link, role, ep string) api.BigTCPDevice {
	w := plan(r.cfg, sizesOf(l))
	got, err := converge(h, l, w)
	return deviceStatus(l, role, ep, got, w, err)
}

// deviceStatus is the status of device l in role after converging it to
// w: it holds got, err says why that was refused.
func deviceStatus(l netlink.Link, role, ep string, got sizes, w want, err error) api.BigTCPDevice {
	d := api.BigTCPDevice{Name: l.Attrs().Name, Role: role, Endpoint: ep,
		TSOMax: got.tsoMax, GSO: got.gso, GRO: got.gro, GSOIPv4: got.gso4, GROIPv4: got.gro4}
	var why []string
	if err != nil {
		why = append(why, "refused, rolled back to 65536: "+err.Error())
	} else {
		if w.why6 != "" {
			why = append(why, "ipv6: "+w.why6)
		}
		if w.why4 != "" {
			why = append(why, "ipv4: "+w.why4)
		}
	}
	d.Reason = strings.Join(why, "; ")
	if role == RoleWireGuard && d.Reason != "" && err == nil {
		d.Reason = "a WireGuard TUN device (the embedded wireguard-go's) carries 64 KiB at most: " + d.Reason
	}
	return d
}

// note logs a device's reason to stay at 65536 when it changed
// (reconcile loop only).
func (r *Reconciler) note(d api.BigTCPDevice) {
	key := d.Endpoint + "/" + d.Name
	if last, ok := r.warned[key]; !ok || d.Reason != last {
		switch {
		case d.Reason != "":
			r.log.Warn("big tcp: device left at 65536", "device", d.Name, "role", d.Role, "endpoint", d.Endpoint, "reason", d.Reason)
		case d.Endpoint != "": // one line per pod veth end is too many at info
			r.log.Debug("big tcp: device sized", "device", d.Name, "role", d.Role, "endpoint", d.Endpoint, "ipv6", d.GSO, "ipv4", d.GSOIPv4)
		default:
			r.log.Info("big tcp: device sized", "device", d.Name, "role", d.Role, "ipv6", d.GSO, "ipv4", d.GSOIPv4)
		}
		r.warned[key] = d.Reason
	}
}

// SizeEndpoint sizes the veth of an endpoint being added, before its add
// returns: the pod's first connections take their segment size from its
// interface when they open, so it is sized before the pod runs. Adds call
// it side by side rather than waiting for a run of the reconcile loop,
// which would size every new pod one after the other; the next run takes
// the result (and logs its warnings). Safe for concurrent use.
//
// created is the veth as endpoint.Create left it, created with
// VethSizes: when both ends hold what the configuration wants, nothing
// is read or written again. Otherwise (an older veth, a kernel that did
// not keep a size) both ends are converged as a run would.
func (r *Reconciler) SizeEndpoint(e state.Endpoint, created endpoint.Result) {
	if r == nil {
		return
	}
	eb, devs, ok := r.createdSized(e, created)
	var err error
	if !ok {
		eb, devs, err = r.endpoint(e)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sized == nil {
		r.sized = map[string]sizedEp{}
	}
	r.sized[e.Key()] = sizedEp{epDone{plumbing: plumbingOf(e), eb: eb, devs: devs, err: err}, time.Now()}
	if err == nil {
		r.eps[e.Key()] = eb // what the endpoint list shows, until the run
	}
}

// VethSizes are the sizes a pod veth of MTU mtu is created with
// (endpoint.Spec.Sizes) and the MTU of its pod's IPv6 default route
// (endpoint.Spec.IPv6RouteMTU), so that an add finds it sized.
func (r *Reconciler) VethSizes(mtu int) (endpoint.Sizes, int) {
	if r == nil {
		return endpoint.Sizes{}, 0
	}
	// A veth takes any size the kernel does (its tso_max_size is the
	// kernel's largest); the sizes as created are checked (createdSized).
	w := planFor(r.cfg, 0, r.v4ok)
	sz := endpoint.Sizes{GSO: w.v6, GRO: w.v6}
	if r.v4ok {
		sz.GSOIPv4, sz.GROIPv4 = w.v4, w.v4
	}
	routeMTU := 0
	if w.v6 > LegacySize {
		routeMTU = mtu - JumboHeader
	}
	return sz, routeMTU
}

// createdSized is the BIG TCP status of a veth created with VethSizes,
// from the ends as endpoint.Create reported them; ok is false when
// either end does not hold what the configuration wants of it.
func (r *Reconciler) createdSized(e state.Endpoint, c endpoint.Result) (api.EndpointBigTCP, []api.BigTCPDevice, bool) {
	if c.Host == nil || c.Pod == nil {
		return api.EndpointBigTCP{}, nil, false
	}
	var devs []api.BigTCPDevice
	for _, d := range []struct {
		l    netlink.Link
		role string
	}{{c.Host, RolePodHost}, {c.Pod, RolePod}} {
		got := sizesOf(d.l)
		w := plan(r.cfg, got)
		if !got.holds(w) {
			return api.EndpointBigTCP{}, nil, false
		}
		devs = append(devs, deviceStatus(d.l, d.role, e.Key(), got, w, nil))
	}
	eb := api.EndpointBigTCP{Endpoint: e.Key(), IPv6: min(devs[0].GSO, devs[1].GSO), IPv4: min(devs[0].GSOIPv4, devs[1].GSOIPv4)}
	if eb.IPv4 == 0 {
		eb.IPv4 = LegacySize // a kernel without the IPv4 attribute
	}
	var why []string
	for _, d := range devs {
		if d.Reason != "" {
			why = append(why, d.Name+": "+d.Reason)
		}
	}
	eb.Reason = strings.Join(why, "; ")
	return eb, devs, true
}

// endpoint converges both ends of one pod veth and the pod's IPv6 route
// MTU. When one end cannot take the size or refuses it, both go back to
// 65536. Like size, it reads only the configuration: the add of the pod
// calls it too (SizeEndpoint), side by side with other adds.
func (r *Reconciler) endpoint(e state.Endpoint) (api.EndpointBigTCP, []api.BigTCPDevice, error) {
	eb := api.EndpointBigTCP{Endpoint: e.Key(), IPv6: LegacySize, IPv4: LegacySize}
	fail := func(err error) (api.EndpointBigTCP, []api.BigTCPDevice, error) {
		eb.Reason = err.Error()
		return eb, nil, fmt.Errorf("endpoint %s: %w", e.Key(), err)
	}
	host, err := netlink.LinkByName(e.HostIfName)
	if err != nil {
		return fail(fmt.Errorf("host veth %s: %w", e.HostIfName, err))
	}
	nsh, err := netns.GetFromPath(e.NetnsPath)
	if err != nil {
		return fail(fmt.Errorf("open netns %s: %w", e.NetnsPath, err))
	}
	defer nsh.Close()
	ph, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fail(fmt.Errorf("netlink in %s: %w", e.NetnsPath, err))
	}
	defer ph.Close()
	pod, err := ph.LinkByName(endpoint.DefaultPodIfName)
	if err != nil {
		return fail(fmt.Errorf("pod interface %s in %s: %w", endpoint.DefaultPodIfName, e.NetnsPath, err))
	}
	hd := r.size(&netlink.Handle{}, host, RolePodHost, e.Key())
	pd := r.size(ph, pod, RolePod, e.Key())
	if hostLeft, podLeft := hd.Reason != "", pd.Reason != ""; hostLeft != podLeft {
		// One end cannot (or refused): the other goes back to 65536 too,
		// since a pair that differs only moves the segmentation from one
		// end to the other.
		cfg := r.cfg
		cfg.IPv6, cfg.IPv4 = Off, Off
		off := Reconciler{cfg: cfg, log: r.log}
		// From the kernel's sizes now, not those read before the write.
		if podLeft {
			if host, err = netlink.LinkByIndex(host.Attrs().Index); err != nil {
				return fail(fmt.Errorf("host veth %s: %w", e.HostIfName, err))
			}
			hd = off.size(&netlink.Handle{}, host, RolePodHost, e.Key())
			hd.Reason = "rolled back with its pod end"
		} else {
			if pod, err = ph.LinkByIndex(pod.Attrs().Index); err != nil {
				return fail(fmt.Errorf("pod interface in %s: %w", e.NetnsPath, err))
			}
			pd = off.size(ph, pod, RolePod, e.Key())
			pd.Reason = "rolled back with its host end"
		}
	}
	eb.IPv6, eb.IPv4 = min(hd.GSO, pd.GSO), min(hd.GSOIPv4, pd.GSOIPv4)
	if eb.IPv4 == 0 {
		eb.IPv4 = LegacySize // a kernel without the IPv4 attribute
	}
	var why []string
	for _, d := range []api.BigTCPDevice{hd, pd} {
		if d.Reason != "" {
			why = append(why, d.Name+": "+d.Reason)
		}
	}
	// Room for the jumbo hop-by-hop header on every forwarding hop.
	mtu := 0
	if eb.IPv6 > LegacySize {
		mtu = pod.Attrs().MTU - JumboHeader
	}
	if hasV6(e.IPs) {
		if _, err := endpoint.SetIPv6RouteMTU(ph, pod.Attrs().Index, mtu); err != nil {
			why = append(why, err.Error())
		}
	}
	eb.Reason = strings.Join(why, "; ")
	return eb, []api.BigTCPDevice{hd, pd}, nil
}

func hasV6(ips []netip.Addr) bool { return slices.ContainsFunc(ips, netip.Addr.Is6) }

// pathsOf says, per family, which paths carry BIG TCP: every device on the
// path (the pod veths included) must.
func (r *Reconciler) pathsOf(st api.BigTCPStatus, in pathInput) []api.BigTCPPath {
	var out []api.BigTCPPath
	for _, fam := range []struct {
		name string
		v6   bool
		mode Mode
	}{{"ipv6", true, r.cfg.IPv6}, {"ipv4", false, r.cfg.IPv4}} {
		size := func(d api.BigTCPDevice) uint32 {
			if fam.v6 {
				return d.GSO
			}
			return d.GSOIPv4
		}
		// The devices of one role; why they do not carry it.
		check := func(role string) (found bool, off []string) {
			for _, d := range st.Devices {
				if !slices.Contains(strings.Split(d.Role, ","), role) {
					continue
				}
				found = true
				if size(d) <= LegacySize {
					why := d.Reason
					if why == "" {
						why = fmt.Sprintf("holds %d", size(d))
					}
					off = append(off, d.Name+" ("+why+")")
				}
			}
			return found, off
		}
		pods := func() (bool, string) {
			var off []string
			for _, e := range st.Endpoints {
				s := e.IPv4
				if fam.v6 {
					s = e.IPv6
				}
				if s <= LegacySize {
					off = append(off, e.Endpoint)
				}
			}
			if len(off) > 0 {
				return false, "pod veths at 65536: " + strings.Join(off, ", ")
			}
			return true, ""
		}
		path := func(name, role, unused string) api.BigTCPPath {
			p := api.BigTCPPath{Path: name, Family: fam.name}
			switch {
			case fam.mode == Off:
				p.Reason = "off (--" + fam.name + "-big-tcp=off)"
			case !fam.v6 && !r.v4ok:
				p.Reason = "the kernel has no IPv4 BIG TCP (Linux >= 6.3)"
			case unused != "":
				p.Reason = unused
			default:
				ok, why := pods()
				if role != "" {
					found, off := check(role)
					switch {
					case !found:
						ok, why = false, "no "+role+" device found"
					case len(off) > 0:
						ok, why = false, strings.Join(append(off, why), "; ")
					}
				}
				p.On, p.Reason = ok, strings.TrimSuffix(why, "; ")
			}
			return p
		}
		clear, wg := "", ""
		switch {
		case len(in.nodeIPs) == 0:
			clear, wg = "not used: standalone node", "not used: standalone node"
		case in.wireGuard != "":
			clear = "not used: pod traffic to other nodes goes through WireGuard"
		default:
			wg = "not used: encryption is off"
		}
		out = append(out,
			path(api.BigTCPPathSameNode, "", ""),
			path(api.BigTCPPathCrossNode, RoleUnderlay, clear),
			path(api.BigTCPPathWireGuard, RoleWireGuard, wg),
			path(api.BigTCPPathOutside, RoleOutside, ""))
	}
	return out
}

// externalDevices converges the node's external devices: those holding a
// node IP (underlay), a default route (outside), and the WireGuard device.
func (r *Reconciler) externalDevices(in Input) ([]api.BigTCPDevice, error) {
	devs := []api.BigTCPDevice{}
	// The node's external devices, each once (with all its roles): the
	// same ones the north-south entry attaches to, plus WireGuard's.
	type ext struct {
		idx   int
		roles []string
	}
	var exts []*ext
	links, err := node.ExternalLinks(in.NodeIPs)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range links {
		exts = append(exts, &ext{idx: l.Index, roles: l.Roles})
	}
	if in.WireGuard != "" {
		if l, err := netlink.LinkByName(in.WireGuard); err != nil {
			errs = append(errs, fmt.Errorf("find %s devices: %w", RoleWireGuard, err))
		} else if k := slices.IndexFunc(exts, func(e *ext) bool { return e.idx == l.Attrs().Index }); k >= 0 {
			exts[k].roles = append(exts[k].roles, RoleWireGuard)
		} else {
			exts = append(exts, &ext{idx: l.Attrs().Index, roles: []string{RoleWireGuard}})
		}
	}
	h := &netlink.Handle{}
	for _, e := range exts {
		l, err := netlink.LinkByIndex(e.idx)
		if err != nil {
			errs = append(errs, fmt.Errorf("device %d: %w", e.idx, err))
			continue
		}
		d := r.device(h, l, strings.Join(e.roles, ","), "")
		devs = append(devs, d)
	}
	return devs, errors.Join(errs...)
}
