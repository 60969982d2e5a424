package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// The node's pod CIDRs. Every test runs its own node namespace, so tests
// may reuse them.
var (
	podCIDR4 = netip.MustParsePrefix("10.244.1.0/24")
	podCIDR6 = netip.MustParsePrefix("fd00:244:1::/64")
)

// testTimeout bounds one test; each is meant to take well under a minute.
const testTimeout = 2 * time.Minute

// node is one lab node running a real isthmus-agent, as every story starts.
type node struct {
	t     *testing.T
	ctx   context.Context
	lab   *lab.Lab
	node  *lab.Node
	agent *lab.Agent
}

// startNode creates a lab (removed when the test ends, also on failure), a
// node namespace, and starts isthmus-agent there with one IPv4 and one IPv6
// pod CIDR.
func startNode(t *testing.T) *node {
	t.Helper()
	l := labtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	ln, err := l.AddNode("node")
	if err != nil {
		t.Fatal(err)
	}
	step(t, "starting isthmus-agent on %s with pod CIDRs %s and %s", ln.NodeName(), podCIDR4, podCIDR6)
	a, err := ln.StartAgent(ctx, lab.AgentOptions{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6}})
	if err != nil {
		t.Fatal(err)
	}
	return &node{t: t, ctx: ctx, lab: l, node: ln, agent: a}
}

// step logs a line of the story.
func step(t *testing.T, format string, args ...any) {
	t.Helper()
	t.Logf("==> "+format, args...)
}

// isthmus runs the CLI against the node's agent and fails the test if it
// exits non-zero.
func (n *node) isthmus(args ...string) string {
	n.t.Helper()
	out, err := n.agent.CLI(n.ctx, args...)
	if err != nil {
		n.t.Fatal(err)
	}
	return string(out)
}

// isthmusFails runs the CLI, expects a non-zero exit and returns the output.
func (n *node) isthmusFails(args ...string) string {
	n.t.Helper()
	out, err := n.agent.CLI(n.ctx, args...)
	if err == nil {
		n.t.Fatalf("isthmus %s: succeeded, want an error; output:\n%s", strings.Join(args, " "), out)
	}
	if n.ctx.Err() != nil {
		n.t.Fatalf("isthmus %s: %v", strings.Join(args, " "), n.ctx.Err())
	}
	return string(out)
}

// writeFile writes content to a new file in the lab dir and returns its path.
func (n *node) writeFile(content string) string {
	n.t.Helper()
	f, err := os.CreateTemp(n.lab.Dir(), "input-*.yaml")
	if err == nil {
		_, err = f.WriteString(content)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		n.t.Fatal(err)
	}
	return f.Name()
}

// in returns n reporting to t (a subtest).
func (n *node) in(t *testing.T) *node {
	c := *n
	c.t = t
	return &c
}

// apply runs `isthmus apply -f` on the YAML and fails the test on error.
func (n *node) apply(yaml string) string {
	n.t.Helper()
	return n.isthmus("apply", "-f", n.writeFile(yaml))
}

// addPod creates a pod namespace and attaches it with `isthmus endpoint add`.
func (n *node) addPod(name string, labels map[string]string) *lab.Pod {
	n.t.Helper()
	p, err := n.agent.AddPod(n.ctx, name, "default", labels)
	if err != nil {
		n.t.Fatal(err)
	}
	if !p.IPv4.IsValid() || !p.IPv6.IsValid() {
		n.t.Fatalf("pod %s: want an IPv4 and an IPv6 address, got %v and %v", name, p.IPv4, p.IPv6)
	}
	if !podCIDR4.Contains(p.IPv4) || !podCIDR6.Contains(p.IPv6) {
		n.t.Fatalf("pod %s: addresses %s, %s outside the pod CIDRs %s, %s", name, p.IPv4, p.IPv6, podCIDR4, podCIDR6)
	}
	n.t.Logf("pod %s %v: %s %s", name, labels, p.IPv4, p.IPv6)
	return p
}

// status returns `isthmus status -o json`.
func (n *node) status() api.Status {
	n.t.Helper()
	out := n.isthmus("status", "-o", "json")
	var st api.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		n.t.Fatalf("isthmus status -o json: %v\n%s", err, out)
	}
	return st
}

// counter returns the packets the datapath counted for reason (for example
// "drop_policy_ingress").
func (n *node) counter(reason string) uint64 {
	n.t.Helper()
	for _, m := range n.status().Metrics {
		if m.Reason == reason {
			return m.Packets
		}
	}
	return 0
}

// endpoints returns `isthmus endpoint list -o json`.
func (n *node) endpoints() []api.Endpoint {
	n.t.Helper()
	out := n.isthmus("endpoint", "list", "-o", "json")
	var eps []api.Endpoint
	if err := json.Unmarshal([]byte(out), &eps); err != nil {
		n.t.Fatalf("isthmus endpoint list -o json: %v\n%s", err, out)
	}
	return eps
}

// snapshot is what the CLI shows of the agent's state, in every format
// without timestamps that move by themselves.
type snapshot map[string]string

var snapshotCommands = [][]string{
	{"get", "services"}, {"get", "services", "-o", "json"},
	{"get", "policies"}, {"get", "policies", "-o", "json"},
	{"endpoint", "list"}, {"endpoint", "list", "-o", "json"},
	{"identity", "list"}, {"identity", "list", "-o", "json"},
}

func (n *node) snapshot() snapshot {
	n.t.Helper()
	// The reads are independent: run them side by side, which matters on a
	// loaded machine where every CLI start is slow.
	outs := make([][]byte, len(snapshotCommands))
	errs := make([]error, len(snapshotCommands))
	var wg sync.WaitGroup
	for i, args := range snapshotCommands {
		wg.Go(func() { outs[i], errs[i] = n.agent.CLI(n.ctx, args...) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		n.t.Fatal(err)
	}
	s := snapshot{}
	for i, args := range snapshotCommands {
		s[strings.Join(args, " ")] = string(outs[i])
	}
	// How long an endpoint's add took is known to the agent that added
	// it only (not persisted): a restarted agent does not report it.
	const epJSON = "endpoint list -o json"
	var eps []map[string]any
	if err := json.Unmarshal([]byte(s[epJSON]), &eps); err == nil {
		for _, e := range eps {
			delete(e, "addDuration")
		}
		b, _ := json.MarshalIndent(eps, "", "  ")
		s[epJSON] = string(b)
	}
	st := n.status()
	s[datapathKey] = fmt.Sprintf("endpoints %d, services %d, policies %d, identities %d; in the datapath: %d frontends, %d policy entries, %d ipcache entries\n",
		st.Endpoints, st.Services, st.NetworkPolicies, st.Identities, st.Frontends, st.PolicyEntries, st.IPCacheEntries)
	return s
}

// datapathKey holds the counts of `isthmus status` in a snapshot.
const datapathKey = "status (counts)"

// checkUnchanged fails t if the CLI shows anything different from before.
func (n *node) checkUnchanged(t *testing.T, before snapshot) {
	t.Helper()
	now := n.in(t).snapshot()
	for _, k := range slices.Sorted(maps.Keys(before)) {
		if now[k] != before[k] {
			t.Errorf("`isthmus %s` changed:\n--- before\n%s--- after\n%s", k, before[k], now[k])
		}
	}
}
