package l2

import (
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// unusable classifies what netlink reports: a bond member (its Slave
// attributes, which the kernel sets for bond ports) never answers, also
// where this kernel cannot make a bond for TestBondMemberNeverAnswers.
func TestUnusableClassifiesLinks(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	up := uint32(unix.IFF_UP | unix.IFF_LOWER_UP)
	for _, c := range []struct {
		name string
		link netlink.Link
		want string
	}{
		{"ethernet", &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "eth0", HardwareAddr: mac, RawFlags: up}}, ""},
		{"bond member", &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "eth1", HardwareAddr: mac, RawFlags: up, Slave: &netlink.BondSlave{}}}, "bond member"},
		{"noarp", &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "eth2", HardwareAddr: mac, RawFlags: up | unix.IFF_NOARP}}, "NOARP interface"},
		{"no MAC", &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tun0", RawFlags: up}}, "not an Ethernet interface"},
	} {
		if got := unusable(c.link); got != c.want {
			t.Errorf("%s: unusable = %q, want %q", c.name, got, c.want)
		}
	}
}
