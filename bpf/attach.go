package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Endpoint attach modes (Datapath.SetEndpointAttach): how the pod
// programs go onto a pod's host-side veth.
const (
	// AttachTC is a clsact qdisc with direct-action cls_bpf filters. The
	// kernel takes it without waiting for an RCU grace period, so the
	// pods of a burst are plumbed side by side. The default.
	AttachTC = "tc"
	// AttachTCX is pinned tcx links (Linux >= 6.6; tc where the kernel has
	// no tcx). Each attach and detach waits for an RCU grace period while
	// it holds the RTNL lock (about 15 ms on a 2-core VM, 100 times a tc
	// attach), and every netlink user of the node waits with it: 25 pods
	// created at once queue for most of a second behind two of them per pod.
	AttachTCX = "tcx"
)

// ParseEndpointAttach checks an endpoint attach mode ("" is AttachTC).
func ParseEndpointAttach(m string) (string, error) {
	switch m {
	case "", AttachTC:
		return AttachTC, nil
	case AttachTCX:
		return AttachTCX, nil
	}
	return "", fmt.Errorf("endpoint attach mode %q: want %s or %s", m, AttachTC, AttachTCX)
}

// SetEndpointAttach sets how AttachEndpoint attaches (AttachTC or
// AttachTCX; anything else is AttachTC). Endpoints attached the other way
// move over when they are attached again (the agent does at start).
func (d *Datapath) SetEndpointAttach(m string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.endpointAttach = m
}

// AttachMode says how the pod programs were last attached: "tcx" or "tc"
// (clsact qdisc with direct-action cls_bpf filters); "" before the first.
func (d *Datapath) AttachMode() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.attachFn
}

func (d *Datapath) linkPin(ifname, dir string) string {
	return filepath.Join(d.pinDir, "links", ifname+"-"+dir)
}

// AttachEndpoint attaches from_pod to the ingress and to_pod to the egress of
// the host-side veth of a pod, the way SetEndpointAttach chose. Attaching
// again replaces the programs in place (a tc filter or a pinned tcx link
// updated), so re-attaching after a restart has no gap; programs attached
// the other way are removed after the new ones are in, since tcx programs
// run before tc's and both would judge each packet.
func (d *Datapath) AttachEndpoint(ifname string, ifindex int) error {
	d.mu.Lock()
	mode := d.endpointAttach
	d.mu.Unlock()
	if mode == AttachTCX {
		err := d.attachTCX(ifname, ifindex, "ingress", ebpf.AttachTCXIngress, d.objs.FromPod)
		if err == nil {
			err = d.attachTCX(ifname, ifindex, "egress", ebpf.AttachTCXEgress, d.objs.ToPod)
		}
		if err == nil {
			d.setMode(AttachTCX)
			return d.detachClsact(ifindex)
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
	}
	if err := d.attachClsact(ifindex); err != nil {
		return fmt.Errorf("attach datapath to %s: %w", ifname, err)
	}
	d.setMode(AttachTC)
	if err := d.detachPinned(ifname); err != nil {
		return fmt.Errorf("detach the tcx links of %s: %w", ifname, err)
	}
	return nil
}

// ClsactForNewEndpoints says whether a pod veth is created with a clsact
// qdisc (endpoint.Spec.Clsact) for AttachNewEndpoint's filters: in tc
// mode.
func (d *Datapath) ClsactForNewEndpoints() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.endpointAttach != AttachTCX
}

// AttachNewEndpoint attaches the pod programs to a host-side veth just
// created: when ClsactForNewEndpoints, the veth was created with its
// clsact qdisc, and the filters alone go on it; otherwise as
// AttachEndpoint.
func (d *Datapath) AttachNewEndpoint(ifname string, ifindex int) error {
	if !d.ClsactForNewEndpoints() {
		return d.AttachEndpoint(ifname, ifindex)
	}
	if err := d.addFilters(ifindex); err != nil {
		return fmt.Errorf("attach datapath to %s: %w", ifname, err)
	}
	d.setMode(AttachTC)
	// Pins of an earlier veth of that name in tcx mode, if any.
	if err := d.detachPinned(ifname); err != nil {
		return fmt.Errorf("detach the tcx links of %s: %w", ifname, err)
	}
	return nil
}

func (d *Datapath) setMode(m string) {
	d.mu.Lock()
	d.attachFn = m
	d.mu.Unlock()
}

func (d *Datapath) attachTCX(ifname string, ifindex int, dir string, at ebpf.AttachType, prog *ebpf.Program) error {
	pin := d.linkPin(ifname, dir)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := l.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
			uerr := l.Update(prog)
			l.Close()
			if uerr != nil {
				return fmt.Errorf("update %s program on %s: %w", dir, ifname, uerr)
			}
			return nil
		}
		// The pinned link belongs to a device that no longer exists.
		_ = l.Unpin()
		l.Close()
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: at})
	if err != nil {
		return fmt.Errorf("attach %s program to %s: %w", dir, ifname, err)
	}
	defer l.Close()
	_ = os.Remove(pin)
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin %s link of %s: %w", dir, ifname, err)
	}
	return nil
}

// ReleaseEndpoint lets go of the programs of a pod's host-side veth that
// is about to be deleted: the deletion removes its tc filters with it, so
// only tcx pins are dropped here. A netlink request the RTNL lock queues
// for saved, on every pod deletion.
func (d *Datapath) ReleaseEndpoint(ifname string) error {
	return d.detachPinned(ifname)
}

// detachClsact removes the clsact qdisc, and its filters with it, from a
// device; a device without one is not an error.
func (d *Datapath) detachClsact(ifindex int) error {
	err := netlink.QdiscDel(&netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"})
	if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV) {
		return nil
	}
	return fmt.Errorf("remove the clsact qdisc of ifindex %d: %w", ifindex, err)
}

// detachPinned detaches and unpins the ingress and egress links pinned
// under name.
func (d *Datapath) detachPinned(name string) error {
	var errs []error
	for _, dir := range []string{"ingress", "egress"} {
		pin := d.linkPin(name, dir)
		l, err := link.LoadPinnedLink(pin, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("load %s link of %s: %w", dir, name, err))
			_ = os.Remove(pin)
			continue
		}
		_ = l.Detach() // fails harmlessly when the device is already gone
		if err := l.Unpin(); err != nil {
			errs = append(errs, err)
		}
		l.Close()
	}
	return errors.Join(errs...)
}

// pinnedLinks returns the names (without prefix) that have an ingress link
// pinned under prefix+name.
func (d *Datapath) pinnedLinks(prefix string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(d.pinDir, "links"))
	if err != nil {
		return nil, fmt.Errorf("list pinned links: %w", err)
	}
	var out []string
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, prefix) && strings.HasSuffix(n, "-ingress") {
			out = append(out, strings.TrimSuffix(strings.TrimPrefix(n, prefix), "-ingress"))
		}
	}
	return out, nil
}

// attachClsact attaches the pod programs with a clsact qdisc and
// direct-action cls_bpf filters; replacing them is atomic.
func (d *Datapath) attachClsact(ifindex int) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("add clsact qdisc: %w", err)
	}
	return d.addFilters(ifindex)
}

// addFilters adds (or replaces) the pod programs' filters on the clsact
// qdisc of ifindex.
func (d *Datapath) addFilters(ifindex int) error {
	for _, f := range []struct {
		parent uint32
		prog   *ebpf.Program
		name   string
	}{{netlink.HANDLE_MIN_INGRESS, d.objs.FromPod, "isthmus-from-pod"}, {netlink.HANDLE_MIN_EGRESS, d.objs.ToPod, "isthmus-to-pod"}} {
		filter := &netlink.BpfFilter{
			FilterAttrs:  netlink.FilterAttrs{LinkIndex: ifindex, Parent: f.parent, Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1},
			Fd:           f.prog.FD(),
			Name:         f.name,
			DirectAction: true,
		}
		if err := netlink.FilterReplace(filter); err != nil {
			return fmt.Errorf("add %s filter: %w", f.name, err)
		}
	}
	return nil
}
