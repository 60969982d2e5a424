package nlbatch_test

import (
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nlbatch"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// inScratchNetns runs fn on a thread inside a namespace of a lab (removed
// at the end of the test), with a handle in it.
func inScratchNetns(t *testing.T, fn func(h *netlink.Handle)) {
	t.Helper()
	ns, err := labtest.New(t).AddPodNetns("nlb")
	if err != nil {
		t.Fatal(err)
	}
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := ns.Do(func() error { fn(h); return nil }); err != nil {
		t.Fatal(err)
	}
}

func addrRequest(index int, ip net.IP) *nlbatch.Request {
	m := nl.NewIfAddrmsg(unix.AF_INET)
	m.Index, m.Prefixlen = uint32(index), 32
	return nlbatch.New("add address "+ip.String(), unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, m,
		nl.NewRtAttr(unix.IFA_LOCAL, ip.To4()), nl.NewRtAttr(unix.IFA_ADDRESS, ip.To4()))
}

// A batch is applied in order; a request that fails does not stop the
// ones after it, and its error names it with the kernel's words.
func TestDoAppliesInOrderAndAttributesErrors(t *testing.T) {
	inScratchNetns(t, func(h *netlink.Handle) {
		s, err := nlbatch.Open(0)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		lom := nl.NewIfInfomsg(unix.AF_UNSPEC)
		lom.Index = 1
		reqs := []*nlbatch.Request{
			nlbatch.New("set lo's MTU", unix.RTM_NEWLINK, 0, lom, nl.NewRtAttr(unix.IFLA_MTU, nl.Uint32Attr(1280))),
			addrRequest(9999, net.ParseIP("10.1.2.3")), // no such device
			addrRequest(1, net.ParseIP("10.1.2.4")),
			addrRequest(1, net.ParseIP("10.1.2.4")), // exists (NLM_F_EXCL)
		}
		err = s.Do(reqs...)
		if err == nil || !strings.Contains(err.Error(), "add address 10.1.2.3") {
			t.Fatalf("Do: %v, want the second request's error", err)
		}
		t.Logf("error: %v", err)
		if reqs[0].Err != nil || reqs[2].Err != nil {
			t.Errorf("requests that should succeed: %v, %v", reqs[0].Err, reqs[2].Err)
		}
		if reqs[1].Err == nil || reqs[3].Err == nil {
			t.Errorf("requests that should fail: %v, %v", reqs[1].Err, reqs[3].Err)
		}
		lo, err := h.LinkByIndex(1)
		if err != nil {
			t.Fatal(err)
		}
		if lo.Attrs().MTU != 1280 {
			t.Errorf("lo's MTU is %d after the batch, want 1280", lo.Attrs().MTU)
		}
		addrs, err := h.AddrList(lo, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, a := range addrs {
			found = found || a.IP.Equal(net.ParseIP("10.1.2.4"))
		}
		if !found {
			t.Errorf("10.1.2.4 not on lo after the batch: %v", addrs)
		}
		// The socket still works after a batch with errors.
		if err := s.Do(addrRequest(1, net.ParseIP("10.1.2.5"))); err != nil {
			t.Errorf("next batch: %v", err)
		}
	})
}

// NLM_F_ECHO answers come back with their request; a subscribed socket
// hears of devices through Wait.
func TestEchoAndWait(t *testing.T) {
	inScratchNetns(t, func(h *netlink.Handle) {
		s, err := nlbatch.Open(unix.RTMGRP_LINK)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		r := nlbatch.New("create veth", unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ECHO, nl.NewIfInfomsg(unix.AF_UNSPEC),
			nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated("nlbtest0")))
		info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("veth"))
		peer := info.AddRtAttr(nl.IFLA_INFO_DATA, nil).AddRtAttr(nl.VETH_INFO_PEER, nil)
		nl.NewIfInfomsgChild(peer, unix.AF_UNSPEC)
		peer.AddRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated("nlbtest1"))
		r.Msg.AddData(info)
		if err := s.Do(r); err != nil {
			t.Fatal(err)
		}
		if len(r.Replies) != 1 || r.Replies[0].Header.Type != unix.RTM_NEWLINK {
			t.Fatalf("echo: %d replies", len(r.Replies))
		}
		l, err := netlink.LinkDeserialize(nil, r.Replies[0].Data)
		if err != nil || l.Attrs().Name != "nlbtest0" {
			t.Fatalf("echo is %v, %v", l, err)
		}
		m, err := s.Wait(time.Second, func(m syscall.NetlinkMessage) bool {
			l, err := netlink.LinkDeserialize(nil, m.Data)
			return m.Header.Type == unix.RTM_NEWLINK && err == nil && l.Attrs().Name == "nlbtest1"
		})
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := netlink.LinkDeserialize(nil, m.Data); got.Attrs().Index == l.Attrs().Index {
			t.Error("the notification is the host end's")
		}
		if _, err := s.Wait(50*time.Millisecond, func(syscall.NetlinkMessage) bool { return false }); err == nil {
			t.Error("Wait for nothing returned a message")
		}
	})
}
