package bpf

import (
	"crypto/rand"
	"encoding/hex"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// scratchVeth creates a veth pair with a unique name in the test's netns
// and removes it at the end of the test.
func scratchVeth(t *testing.T) (string, int) {
	t.Helper()
	b := make([]byte, 4)
	rand.Read(b)
	name := "tatt" + hex.EncodeToString(b)
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
		t.Fatalf("create veth %s: %v", name, err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(name); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	return name, l.Attrs().Index
}

// attachedPrograms lists what runs at a device's ingress and egress: the
// IDs of its tcx programs and of its cls_bpf filters.
func attachedPrograms(t *testing.T, ifindex int) (tcx, tc []ebpf.ProgramID) {
	t.Helper()
	for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: at})
		if err != nil {
			t.Fatalf("query tcx programs: %v", err)
		}
		for _, p := range res.Programs {
			tcx = append(tcx, p.ID)
		}
	}
	l, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		t.Fatal(err)
	}
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := netlink.FilterList(l, parent)
		if err != nil {
			continue // no clsact qdisc
		}
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				tc = append(tc, ebpf.ProgramID(bf.Id))
			}
		}
	}
	return tcx, tc
}

func progIDs(t *testing.T, d *Datapath) (fromPod, toPod ebpf.ProgramID) {
	t.Helper()
	for _, p := range []struct {
		prog *ebpf.Program
		id   *ebpf.ProgramID
	}{{d.objs.FromPod, &fromPod}, {d.objs.ToPod, &toPod}} {
		info, err := p.prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		*p.id = id
	}
	return fromPod, toPod
}

// An endpoint carries the pod programs exactly once, whichever way it was
// attached before: tcx programs run before tc's, so both at once would
// judge (and translate) each packet twice.
func TestAttachEndpointModes(t *testing.T) {
	d := openTest(t)
	name, ifindex := scratchVeth(t)
	fromPod, toPod := progIDs(t, d)
	want := []ebpf.ProgramID{fromPod, toPod}
	check := func(step, mode string) {
		t.Helper()
		tcx, tc := attachedPrograms(t, ifindex)
		got := tc
		other := tcx
		if mode == AttachTCX {
			got, other = tcx, tc
		}
		if len(got) != 2 || got[0] != want[0] || got[1] != want[1] || len(other) != 0 {
			t.Fatalf("%s: tcx programs %v, tc filters %v; want from_pod and to_pod (%v) by %s alone", step, tcx, tc, want, mode)
		}
		if m := d.AttachMode(); m != mode {
			t.Fatalf("%s: AttachMode %q, want %q", step, m, mode)
		}
	}
	for _, s := range []struct{ step, mode string }{
		{"first attach, tc", AttachTC},
		{"again, tc (a restart)", AttachTC},
		{"switched to tcx", AttachTCX},
		{"again, tcx", AttachTCX},
		{"back to tc", AttachTC},
	} {
		d.SetEndpointAttach(s.mode)
		if err := d.AttachEndpoint(name, ifindex); err != nil {
			t.Fatalf("%s: %v", s.step, err)
		}
		check(s.step, s.mode)
	}
	// ReleaseEndpoint (a veth about to be deleted) drops the tcx links'
	// pins, which detaches them; tc filters go with the veth.
	d.SetEndpointAttach(AttachTCX)
	if err := d.AttachEndpoint(name, ifindex); err != nil {
		t.Fatal(err)
	}
	check("tcx before the release", AttachTCX)
	if err := d.ReleaseEndpoint(name); err != nil {
		t.Fatal(err)
	}
	if tcx, tc := attachedPrograms(t, ifindex); len(tcx)+len(tc) != 0 {
		t.Fatalf("after ReleaseEndpoint: tcx %v, tc %v", tcx, tc)
	}
}

func TestParseEndpointAttach(t *testing.T) {
	for in, want := range map[string]string{"": AttachTC, "tc": AttachTC, "tcx": AttachTCX} {
		if got, err := ParseEndpointAttach(in); err != nil || got != want {
			t.Errorf("ParseEndpointAttach(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseEndpointAttach("xdp"); err == nil {
		t.Error("ParseEndpointAttach(xdp) took it")
	}
}
