package e2e

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
)

// serverPolicy lets app=client reach app=server on tcp/8080, and nothing else
// reach app=server at all.
const serverPolicy = `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: server-from-client
spec:
  endpointSelector:
    matchLabels: {app: server}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: client}
      toPorts:
        - {port: 8080, protocol: TCP}
`

// enforceWithin is how long a policy or service change may take to show in
// the datapath after the CLI returns (the contract is one second).
const enforceWithin = 2 * time.Second

// deniedDial is the connect timeout that decides "dropped".
const deniedDial = time.Second

// A policy that lets app=client reach app=server on tcp/8080 and nothing
// else: the client gets in on 8080 and nowhere else, another pod not at all,
// the drops are counted, and deleting the policy opens the server again.
func TestPolicyAllowsOnlyClientToServer8080(t *testing.T) {
	n := startNode(t)
	client := n.addPod("client", map[string]string{"app": "client"})
	server := n.addPod("server", map[string]string{"app": "server"})
	other := n.addPod("other", map[string]string{"app": "other"})
	for _, port := range []int{8080, 9090} {
		serveTCP(t, server.Netns, port, echo)
	}
	serveUDPEcho(t, server.Netns, 8080)
	at := func(port uint16, v6 bool) netip.AddrPort { return netip.AddrPortFrom(server.Addr(v6), port) }

	step(t, "without a policy, everyone reaches the server on every port")
	for _, v6 := range []bool{false, true} {
		for _, c := range []struct {
			from *lab.Pod
			port uint16
		}{{client, 8080}, {client, 9090}, {other, 8080}} {
			if err := eventually(5*time.Second, func() error { return tcpEcho(c.from.Netns, at(c.port, v6)) }); err != nil {
				t.Fatalf("before any policy, %s -> server:%d (%s): %v", c.from.PodName, c.port, familyName(v6), err)
			}
		}
		// The same baseline for what the policy will drop: otherwise a
		// drop could be a path that never worked.
		if err := eventually(5*time.Second, func() error { return udpEcho(client.Netns, at(8080, v6)) }); err != nil {
			t.Fatalf("before any policy, client -> server udp/8080 (%s): %v", familyName(v6), err)
		}
		if err := eventually(5*time.Second, func() error { return ping(n.ctx, client.Netns, server.Addr(v6), 1) }); err != nil {
			t.Fatalf("before any policy, client -> server ping (%s): %v", familyName(v6), err)
		}
	}

	step(t, "apply NetworkPolicy server-from-client")
	n.apply(serverPolicy)
	applied := time.Now()
	if err := eventually(enforceWithin, func() error { return connectTimesOut(other.Netns, at(8080, false), 500*time.Millisecond) }); err != nil {
		t.Fatalf("other -> server:8080 still connects %v after apply: %v", time.Since(applied).Round(time.Millisecond), err)
	}

	drops := n.counter("drop_policy_ingress")
	for _, v6 := range []bool{false, true} {
		fam := familyName(v6)
		step(t, "%s: client -> server:8080 works", fam)
		if err := eventually(enforceWithin, func() error { return tcpEcho(client.Netns, at(8080, v6)) }); err != nil {
			t.Errorf("client -> server:8080 (%s) is allowed by the policy but failed: %v", fam, err)
		}
		step(t, "%s: client -> server:9090 is dropped", fam)
		if err := connectTimesOut(client.Netns, at(9090, v6), deniedDial); err != nil {
			t.Errorf("client -> server:9090 (%s): %v", fam, err)
		}
		step(t, "%s: other -> server:8080 is dropped", fam)
		if err := connectTimesOut(other.Netns, at(8080, v6), deniedDial); err != nil {
			t.Errorf("other -> server:8080 (%s): %v", fam, err)
		}
		step(t, "%s: client -> server udp/8080 and ping are dropped", fam)
		if err := udpTimesOut(client.Netns, at(8080, v6)); err != nil {
			t.Errorf("client -> server udp/8080 (%s), the policy allows only tcp/8080: %v", fam, err)
		}
		if err := pingTimesOut(n.ctx, client.Netns, server.Addr(v6)); err != nil {
			t.Errorf("client -> server ping (%s), the policy allows only tcp/8080: %v", fam, err)
		}
	}
	step(t, "the drops are counted")
	if after := n.counter("drop_policy_ingress"); after <= drops {
		t.Errorf("drop_policy_ingress did not rise over the denied attempts: %d before, %d after", drops, after)
	} else {
		t.Logf("drop_policy_ingress: %d -> %d", drops, after)
	}
	step(t, "the server's own traffic out is not restricted: server -> client works")
	serveTCP(t, client.Netns, 8081, echo)
	if err := tcpEcho(server.Netns, netip.AddrPortFrom(client.IPv4, 8081)); err != nil {
		t.Errorf("server -> client:8081: %v", err)
	}

	step(t, "change the policy to tcp/9090: the client's ports flip")
	n.apply(strings.Replace(serverPolicy, "port: 8080", "port: 9090", 1))
	changed := time.Now()
	if err := eventually(enforceWithin, func() error { return tcpEcho(client.Netns, at(9090, false)) }); err != nil {
		t.Errorf("client -> server:9090 still fails %v after the policy allowed it: %v", time.Since(changed).Round(time.Millisecond), err)
	}
	if err := eventually(enforceWithin, func() error { return connectTimesOut(client.Netns, at(8080, false), 500*time.Millisecond) }); err != nil {
		t.Errorf("client -> server:8080 still connects %v after the policy stopped allowing it: %v", time.Since(changed).Round(time.Millisecond), err)
	}

	step(t, "delete the policy: other reaches the server again")
	n.isthmus("delete", "networkpolicy", "server-from-client")
	deleted := time.Now()
	for _, v6 := range []bool{false, true} {
		if err := eventually(enforceWithin, func() error { return tcpEcho(other.Netns, at(8080, v6)) }); err != nil {
			t.Errorf("other -> server:8080 (%s) still fails %v after the policy was deleted: %v", familyName(v6), time.Since(deleted).Round(time.Millisecond), err)
		}
	}
	if err := tcpEcho(client.Netns, at(9090, false)); err != nil {
		t.Errorf("client -> server:9090 after the policy was deleted: %v", err)
	}
}
