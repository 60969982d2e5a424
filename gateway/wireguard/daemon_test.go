package wireguard

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	nip "net/netip"

	"github.com/vishvananda/netns"
)

// TestDaemonDeviceOutlivesTheAgent: with ModeUserspaceDaemon the device is
// the daemon's (ServeUserspace); the agent's Close leaves it, its peers and
// their session running (a ping needs no new handshake), a new Open adopts
// it with its peers, and only the daemon's end removes it. Without a daemon,
// Open fails clearly once AdoptWait passes.
func TestDaemonDeviceOutlivesTheAgent(t *testing.T) {
	requireRoot(t)
	if err := kernelWireGuard(t); err == nil {
		t.Skip("the kernel creates WireGuard devices here: ModeUserspaceDaemon uses a kernel device, no daemon")
	}
	id := randomID(t)
	a := addNetns(t, "iwg"+id+"-a")
	b := addNetns(t, "iwg"+id+"-b")
	vethA, vethB := "iwg"+id+"va", "iwg"+id+"vb"
	mustRun(t, "ip", "link", "add", vethA, "netns", a.name, "type", "veth", "peer", "name", vethB, "netns", b.name)
	a.run(t, "ip", "addr", "add", "192.0.2.1/24", "dev", vethA)
	b.run(t, "ip", "addr", "add", "192.0.2.2/24", "dev", vethB)
	a.run(t, "ip", "link", "set", vethA, "up")
	b.run(t, "ip", "link", "set", vethB, "up")

	nameA := "iwg" + id + "a"
	ctx, stopDaemon := context.WithCancel(context.Background())
	daemonDone := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := netns.Set(a.h); err != nil {
			daemonDone <- err
			return
		}
		daemonDone <- ServeUserspace(ctx, nameA, testLogger())
	}()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		stopDaemon()
		return <-daemonDone
	}
	t.Cleanup(func() { _ = stop() })

	dir := t.TempDir()
	cfgA := Config{Name: nameA, KeyFile: filepath.Join(dir, "a", "wg.key"), Logger: testLogger(), Mode: ModeUserspaceDaemon, AdoptWait: 10 * time.Second}
	cfgB := Config{Name: "iwg" + id + "b", KeyFile: filepath.Join(dir, "b", "wg.key"), Logger: testLogger(), Mode: ModeUserspace}
	devA := openIn(t, nil, a, cfgA)
	devB := openIn(t, nil, b, cfgB)
	if !devA.External() || devA.Mode() != ModeUserspace || devB.External() {
		t.Fatalf("A: mode %s external %v; B external %v", devA.Mode(), devA.External(), devB.External())
	}
	peerA := Peer{PublicKey: devA.PublicKey(), Endpoint: nip.MustParseAddrPort("192.0.2.1:51871"), AllowedIPs: pfx("100.64.0.1/32")}
	peerB := Peer{PublicKey: devB.PublicKey(), Endpoint: nip.MustParseAddrPort("192.0.2.2:51871"), AllowedIPs: pfx("100.64.0.2/32")}
	mustSync(t, devA, peerB)
	mustSync(t, devB, peerA)
	a.run(t, "ip", "addr", "add", "100.64.0.1/24", "dev", nameA)
	b.run(t, "ip", "addr", "add", "100.64.0.2/24", "dev", devB.Name())
	waitPing(t, a, "100.64.0.2")

	// The agent stops (or restarts): the tunnel keeps working.
	if err := devA.Close(); err != nil {
		t.Fatal(err)
	}
	if out := a.run(t, "ip", "-o", "link", "show", nameA); !strings.Contains(out, ",UP") {
		t.Fatalf("after the agent's Close the daemon's device is not up: %s", out)
	}
	if out, err := exec.Command("ip", "netns", "exec", a.name, "ping", "-c", "3", "-i", "0.2", "-W", "1", "100.64.0.2").CombinedOutput(); err != nil {
		t.Fatalf("no ping through the tunnel while the agent is down: %v\n%s", err, out)
	}

	// The next agent adopts it, peers and all.
	devA2 := openIn(t, nil, a, cfgA)
	st, err := devA2.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Peers) != 1 || st.Peers[0].PublicKey != devB.PublicKey() || st.Peers[0].LastHandshake.IsZero() {
		t.Fatalf("the adopted device's peers: %+v", st.Peers)
	}
	if devA2.PublicKey() != devA.PublicKey() {
		t.Errorf("key changed across the restart: %s -> %s", devA.PublicKey(), devA2.PublicKey())
	}
	mustSync(t, devA2, peerB)
	waitPing(t, a, "100.64.0.2")

	// Negative: the daemon's end takes the device and the tunnel with it.
	if err := devA2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatalf("daemon: %v", err)
	}
	if out, err := exec.Command("ip", "netns", "exec", a.name, "ip", "link", "show", nameA).CombinedOutput(); err == nil {
		t.Errorf("device %s still there after the daemon stopped: %s", nameA, out)
	}
	if out, err := exec.Command("ip", "netns", "exec", a.name, "ping", "-c", "1", "-W", "1", "100.64.0.2").CombinedOutput(); err == nil {
		t.Errorf("ping through a tunnel whose daemon is gone: %s", out)
	}

	// No daemon at all: a clear error once AdoptWait passes.
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(a.h); err != nil {
			ch <- err
			return
		}
		d, err := Open(Config{Name: "iwg" + id + "c", KeyFile: filepath.Join(dir, "c", "wg.key"), Logger: testLogger(), Mode: ModeUserspaceDaemon, AdoptWait: 300 * time.Millisecond})
		if err == nil {
			d.Close()
			err = errors.New("opened without a daemon")
		}
		ch <- err
	}()
	if err := <-ch; err == nil || !strings.Contains(err.Error(), "no WireGuard daemon serves") {
		t.Errorf("Open without a daemon: %v", err)
	}
}
