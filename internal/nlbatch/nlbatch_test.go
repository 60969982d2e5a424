package nlbatch

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

// inScratchNetns runs fn on a thread inside a new network namespace,
// removed at the end of the test.
func inScratchNetns(t *testing.T, fn func(h *netlink.Handle)) {
	t.Helper()
	testenv.Root(t, "creates a network namespace")
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "isthnlb-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			t.Error(err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			t.Error(err)
			return
		}
		defer func() {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
		}()
		fn(h)
	}()
	<-done
}

func addrRequest(index int, ip net.IP) *Request {
	m := nl.NewIfAddrmsg(unix.AF_INET)
	m.Index, m.Prefixlen = uint32(index), 32
	return New("add address "+ip.String(), unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, m,
		nl.NewRtAttr(unix.IFA_LOCAL, ip.To4()), nl.NewRtAttr(unix.IFA_ADDRESS, ip.To4()))
}

// A batch is applied in order; a request that fails does not stop the
// ones after it, and its error names it with the kernel's words.
func TestDoAppliesInOrderAndAttributesErrors(t *testing.T) {
	inScratchNetns(t, func(h *netlink.Handle) {
		s, err := Open(0)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		up := nl.NewIfInfomsg(unix.AF_UNSPEC)
		up.Index, up.Flags, up.Change = 1, unix.IFF_UP, unix.IFF_UP
		reqs := []*Request{
			New("set lo up", unix.RTM_NEWLINK, 0, up),
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
		if lo.Attrs().Flags&net.FlagUp == 0 {
			t.Error("lo is not up")
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
		s, err := Open(unix.RTMGRP_LINK)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		r := New("create veth", unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ECHO, nl.NewIfInfomsg(unix.AF_UNSPEC),
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
