package endpoint

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// inNetns runs fn on a dedicated OS thread switched into ns. Netlink calls do
// not need it (they take a handle bound to the namespace); /proc/sys writes do,
// because /proc/sys/net resolves to the namespace of the calling thread.
func inNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime destroys it when this
			// goroutine exits instead of reusing a thread in the wrong netns.
			errc <- fmt.Errorf("return to node netns: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// peerLink fetches the other end of a veth. When the peer lives in another
// namespace, the kernel names that namespace by its nsid relative to ours, and
// RTM_GETLINK with IFLA_TARGET_NETNSID reads the device there without entering
// it (no netns path needed, which a restarted agent may not trust).
func peerLink(nsid, index int) (netlink.Link, error) {
	if index <= 0 {
		return nil, fmt.Errorf("kernel reported no peer index")
	}
	if nsid < 0 {
		return netlink.LinkByIndex(index)
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(index)
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFLA_TARGET_NETNSID, nl.Uint32Attr(uint32(nsid))))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, 0)
	if err != nil {
		return nil, fmt.Errorf("get link %d in nsid %d: %w", index, nsid, err)
	}
	if len(msgs) != 1 {
		return nil, fmt.Errorf("get link %d in nsid %d: %d answers", index, nsid, len(msgs))
	}
	return netlink.LinkDeserialize(nil, msgs[0])
}
