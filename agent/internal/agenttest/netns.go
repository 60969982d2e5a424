// Package agenttest holds what several of the agent's packages test with:
// fakes of the kernel-facing parts (datapath maps, pod plumbing, routes)
// and a scratch network namespace.
package agenttest

import (
	"crypto/rand"
	"encoding/hex"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

// Netns creates a netns with an underlay device (one end of a veth pair,
// 192.0.2.1/24, 2001:db8::1/64) and returns a netlink handle bound to it
// and a function that runs `ip -n <netns> args...`. It is removed when the
// test ends; without root the test is skipped.
func Netns(t *testing.T) (*netlink.Handle, func(args ...string) string) {
	t.Helper()
	testenv.Root(t, "creates a network namespace")
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "isthrt-" + hex.EncodeToString(b)
	ip := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ip("link", "add", "under0", "type", "veth", "peer", "name", "under1")
	ip("link", "set", "under1", "up")
	ip("addr", "add", "192.0.2.1/24", "dev", "under0")
	ip("-6", "addr", "add", "2001:db8::1/64", "dev", "under0", "nodad")
	ip("link", "set", "under0", "up")

	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h, ip
}
