package wireguard

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/isthmus-mesh/isthmus/internal/testenv"
)

// Two namespaces joined by a veth, a WireGuard device in each; traffic
// through the tunnel, only WireGuard UDP on the veth, key reuse across
// Close/Open, rotation. Once per engine the machine has.
func TestTunnel(t *testing.T) {
	requireRoot(t)
	t.Run(ModeUserspace, func(t *testing.T) { testTunnel(t, ModeUserspace) })
	t.Run(ModeKernel, func(t *testing.T) {
		if err := kernelWireGuard(t); err != nil {
			t.Skipf("no WireGuard kernel module (ip link add type wireguard: %v)", err)
		}
		testTunnel(t, ModeKernel)
	})
}

func testTunnel(t *testing.T, mode string) {
	id := randomID(t)
	a := addNetns(t, "iwg"+id+"-a")
	b := addNetns(t, "iwg"+id+"-b")
	vethA, vethB := "iwg"+id+"va", "iwg"+id+"vb"
	mustRun(t, "ip", "link", "add", vethA, "netns", a.name, "type", "veth", "peer", "name", vethB, "netns", b.name)
	for _, x := range []struct {
		ns        *testNS
		veth, idx string
	}{{a, vethA, "1"}, {b, vethB, "2"}} {
		x.ns.run(t, "ip", "addr", "add", "192.0.2."+x.idx+"/24", "dev", x.veth)
		x.ns.run(t, "ip", "addr", "add", "fd00:192::"+x.idx+"/64", "dev", x.veth, "nodad")
		x.ns.run(t, "ip", "link", "set", x.veth, "up")
		x.ns.watchUnderlay(t, x.veth)
	}

	dir := t.TempDir()
	cfgA := Config{Name: "iwg" + id + "a", KeyFile: filepath.Join(dir, "a", "wg.key"), Logger: testLogger(), Mode: mode}
	cfgB := Config{Name: "iwg" + id + "b", KeyFile: filepath.Join(dir, "b", "wg.key"), Logger: testLogger(), Mode: mode}
	parent := t
	devA := openIn(t, nil, a, cfgA)
	devB := openIn(t, nil, b, cfgB) // same default port: only works if each socket is in its own netns
	t.Logf("mode %s, A %s, B %s", devA.Mode(), devA.PublicKey(), devB.PublicKey())
	if devA.Mode() != mode || devB.Mode() != mode {
		t.Fatalf("modes %q and %q, want %q", devA.Mode(), devB.Mode(), mode)
	}
	for _, x := range []struct {
		ns  *testNS
		dev *Device
	}{{a, devA}, {b, devB}} {
		if out := x.ns.run(t, "ss", "-Hlun", "sport", "=", ":51871"); !strings.Contains(out, "51871") {
			t.Errorf("%s: no UDP socket on 51871 in its namespace: %q", x.dev.Name(), out)
		}
		if out := x.ns.run(t, "ip", "-o", "link", "show", x.dev.Name()); !strings.Contains(out, "mtu 1420") || !strings.Contains(out, ",UP") {
			t.Errorf("%s: want up with MTU 1420: %s", x.dev.Name(), out)
		}
	}

	peerA := func(d *Device) Peer {
		return Peer{PublicKey: d.PublicKey(), Endpoint: netip.MustParseAddrPort("192.0.2.1:51871"), AllowedIPs: pfx("100.64.0.1/32", "fd64::1/128")}
	}
	peerB := Peer{PublicKey: devB.PublicKey(), Endpoint: netip.MustParseAddrPort("192.0.2.2:51871"), AllowedIPs: pfx("100.64.0.2/32", "fd64::2/128")}
	mustSync(t, devA, peerB)
	mustSync(t, devB, peerA(devA))
	addTunnelAddrs(t, a, devA, "1")
	addTunnelAddrs(t, b, devB, "2")

	waitPing(t, a, "100.64.0.2")
	waitPing(t, a, "fd64::2")
	tcpThrough(t, b, a, "100.64.0.2", 4<<20)
	tcpThrough(t, a, b, "[fd64::1]", 1<<20)

	t.Run("underlay carries only WireGuard UDP", func(t *testing.T) {
		for _, ns := range []*testNS{a, b} {
			c := ns.counters(t)
			t.Logf("%s ingress: %v", ns.name, c)
			// UDP GSO: a packet on the veth may carry dozens of datagrams.
			if c["wg_bytes"] < 1<<20 {
				t.Errorf("%s: only %d bytes of WireGuard after 5 MiB of TCP", ns.name, c["wg_bytes"])
			}
			if c["other"] != 0 {
				t.Errorf("%s: %d packets on the veth were not WireGuard UDP to 51871 (plaintext leak?)", ns.name, c["other"])
			}
		}
	})

	t.Run("stats and wg show", func(t *testing.T) {
		s, err := devA.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if s.PublicKey != devA.PublicKey() || s.ListenPort != 51871 || len(s.Peers) != 1 {
			t.Fatalf("stats: %+v", s)
		}
		p := s.Peers[0]
		if p.PublicKey != peerB.PublicKey || p.Endpoint != peerB.Endpoint || p.LastHandshake.IsZero() || p.RxBytes < 1<<20 || p.TxBytes < 4<<20 {
			t.Errorf("peer stats: %+v", p)
		}
		testenv.Tool(t, "wg", "wireguard-tools")
		// The embedded engine's UAPI socket is host-wide; a kernel
		// device is seen from its namespace.
		out := a.run(t, "wg", "show", devA.Name())
		if !strings.Contains(out, peerB.PublicKey) || !strings.Contains(out, "latest handshake") {
			t.Errorf("wg show %s:\n%s", devA.Name(), out)
		}
	})

	t.Run("resync leaves unchanged peers alone", func(t *testing.T) {
		before, _ := devB.Stats()
		mustSync(t, devB, peerA(devA))
		after, _ := devB.Stats()
		if len(after.Peers) != 1 || !after.Peers[0].LastHandshake.Equal(before.Peers[0].LastHandshake) {
			t.Errorf("peer disturbed: before %+v after %+v", before.Peers, after.Peers)
		}
		bad := peerA(devA)
		bad.PublicKey = "garbage"
		err := devB.SyncPeers([]Peer{peerA(devA), bad, peerA(devA)})
		var ipe *InvalidPeersError
		if !errors.As(err, &ipe) || !strings.Contains(err.Error(), "garbage") || !strings.Contains(err.Error(), devA.PublicKey()) {
			t.Errorf("invalid list: %v", err)
		}
		if s, _ := devB.Stats(); len(s.Peers) != 1 {
			t.Errorf("refused list changed the device: %+v", s.Peers)
		}
	})

	t.Run("IPv6 underlay", func(t *testing.T) {
		pa, pb := peerA(devA), peerB
		pa.Endpoint = netip.MustParseAddrPort("[fd00:192::1]:51871")
		pb.Endpoint = netip.MustParseAddrPort("[fd00:192::2]:51871")
		mustSync(t, devA, pb)
		mustSync(t, devB, pa)
		tcpThrough(t, b, a, "100.64.0.2", 1<<20)
		if s, _ := devA.Stats(); s.Peers[0].Endpoint != pb.Endpoint {
			t.Errorf("endpoint not updated: %v", s.Peers[0].Endpoint)
		}
		mustSync(t, devA, peerB)
		mustSync(t, devB, peerA(devA))
		if c := a.counters(t); c["other"] != 0 {
			t.Errorf("%d non-WireGuard packets", c["other"])
		}
	})

	t.Run("key reused after Close and Open", func(st *testing.T) {
		t := st
		pub := devA.PublicKey()
		if err := devA.Close(); err != nil {
			t.Fatal(err)
		}
		if err := exec.Command("ip", "-n", a.name, "link", "show", cfgA.Name).Run(); err == nil {
			t.Error("link still there after Close")
		}
		if _, err := os.Stat(sockPath(cfgA.Name)); mode == ModeUserspace && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("UAPI socket still there after Close: %v", err)
		}
		if err := devA.SyncPeers(nil); err == nil {
			t.Error("SyncPeers on a closed device succeeded")
		}
		devA = openIn(t, parent, a, cfgA) // closed when TestTunnel ends, not this subtest
		if devA.PublicKey() != pub {
			t.Fatalf("public key changed across Close/Open: %s -> %s", pub, devA.PublicKey())
		}
		if fi, err := os.Stat(cfgA.KeyFile); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("key file: %v %v", fi.Mode(), err)
		}
		mustSync(t, devA, peerB)
		addTunnelAddrs(t, a, devA, "1")
		waitPing(t, a, "100.64.0.2")
	})

	t.Run("rotate", func(t *testing.T) {
		old := devA.PublicKey()
		pub, err := devA.Rotate()
		if err != nil {
			t.Fatal(err)
		}
		if pub == old || pub != devA.PublicKey() {
			t.Fatalf("rotate returned %s (old %s, device says %s)", pub, old, devA.PublicKey())
		}
		if k, err := readKeyFile(cfgA.KeyFile, testLogger()); err != nil || k.PublicKey().String() != pub {
			t.Fatalf("key file does not hold the new key: %v", err)
		}
		s, _ := devA.Stats()
		if s.PublicKey != pub {
			t.Errorf("device reports %s after rotation", s.PublicKey)
		}
		mustSync(t, devB, peerA(devA)) // replaces the old key's peer
		if s, _ := devB.Stats(); len(s.Peers) != 1 || s.Peers[0].PublicKey != pub {
			t.Fatalf("B's peers after rotation: %+v", s.Peers)
		}
		tcpThrough(t, b, a, "100.64.0.2", 1<<20)
	})
}

// A device opened by a thread that entered a netns while the process stays
// elsewhere: the interface must not show up in the process's namespace. A
// stale UAPI socket (a crashed agent's) is replaced; a live one is not.
func TestOpenInNetnsLeavesHostAlone(t *testing.T) {
	requireRoot(t)
	id := randomID(t)
	ns := addNetns(t, "iwg"+id+"-c")
	cfg := Config{Name: "iwg" + id + "c", ListenPort: 51999, KeyFile: filepath.Join(t.TempDir(), "k"), Logger: testLogger(), Mode: ModeUserspace}
	if err := os.MkdirAll(uapiDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sockPath(cfg.Name), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(sockPath(cfg.Name)) })
	d := openIn(t, nil, ns, cfg)
	if err := exec.Command("ip", "link", "show", cfg.Name).Run(); err == nil {
		t.Errorf("%s visible in the test's own namespace", cfg.Name)
	}
	if out, _ := exec.Command("ss", "-Hlun", "sport", "=", ":51999").Output(); len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("UDP socket in the test's own namespace: %s", out)
	}
	// A second device of the same name is refused, not merged.
	ns2 := addNetns(t, "iwg"+id+"-d")
	err := inNetns(ns2.h, func() error {
		d2, err := Open(cfg)
		if err == nil {
			d2.Close()
		}
		return err
	})
	if err == nil {
		t.Error("second device with the same name opened")
	} else {
		t.Logf("second device refused: %v", err)
	}
	if _, err := d.Stats(); err != nil {
		t.Errorf("first device damaged: %v", err)
	}
}

// --- helpers ---

// kernelWireGuard probes for the module in a throwaway namespace.
func kernelWireGuard(t *testing.T) error {
	ns := addNetns(t, "iwg"+randomID(t)+"-k")
	out, err := exec.Command("ip", "-n", ns.name, "link", "add", "wgprobe", "type", "wireguard").CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

type testNS struct {
	name string
	h    netns.NsHandle
}

func requireRoot(t *testing.T) {
	t.Helper()
	testenv.Root(t, "network namespaces")
}

func randomID(t *testing.T) string {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.DiscardHandler)
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func addNetns(t *testing.T, name string) *testNS {
	t.Helper()
	mustRun(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ns := &testNS{name: name, h: h}
	ns.run(t, "ip", "link", "set", "lo", "up")
	return ns
}

func (ns *testNS) run(t *testing.T, args ...string) string {
	t.Helper()
	return mustRun(t, append([]string{"ip", "netns", "exec", ns.name}, args...)...)
}

// openIn opens a device from a thread locked into ns, as an agent running
// inside a node's namespace would, and closes it when owner (t if nil) ends.
func openIn(t, owner *testing.T, ns *testNS, cfg Config) *Device {
	t.Helper()
	type result struct {
		d   *Device
		err error
	}
	ch := make(chan result)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(ns.h); err != nil {
			ch <- result{err: err}
			return
		}
		d, err := Open(cfg)
		ch <- result{d, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("open %s in %s: %v", cfg.Name, ns.name, r.err)
	}
	if owner == nil {
		owner = t
	}
	owner.Cleanup(func() { r.d.Close() })
	return r.d
}

func mustSync(t *testing.T, d *Device, peers ...Peer) {
	t.Helper()
	if err := d.SyncPeers(peers); err != nil {
		t.Fatal(err)
	}
}

func addTunnelAddrs(t *testing.T, ns *testNS, d *Device, idx string) {
	t.Helper()
	ns.run(t, "ip", "addr", "add", "100.64.0."+idx+"/24", "dev", d.Name())
	ns.run(t, "ip", "addr", "add", "fd64::"+idx+"/64", "dev", d.Name(), "nodad")
}

func waitPing(t *testing.T, ns *testNS, addr string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err := exec.Command("ip", "netns", "exec", ns.name, "ping", "-c", "1", "-W", "1", addr).CombinedOutput()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ping %s from %s: %v\n%s", addr, ns.name, err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// tcpThrough sends n random bytes from client to a listener in server at
// host (inside the tunnel) and checks that they arrive intact.
func tcpThrough(t *testing.T, server, client *testNS, host string, n int) {
	t.Helper()
	var ln net.Listener
	if err := inNetns(server.h, func() (err error) {
		ln, err = net.Listen("tcp", net.JoinHostPort(strings.Trim(host, "[]"), "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		h := sha256.New()
		io.Copy(h, c)
		got <- hex.EncodeToString(h.Sum(nil))
	}()
	data := make([]byte, n)
	rand.Read(data)
	want := sha256.Sum256(data)
	var c net.Conn
	if err := inNetns(client.h, func() (err error) {
		c, err = net.DialTimeout("tcp", net.JoinHostPort(strings.Trim(host, "[]"), fmt.Sprint(port)), 15*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(data); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if h := <-got; h != hex.EncodeToString(want[:]) {
		t.Fatalf("TCP %s -> %s:%d: data differs (%s)", client.name, host, port, h)
	}
}

// watchUnderlay counts every packet arriving on veth: WireGuard UDP to
// 51871, ARP and IPv6 neighbour discovery/MLD, and everything else.
func (ns *testNS) watchUnderlay(t *testing.T, veth string) {
	t.Helper()
	rules := fmt.Sprintf(`table netdev iwgtest {
	counter wg {}
	counter ctl {}
	counter other {}
	chain in {
		type filter hook ingress device %q priority 0;
		udp dport 51871 counter name wg accept
		ether type arp counter name ctl accept
		icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert, mld-listener-report, mld2-listener-report } counter name ctl accept
		counter name other
	}
}
`, veth)
	cmd := exec.Command("ip", "netns", "exec", ns.name, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s (nftables is in make deps): %v\n%s", ns.name, err, out)
	}
}

func (ns *testNS) counters(t *testing.T) map[string]int {
	t.Helper()
	out := ns.run(t, "nft", "-j", "list", "counters", "table", "netdev", "iwgtest")
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("nft json: %v\n%s", err, out)
	}
	res := map[string]int{}
	for _, o := range doc.Nftables {
		raw, ok := o["counter"]
		if !ok {
			continue
		}
		var c struct {
			Name    string `json:"name"`
			Packets int    `json:"packets"`
			Bytes   int    `json:"bytes"`
		}
		if err := json.Unmarshal(raw, &c); err != nil {
			t.Fatal(err)
		}
		res[c.Name] = c.Packets
		res[c.Name+"_bytes"] = c.Bytes
	}
	return res
}
