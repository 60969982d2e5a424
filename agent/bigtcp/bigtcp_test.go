package bigtcp

import (
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
	"github.com/isthmus-mesh/isthmus/agent/state"
	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

func TestConfig(t *testing.T) {
	c := Config{}.WithDefaults()
	if c.IPv6 != Auto || c.IPv4 != Auto || c.Size != DefaultSize || c.Validate() != nil {
		t.Fatalf("defaults: %+v, %v", c, c.Validate())
	}
	for _, bad := range []Config{{IPv6: "yes", IPv4: Auto, Size: DefaultSize}, {IPv6: On, IPv4: On, Size: LegacySize}, {IPv6: On, IPv4: On, Size: MaxSize + 1}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v: no error", bad)
		}
	}
	if _, err := ParseMode("--ipv4-big-tcp", "true"); err == nil || !strings.Contains(err.Error(), "--ipv4-big-tcp \"true\": want off, on or auto") {
		t.Errorf("ParseMode: %v", err)
	}
	// The device's TSO limit caps the size; at 64 KiB it is left alone.
	w := plan(Config{IPv6: On, IPv4: Auto, Size: MaxSize}, sizes{tsoMax: 524280, gso4: LegacySize})
	if w.v6 != 524280 || w.v4 != 524280 {
		t.Errorf("plan capped by tso_max_size: %+v", w)
	}
	w = plan(Config{IPv6: On, IPv4: On, Size: DefaultSize}, sizes{tsoMax: LegacySize, gso4: LegacySize})
	if w.v6 != LegacySize || w.v4 != LegacySize || !strings.Contains(w.why6, "tso_max_size 65536") {
		t.Errorf("plan for a 64 KiB device: %+v", w)
	}
}

// scratch is a node netns and a pod netns, removed when the test ends.
type scratch struct {
	node, pod string
}

func newScratch(t *testing.T) scratch {
	t.Helper()
	testenv.Root(t, "creates network namespaces and devices")
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	s := scratch{node: "isthbt-n" + hex.EncodeToString(b), pod: "isthbt-p" + hex.EncodeToString(b)}
	for _, n := range []string{s.node, s.pod} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v: %s", n, err, out)
		}
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n).Run() })
	}
	return s
}

// in runs fn on an OS thread inside the node netns, as the agent runs in
// its node's.
func (s scratch) in(t *testing.T, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := netns.GetFromName(s.node)
		if err != nil {
			t.Error(err)
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			t.Error(err)
			return
		}
		fn()
	}()
	<-done
}

// podAndReconciler plumbs ep's veth into the scratch pod and returns the
// result, a handle in the pod's namespace (closed at the test's end) and a
// new Reconciler.
func (s scratch) podAndReconciler(t *testing.T, ep state.Endpoint) (endpoint.Result, *netlink.Handle, *Reconciler) {
	t.Helper()
	res, err := endpoint.Create(endpoint.Spec{NetnsPath: ep.NetnsPath, HostIfName: ep.HostIfName, Addrs: ep.IPs, MTU: 1500})
	if err != nil {
		t.Fatal(err)
	}
	return res, s.podHandle(t), newReconciler(t)
}

// podHandle is a netlink handle in the scratch pod's namespace, closed at
// the test's end.
func (s scratch) podHandle(t *testing.T) *netlink.Handle {
	t.Helper()
	pns, err := netns.GetFromName(s.pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pns.Close() })
	ph, err := netlink.NewHandleAt(pns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ph.Close)
	return ph
}

// newReconciler is a Reconciler with the defaults, on a kernel with the
// IPv4 BIG TCP attributes.
func newReconciler(t *testing.T) *Reconciler {
	t.Helper()
	r, err := New(Config{}, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	if !r.v4ok {
		testenv.Skip(t, "the kernel has no IPv4 BIG TCP attributes (Linux >= 6.3)")
	}
	return r
}

func mustLink(t *testing.T, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func device(st *api.BigTCPStatus, name string) api.BigTCPDevice {
	for _, d := range st.Devices {
		if d.Name == name {
			return d
		}
	}
	return api.BigTCPDevice{}
}

func path(st *api.BigTCPStatus, p, fam string) api.BigTCPPath {
	for _, x := range st.Paths {
		if x.Path == p && x.Family == fam {
			return x
		}
	}
	return api.BigTCPPath{}
}

// A node with an underlay veth, a pod, and a TUN device (tso_max_size
// 64 KiB, like the embedded WireGuard's) holding the IPv6 default route:
// BIG TCP goes on everywhere but on the TUN device, which is reported, and
// off again puts 65536 back everywhere, live.
func TestSyncRealDevices(t *testing.T) {
	s := newScratch(t)
	s.in(t, func() {
		h := &netlink.Handle{}
		under := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "under0"}, PeerName: "under1"}
		tun := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, Mode: netlink.TUNTAP_MODE_TUN, Flags: netlink.TUNTAP_NO_PI}
		for _, l := range []netlink.Link{under, tun} {
			if err := h.LinkAdd(l); err != nil {
				t.Fatalf("add %s: %v", l.Attrs().Name, err)
			}
		}
		for _, n := range []string{"under0", "under1", "tun0"} {
			if err := h.LinkSetUp(mustLink(t, h, n)); err != nil {
				t.Fatal(err)
			}
		}
		u := mustLink(t, h, "under0")
		if err := h.AddrAdd(u, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("192.0.2.1"), Mask: net.CIDRMask(24, 32)}}); err != nil {
			t.Fatal(err)
		}
		if err := h.RouteAdd(&netlink.Route{LinkIndex: u.Attrs().Index, Gw: net.ParseIP("192.0.2.254")}); err != nil {
			t.Fatal(err)
		}
		if err := h.RouteAdd(&netlink.Route{LinkIndex: mustLink(t, h, "tun0").Attrs().Index, Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}}); err != nil {
			t.Fatal(err)
		}
		ep := state.Endpoint{Namespace: "default", Name: "web", NetnsPath: "/var/run/netns/" + s.pod, HostIfName: "isthbtweb",
			IPs: []netip.Addr{netip.MustParseAddr("10.9.0.5"), netip.MustParseAddr("fd00:9::5")}}
		_, ph, r := s.podAndReconciler(t, ep)
		in := Input{Endpoints: []state.Endpoint{ep}, NodeIPs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}
		if err := r.Sync(in); err != nil {
			t.Fatal(err)
		}
		st := r.Status()
		for _, l := range []netlink.Link{mustLink(t, h, "under0"), mustLink(t, h, ep.HostIfName), mustLink(t, ph, "eth0")} {
			if got := sizesOf(l); got.gso != DefaultSize || got.gro != DefaultSize || got.gso4 != DefaultSize || got.gro4 != DefaultSize {
				t.Errorf("%s holds %+v, want %d everywhere", l.Attrs().Name, got, DefaultSize)
			}
		}
		if got := sizesOf(mustLink(t, h, "tun0")); got.gso != LegacySize || got.gso4 != LegacySize {
			t.Errorf("tun0 holds %+v, want 65536", got)
		}
		if d := device(st, "tun0"); d.Role != RoleOutside || !strings.Contains(d.Reason, "tso_max_size 65536") {
			t.Errorf("tun0 in the status: %+v", d)
		}
		if d := device(st, "under0"); d.Role != RoleUnderlay+","+RoleOutside || d.Reason != "" || d.GSO != DefaultSize {
			t.Errorf("under0 in the status: %+v", d)
		}
		for _, fam := range []string{"ipv6", "ipv4"} {
			if p := path(st, api.BigTCPPathSameNode, fam); !p.On {
				t.Errorf("same node %s: %+v", fam, p)
			}
			if p := path(st, api.BigTCPPathCrossNode, fam); !p.On {
				t.Errorf("cross node %s: %+v", fam, p)
			}
			if p := path(st, api.BigTCPPathOutside, fam); p.On || !strings.Contains(p.Reason, "tun0") {
				t.Errorf("outside %s (tun0 holds a default route): %+v", fam, p)
			}
			if p := path(st, api.BigTCPPathWireGuard, fam); p.On || p.Reason != "not used: encryption is off" {
				t.Errorf("wireguard %s: %+v", fam, p)
			}
		}
		if e := r.Endpoint("default/web"); e == nil || e.IPv6 != DefaultSize || e.IPv4 != DefaultSize || e.Reason != "" {
			t.Errorf("endpoint status: %+v", e)
		}
		if mtu := v6RouteMTU(t, ph, mustLink(t, ph, "eth0")); mtu != 1500-JumboHeader {
			t.Errorf("pod IPv6 default route mtu %d, want %d", mtu, 1500-JumboHeader)
		}

		// A run visits only new or replumbed endpoints: a veth changed
		// behind the reconciler's back stays until a full run.
		if _, err := converge(h, mustLink(t, h, ep.HostIfName), plan(Config{IPv6: Off, IPv4: Off}.WithDefaults(), sizesOf(mustLink(t, h, ep.HostIfName)))); err != nil {
			t.Fatal(err)
		}
		if err := r.Sync(in); err != nil {
			t.Fatal(err)
		}
		if got := sizesOf(mustLink(t, h, ep.HostIfName)); got.gso != LegacySize {
			t.Errorf("an unchanged endpoint was visited again: host veth holds %+v", got)
		}
		r.fullAt = time.Time{} // the resync is due
		if err := r.Sync(in); err != nil {
			t.Fatal(err)
		}
		if got := sizesOf(mustLink(t, h, ep.HostIfName)); got.gso != DefaultSize {
			t.Errorf("a full run left the host veth at %+v", got)
		}

		// IPv4 only: writing the IPv6 sizes at 65536 must not reset the
		// IPv4 ones the kernel ties to them (it does when gso_max_size
		// drops to 65536 after them).
		v4, err := New(Config{IPv6: Off, IPv4: On}, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		if err := v4.Sync(in); err != nil {
			t.Fatal(err)
		}
		if got := sizesOf(mustLink(t, ph, "eth0")); got.gso != LegacySize || got.gso4 != DefaultSize || got.gro4 != DefaultSize {
			t.Errorf("ipv4 only: pod eth0 holds %+v", got)
		}
		// Off: 65536 back on every device, the route MTU gone, live.
		off, err := New(Config{IPv6: Off, IPv4: Off}, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		if err := off.Sync(in); err != nil {
			t.Fatal(err)
		}
		for _, l := range []netlink.Link{mustLink(t, h, "under0"), mustLink(t, h, ep.HostIfName), mustLink(t, ph, "eth0"), mustLink(t, h, "tun0")} {
			if got := sizesOf(l); got.gso != LegacySize || got.gro != LegacySize || got.gso4 != LegacySize || got.gro4 != LegacySize {
				t.Errorf("off: %s holds %+v", l.Attrs().Name, got)
			}
		}
		if mtu := v6RouteMTU(t, ph, mustLink(t, ph, "eth0")); mtu != 0 {
			t.Errorf("off: pod IPv6 default route mtu %d, want none", mtu)
		}
		if p := path(off.Status(), api.BigTCPPathSameNode, "ipv6"); p.On || !strings.Contains(p.Reason, "--ipv6-big-tcp=off") {
			t.Errorf("off: %+v", p)
		}

	})
}

// A pod end that cannot take the size (here a TUN device standing in as
// the pod's eth0) takes its host end back to 65536 with it; the path says
// which endpoint.
func TestEndpointPairRollsBackTogether(t *testing.T) {
	s := newScratch(t)
	s.in(t, func() {
		h := &netlink.Handle{}
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "isthbtodd"}, PeerName: "isthbtpeer"}); err != nil {
			t.Fatal(err)
		}
		pns, err := netns.GetFromName(s.pod)
		if err != nil {
			t.Fatal(err)
		}
		defer pns.Close()
		// A TUN device is made in the caller's netns: make it here, move it.
		tun := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, Mode: netlink.TUNTAP_MODE_TUN, Flags: netlink.TUNTAP_NO_PI}
		if err := h.LinkAdd(tun); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetNsFd(mustLink(t, h, "eth0"), int(pns)); err != nil {
			t.Fatal(err)
		}
		ep := state.Endpoint{Namespace: "default", Name: "odd", NetnsPath: "/var/run/netns/" + s.pod, HostIfName: "isthbtodd",
			IPs: []netip.Addr{netip.MustParseAddr("10.9.0.6")}}
		r, err := New(Config{IPv6: On, IPv4: Auto}, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Sync(Input{Endpoints: []state.Endpoint{ep}}); err != nil {
			t.Fatal(err)
		}
		if got := sizesOf(mustLink(t, h, "isthbtodd")); got.gso != LegacySize || got.gso4 != LegacySize {
			t.Errorf("host end holds %+v, want 65536 with its pod end", got)
		}
		e := r.Endpoint("default/odd")
		if e == nil || e.IPv6 != LegacySize || !strings.Contains(e.Reason, "tso_max_size 65536") || !strings.Contains(e.Reason, "rolled back with its pod end") {
			t.Errorf("endpoint status: %+v", e)
		}
		if p := path(r.Status(), api.BigTCPPathSameNode, "ipv6"); p.On || !strings.Contains(p.Reason, "default/odd") {
			t.Errorf("same node: %+v", p)
		}
	})
}

// A write the kernel refuses rolls the device back to 65536 (not to what
// it held before) and says why.
func TestConvergeRollsBack(t *testing.T) {
	s := newScratch(t)
	s.in(t, func() {
		h := &netlink.Handle{}
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "v0"}, PeerName: "v1"}); err != nil {
			t.Fatal(err)
		}
		if _, err := converge(h, mustLink(t, h, "v0"), want{v6: DefaultSize, v4: DefaultSize}); err != nil {
			t.Fatal(err)
		}
		// Above the veth's tso_max_size: the kernel says "too big".
		got, err := converge(h, mustLink(t, h, "v0"), want{v6: 1 << 20, v4: 1 << 20})
		if err == nil || !strings.Contains(err.Error(), "gso_max_size 1048576") {
			t.Fatalf("refused write: %v", err)
		}
		if got.gso != LegacySize || got.gro != LegacySize || got.gso4 != LegacySize || got.gro4 != LegacySize {
			t.Errorf("after the refusal v0 holds %+v, want 65536", got)
		}
		if now := sizesOf(mustLink(t, h, "v0")); now != got {
			t.Errorf("reported %+v, kernel holds %+v", got, now)
		}
	})
}

func v6RouteMTU(t *testing.T, h *netlink.Handle, l netlink.Link) int {
	t.Helper()
	rs, err := h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{LinkIndex: l.Attrs().Index}, netlink.RT_FILTER_OIF)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if r.Dst == nil {
			return r.MTU
		}
		if ones, _ := r.Dst.Mask.Size(); ones == 0 {
			return r.MTU
		}
	}
	t.Fatal("no IPv6 default route in the pod")
	return 0
}

// A veth created with VethSizes holds them, with the pod's IPv6 route
// MTU, and SizeEndpoint takes it as created; one whose sizes the
// reconciler would not keep is converged instead.
func TestVethCreatedSized(t *testing.T) {
	s := newScratch(t)
	s.in(t, func() {
		h := &netlink.Handle{}
		r := newReconciler(t)
		ep := state.Endpoint{Namespace: "default", Name: "sized", NetnsPath: "/var/run/netns/" + s.pod, HostIfName: "isthbtsized",
			IPs: []netip.Addr{netip.MustParseAddr("10.9.0.7"), netip.MustParseAddr("fd00:9::7")}}
		sizes, routeMTU := r.VethSizes(1500)
		if sizes.GSO != DefaultSize || sizes.GROIPv4 != DefaultSize || routeMTU != 1500-JumboHeader {
			t.Fatalf("VethSizes(1500) = %+v, %d", sizes, routeMTU)
		}
		res, err := endpoint.Create(endpoint.Spec{NetnsPath: ep.NetnsPath, HostIfName: ep.HostIfName, Addrs: ep.IPs, MTU: 1500, Sizes: sizes, IPv6RouteMTU: routeMTU})
		if err != nil {
			t.Fatal(err)
		}
		ep.IfIndex = res.HostIfIndex
		ph := s.podHandle(t)
		for _, l := range []netlink.Link{mustLink(t, h, ep.HostIfName), mustLink(t, ph, "eth0")} {
			if got := sizesOf(l); got.gso != DefaultSize || got.gro != DefaultSize || got.gso4 != DefaultSize || got.gro4 != DefaultSize {
				t.Errorf("%s created with %+v", l.Attrs().Name, got)
			}
		}
		if mtu := v6RouteMTU(t, ph, mustLink(t, ph, "eth0")); mtu != 1500-JumboHeader {
			t.Errorf("pod IPv6 default route mtu %d, want %d", mtu, 1500-JumboHeader)
		}
		if eb, devs, ok := r.createdSized(ep, res); !ok || eb.IPv6 != DefaultSize || eb.IPv4 != DefaultSize || len(devs) != 2 || eb.Reason != "" {
			t.Errorf("createdSized = %+v, %+v, %v", eb, devs, ok)
		}
		r.SizeEndpoint(ep, res)
		if e := r.Endpoint(ep.Key()); e == nil || e.IPv6 != DefaultSize || e.IPv4 != DefaultSize {
			t.Errorf("endpoint status after SizeEndpoint: %+v", e)
		}

		// Off: the created sizes are not what the configuration wants.
		off, err := New(Config{IPv6: Off, IPv4: Off}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		if _, _, ok := off.createdSized(ep, res); ok {
			t.Error("createdSized took sizes the configuration does not want")
		}
		off.SizeEndpoint(ep, res)
		if got := sizesOf(mustLink(t, h, ep.HostIfName)); got.gso != LegacySize {
			t.Errorf("with BIG TCP off, SizeEndpoint left %+v", got)
		}
	})
}

// An add sizes its pod's veth itself (SizeEndpoint), before it returns
// and side by side with other adds; the next run takes that result
// instead of visiting the pod again, also when the add was still on
// (not in the run's endpoints) during a run in between.
func TestSizeEndpointBeforeTheRun(t *testing.T) {
	s := newScratch(t)
	s.in(t, func() {
		h := &netlink.Handle{}
		ep := state.Endpoint{Namespace: "default", Name: "new", NetnsPath: "/var/run/netns/" + s.pod, HostIfName: "isthbtnew",
			IPs: []netip.Addr{netip.MustParseAddr("10.9.0.6"), netip.MustParseAddr("fd00:9::6")}}
		res, ph, r := s.podAndReconciler(t, ep)
		ep.IfIndex = res.HostIfIndex

		r.SizeEndpoint(ep, res) // created without sizes: converged as a run would
		for _, l := range []netlink.Link{mustLink(t, h, ep.HostIfName), mustLink(t, ph, "eth0")} {
			if got := sizesOf(l); got.gso != DefaultSize || got.gso4 != DefaultSize {
				t.Errorf("after SizeEndpoint %s holds %+v, want %d", l.Attrs().Name, got, DefaultSize)
			}
		}
		if e := r.Endpoint(ep.Key()); e == nil || e.IPv6 != DefaultSize || e.IPv4 != DefaultSize {
			t.Errorf("endpoint status after SizeEndpoint: %+v", e)
		}

		// A run while the add is still on: the endpoint is not in it yet.
		if err := r.Sync(Input{}); err != nil {
			t.Fatal(err)
		}
		// Changed behind the reconciler's back: a run that visited the
		// pod would size it again.
		if _, err := converge(h, mustLink(t, h, ep.HostIfName), plan(Config{IPv6: Off, IPv4: Off}.WithDefaults(), sizesOf(mustLink(t, h, ep.HostIfName)))); err != nil {
			t.Fatal(err)
		}
		if err := r.Sync(Input{Endpoints: []state.Endpoint{ep}, EndpointsGen: 2}); err != nil {
			t.Fatal(err)
		}
		if got := sizesOf(mustLink(t, h, ep.HostIfName)); got.gso != LegacySize {
			t.Errorf("the run visited the pod its add had sized: host veth holds %+v", got)
		}
		if st := r.Status(); len(st.Endpoints) != 1 || st.Endpoints[0].IPv6 != DefaultSize {
			t.Errorf("status after the run: %+v", st.Endpoints)
		}
		// Taken once: a full run visits it as before.
		r.fullAt = time.Time{}
		if err := r.Sync(Input{Endpoints: []state.Endpoint{ep}, EndpointsGen: 3}); err != nil {
			t.Fatal(err)
		}
		if got := sizesOf(mustLink(t, h, ep.HostIfName)); got.gso != DefaultSize {
			t.Errorf("a full run left the host veth at %+v", got)
		}
	})
}

// With the endpoints changed since the last run known, a run visits those
// and the ones that failed, not every endpoint: an endpoint replumbed but
// not named as changed stays as it was until the full run; one named and
// gone leaves the status; one that failed (its netns not there yet) is
// visited again by the next run even though nothing names it.
func TestSyncVisitsChangedEndpoints(t *testing.T) {
	s := newScratch(t)
	other := s.pod + "b"
	if out, err := exec.Command("ip", "netns", "add", other).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", other, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", other).Run() })
	s.in(t, func() {
		h := &netlink.Handle{}
		a := state.Endpoint{Namespace: "default", Name: "a", NetnsPath: "/var/run/netns/" + s.pod, HostIfName: "isthbta",
			IPs: []netip.Addr{netip.MustParseAddr("10.9.0.7")}}
		b := state.Endpoint{Namespace: "default", Name: "b", NetnsPath: "/var/run/netns/" + other, HostIfName: "isthbtb",
			IPs: []netip.Addr{netip.MustParseAddr("10.9.0.8")}}
		_, _, r := s.podAndReconciler(t, a)
		gen, changes := uint64(0), map[uint64][]string{}
		sync := func(eps []state.Endpoint, changed ...string) {
			t.Helper()
			gen++
			changes[gen] = changed
			err := r.Sync(Input{Endpoints: eps, EndpointsGen: gen, EndpointsChangedSince: func(since uint64) ([]string, bool) {
				var keys []string
				for g := since + 1; g <= gen; g++ {
					for _, k := range changes[g] {
						if !slices.Contains(keys, k) {
							keys = append(keys, k)
						}
					}
				}
				return keys, true
			}})
			if err != nil && !strings.Contains(err.Error(), "default/b") {
				t.Fatal(err)
			}
		}
		legacy := func(name string) {
			t.Helper()
			if _, err := converge(h, mustLink(t, h, name), plan(Config{IPv6: Off, IPv4: Off}.WithDefaults(), sizesOf(mustLink(t, h, name)))); err != nil {
				t.Fatal(err)
			}
		}
		gso := func(name string) uint32 { return sizesOf(mustLink(t, h, name)).gso4 }

		// b's veth is not there yet: its visit fails, and is made again.
		sync([]state.Endpoint{a, b}, a.Key(), b.Key())
		if e := r.Endpoint(b.Key()); e == nil || e.Reason == "" {
			t.Fatalf("b without its veth: %+v", e)
		}
		if _, err := endpoint.Create(endpoint.Spec{NetnsPath: b.NetnsPath, HostIfName: b.HostIfName, Addrs: b.IPs, MTU: 1500}); err != nil {
			t.Fatal(err)
		}
		sync([]state.Endpoint{a, b}) // nothing named
		if e := r.Endpoint(b.Key()); e == nil || e.Reason != "" || gso(b.HostIfName) != DefaultSize {
			t.Fatalf("b once its veth is there: %+v, gso %d", e, gso(b.HostIfName))
		}

		// Both replumbed (new ifindexes as far as the store says), b alone named.
		legacy(a.HostIfName)
		legacy(b.HostIfName)
		a.IfIndex, b.IfIndex = 1001, 1002
		sync([]state.Endpoint{a, b}, b.Key())
		if gso(b.HostIfName) != DefaultSize || gso(a.HostIfName) != LegacySize {
			t.Errorf("after a run naming b: a holds %d, b %d; want a left alone", gso(a.HostIfName), gso(b.HostIfName))
		}
		r.fullAt = time.Time{}
		sync([]state.Endpoint{a, b})
		if gso(a.HostIfName) != DefaultSize {
			t.Errorf("the full run left a at %d", gso(a.HostIfName))
		}

		// b goes.
		sync([]state.Endpoint{a}, b.Key())
		if st := r.Status(); len(st.Endpoints) != 1 || st.Endpoints[0].Endpoint != a.Key() || r.Endpoint(b.Key()) != nil {
			t.Errorf("status after b went: %+v", st.Endpoints)
		}
	})
}
