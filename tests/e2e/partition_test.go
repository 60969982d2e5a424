package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// A node cut off from its cluster's etcd (iptables drops its traffic to the
// server) for longer than its lease TTL and the server's identity GC grace:
// its client pod's identity is collected and, while the node is still cut
// off, a client pod on the other node allocates app=client anew. After the
// heal the cut-off node moves its pod to the new identity, without a
// restart, and the policy that admits app=client into the server on the
// other node lets it in again. While cut off, the node's API reads answer
// at once.
func TestPartitionIdentityMoves(t *testing.T) {
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	step(t, "building cluster c1 (2 nodes): lease TTL 2s, identity GC every 1s with a 2s grace")
	c, err := l.AddCluster(ctx, 1, lab.ClusterOptions{
		LeaseTTL:   2 * time.Second,
		ServerArgs: []string{"--identity-gc-interval", "1s", "--identity-gc-grace", "2s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	cut, other := c.Agents[0], c.Agents[1]
	m := &mesh{t: t, ctx: ctx, lab: l, c1: c}
	client := m.pod(cut, "client", map[string]string{"app": "client"})
	stranger := m.pod(cut, "stranger", map[string]string{"app": "stranger"})
	server := m.pod(other, "server", map[string]string{"app": "server"})
	serveTCP(t, server.Netns, 8080, echo)
	m.apply(other, serverPolicy)
	dst := netip.AddrPortFrom(server.IPv4, 8080)
	if err := eventually(20*time.Second, func() error { return tcpEcho(client.Netns, dst) }); err != nil {
		t.Fatalf("client -> server across nodes before the partition: %v", err)
	}
	if err := connectTimesOut(stranger.Netns, dst, deniedDial); err != nil {
		t.Fatalf("the policy must deny app=stranger: %v", err)
	}
	oldID := endpointIdentity(t, m, cut, "client")
	pid := cut.Proc.Pid()

	step(t, "cutting %s off from the server (identity %d on its client)", cut.Node.Name(), oldID)
	srv, err := url.Parse(strings.Split(c.ServerAddr(), ",")[0])
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(srv.Host)
	rules := [][]string{
		{"OUTPUT", "-p", "tcp", "-d", host, "--dport", port, "-j", "DROP"},
		{"INPUT", "-p", "tcp", "-s", host, "--sport", port, "-j", "DROP"},
	}
	iptables := func(op string) {
		for _, r := range rules {
			if out, err := cut.Node.Exec(ctx, append([]string{"iptables", op}, r...)...); err != nil {
				t.Fatalf("iptables %s %v: %v %s", op, r, err, out)
			}
		}
	}
	iptables("-A")
	healed := false
	t.Cleanup(func() {
		if !healed {
			iptables("-D")
		}
	})
	partitioned := time.Now()

	// The reads of the cut-off node answer at once (from memory).
	for _, args := range [][]string{{"status"}, {"endpoint", "list"}, {"get", "policies"}, {"identity", "list"}} {
		start := time.Now()
		if _, err := cut.CLI(ctx, args...); err != nil {
			t.Errorf("isthmus %s while cut off: %v", strings.Join(args, " "), err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("isthmus %s took %s while cut off; want < 1s", strings.Join(args, " "), d.Round(time.Millisecond))
		}
	}

	master := records.IdentityIDKey(oldID)
	if err := eventually(60*time.Second, func() error {
		out, err := etcdctl(ctx, c, "get", master, "--keys-only")
		if err != nil {
			return err
		}
		if strings.Contains(out, master) {
			return fmt.Errorf("identity %d not collected yet", oldID)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	step(t, "identity %d collected after %s; another client pod on %s allocates app=client anew", oldID, time.Since(partitioned).Round(100*time.Millisecond), other.Node.Name())
	client2 := m.pod(other, "client2", map[string]string{"app": "client"})
	newID := endpointIdentity(t, m, other, "client2")
	if newID == oldID {
		t.Fatalf("app=client got its old ID %d again", oldID)
	}
	if err := eventually(10*time.Second, func() error { return tcpEcho(client2.Netns, dst) }); err != nil {
		t.Fatalf("client2 -> server: %v", err)
	}

	step(t, "healing the partition after %s", time.Since(partitioned).Round(100*time.Millisecond))
	iptables("-D")
	healed = true
	heal := time.Now()
	if err := eventually(60*time.Second, func() error {
		if err := tcpEcho(client.Netns, dst); err != nil {
			return fmt.Errorf("client -> server: %w", err)
		}
		if id := endpointIdentity(t, m, cut, "client"); id != newID {
			return fmt.Errorf("client on %s has identity %d, want %d", cut.Node.Name(), id, newID)
		}
		return nil
	}); err != nil {
		t.Fatalf("after the heal: %v\n%s", err, tail(cut.Proc.Log(), 3000))
	}
	t.Logf("client moved from identity %d to %d and reaches the server %s after the heal",
		oldID, newID, time.Since(heal).Round(100*time.Millisecond))
	if cut.Proc.Pid() != pid || cut.Proc.Exited() {
		t.Fatal("the agent restarted")
	}
	if err := connectTimesOut(stranger.Netns, dst, deniedDial); err != nil {
		t.Fatalf("the policy must still deny app=stranger: %v", err)
	}
}

// endpointIdentity is the identity of endpoint name (namespace default) on
// agent a.
func endpointIdentity(t *testing.T, m *mesh, a *lab.Agent, name string) uint32 {
	t.Helper()
	var eps []api.Endpoint
	out := m.cli(a, "endpoint", "list", "-o", "json")
	if err := json.Unmarshal([]byte(out), &eps); err != nil {
		t.Fatalf("endpoint list -o json: %v: %s", err, out)
	}
	for _, e := range eps {
		if e.Namespace == "default" && e.Name == name {
			return e.Identity
		}
	}
	t.Fatalf("no endpoint %s on %s: %s", name, a.Node.Name(), out)
	return 0
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
