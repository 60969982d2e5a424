package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/lab"
)

// `isthmus connectivity test` checks a mesh end to end with real TCP
// connections between pods (HTTP to echo servers that name the pod, node and
// cluster that answered):
//
//   - pod to pod on one node, across nodes, across clusters (IPv4 and IPv6);
//   - the global service from every cluster: backends of every cluster answer;
//   - a pod the policy does not admit is really denied (after the same
//     targets answered an admitted pod);
//   - with WireGuard, a capture on a node's underlay interface during
//     cross-node traffic sees WireGuard UDP and no packet with a pod address.
//
// Targets: by default the lab of `isthmus lab up` (its echo pods, denied
// pods, global service and policy, read from the lab state file). With
// --agent SOCKET (repeated) it works against any agents on this host: it
// creates its own pods (network namespaces plumbed with the agent API, echo
// servers inside this process), a global service and a policy in a
// namespace of their own, and removes all of it when done.

// ctNode is one agent of the target mesh.
type ctNode struct {
	Name    string
	Cluster string
	Socket  string
	Netns   string       // path of the node's network namespace (for the capture)
	IPs     []netip.Addr // underlay addresses
	Status  api.Status
}

// ctPod is one endpoint the checks use.
type ctPod struct {
	Name    string // also what its echo server answers with
	Cluster string
	Node    string
	Netns   string // path
	IPs     []netip.Addr
	Role    string // lab.RoleEcho or lab.RoleDenied
}

func (p ctPod) addr(v6 bool) netip.Addr {
	for _, a := range p.IPs {
		if a.Is6() == v6 {
			return a
		}
	}
	return netip.Addr{}
}

// ctTarget is what the checks run against.
type ctTarget struct {
	Name       string
	Nodes      []ctNode
	Pods       []ctPod
	VIPs       []netip.Addr
	Port       int    // service port
	Encryption string // "wireguard": required; "" or "none": checked where agents report WireGuard
	cleanup    []func(context.Context) error
}

// Results of one check.
const (
	resultPass = "PASS"
	resultFail = "FAIL"
	resultSkip = "SKIP"
)

type checkResult struct {
	Check  string `json:"check"`
	From   string `json:"from,omitempty"`
	To     string `json:"to,omitempty"`
	Result string `json:"result"`
	Detail string `json:"detail"`
}

type connectivityReport struct {
	Target  string        `json:"target"`
	Results []checkResult `json:"results"`
	Passed  int           `json:"passed"`
	Failed  int           `json:"failed"`
	Skipped int           `json:"skipped"`
}

type connectivityOptions struct {
	agents      []string
	namespace   string
	vips        []string
	timeout     time.Duration // how long a connection that must work may take to start working
	denyTimeout time.Duration // how long a denied connection is given to answer
	format      string
}

func (c *cli) connectivityCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "connectivity",
		Short: "Check pod, service, policy and encryption connectivity end to end",
	}
	cmd.AddCommand(c.connectivityTestCommand())
	return cmd
}

func (c *cli) connectivityTestCommand() *cobra.Command {
	o := connectivityOptions{}
	cmd := &cobra.Command{
		Use:   "test [--agent SOCKET ...]",
		Short: "Run real traffic through the mesh and check every path; non-zero exit on a failure",
		Long: `Run real TCP (HTTP) connections through the mesh and check:

  pod to pod on one node, across nodes, across clusters (IPv4 and IPv6)
  the global service from every cluster: backends of every cluster answer
    (requests until every cluster answered, at most for --timeout)
  a pod the policy does not admit is denied (the same targets answer an admitted pod)
  with WireGuard: on a node's underlay interface, cross-node traffic shows
    WireGuard UDP and no packet with a pod address in the clear

Without --agent it checks the lab of 'isthmus lab up' (read from its state
file, ` + lab.DefaultStateFile + ` or $` + lab.EnvStateFile + `). With --agent it checks the
agents behind the given sockets (on this host, as root): it creates two echo
pods per node and one denied pod per cluster (network namespaces
isthmus-ct-*), a global Service "echo" and a NetworkPolicy in --namespace,
and removes all of them afterwards (also on Ctrl-C).`,
		Example: `  isthmus connectivity test
  isthmus connectivity test -o json
  isthmus connectivity test --agent /var/run/isthmus/n1.sock --agent /var/run/isthmus/n2.sock`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkFormat(o.format); err != nil {
				return err
			}
			logf := func(format string, args ...any) { fmt.Fprintf(cmd.ErrOrStderr(), format+"\n", args...) }
			rep, err := c.runConnectivity(cmd.Context(), o, logf)
			if err != nil {
				return err
			}
			if o.format != formatTable {
				if err := printData(c.out, o.format, rep); err != nil {
					return err
				}
			} else if err := printReport(c.out, rep); err != nil {
				return err
			}
			if rep.Failed > 0 {
				return fmt.Errorf("connectivity test: %d of %d checks failed", rep.Failed, len(rep.Results))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&o.agents, "agent", nil, "API socket of an agent to test (repeat or comma-separate); default: the lab of 'isthmus lab up'")
	f.StringVar(&o.namespace, "namespace", "isthmus-connectivity", "with --agent: namespace of the test's pods, service and policy")
	f.StringSliceVar(&o.vips, "service-vip", []string{"10.96.255.100", "fd00:96::ff:100"}, "with --agent: VIPs of the test's global service (at most one per family)")
	f.DurationVar(&o.timeout, "timeout", 30*time.Second, "how long a connection that must work may take to start working")
	f.DurationVar(&o.denyTimeout, "deny-timeout", 2*time.Second, "how long a connection that must be denied is given to answer")
	addOutputFlag(cmd, &o.format)
	return cmd
}

// runConnectivity picks the target, runs the checks and removes what it
// created.
func (c *cli) runConnectivity(ctx context.Context, o connectivityOptions, logf func(string, ...any)) (connectivityReport, error) {
	var t *ctTarget
	var err error
	if len(o.agents) > 0 {
		t, err = newAgentsTarget(ctx, o, logf)
	} else {
		var st *lab.State
		st, err = lab.ReadState(lab.StateFile())
		if errors.Is(err, os.ErrNotExist) {
			return connectivityReport{}, fmt.Errorf("no lab is up (no %s) and no --agent given: run 'isthmus lab up', or name the agents with --agent SOCKET", lab.StateFile())
		}
		if err == nil {
			t, err = newLabTarget(ctx, st)
		}
	}
	if t != nil {
		defer func() {
			// Also after Ctrl-C: the cleanup gets a fresh context.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			for i := len(t.cleanup) - 1; i >= 0; i-- {
				if cerr := t.cleanup[i](cctx); cerr != nil {
					logf("cleanup: %v", cerr)
				}
			}
		}()
	}
	if err != nil {
		return connectivityReport{}, err
	}
	logf("connectivity test of %s: %d nodes, %d pods", t.Name, len(t.Nodes), len(t.Pods))
	return runChecks(ctx, t, o), nil
}

// newLabTarget describes the lab of `isthmus lab up`.
func newLabTarget(ctx context.Context, st *lab.State) (*ctTarget, error) {
	if !st.Ready {
		return nil, fmt.Errorf("lab %s is still being built (or its 'lab up' died: 'isthmus lab down' removes it)", st.Prefix)
	}
	t := &ctTarget{Name: "lab " + st.Prefix, VIPs: st.Service.VIPs, Port: st.Service.Port, Encryption: st.Encryption}
	for _, n := range st.Nodes() {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		s, err := api.NewClient(n.Socket).Status(cctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("agent of %s: %w", n.Name, err)
		}
		t.Nodes = append(t.Nodes, ctNode{Name: n.Name, Cluster: n.Cluster, Socket: n.Socket, Netns: lab.NetnsPath(n.Netns), IPs: n.IPs, Status: s})
	}
	for _, p := range st.Pods {
		t.Pods = append(t.Pods, ctPod{Name: p.Name, Cluster: p.Cluster, Node: p.Node, Netns: lab.NetnsPath(p.Netns), IPs: p.Addrs(), Role: p.Role})
	}
	return t, nil
}

const ctObjects = `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata: {name: echo-from-echo, namespace: %[1]s}
spec:
  endpointSelector: {matchLabels: {app: isthmus-connectivity, role: echo}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: isthmus-connectivity, role: echo}}]
      toPorts: [{port: %[2]d, protocol: TCP}]
---
apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: echo
  namespace: %[1]s
  annotations: {isthmus.io/global: "true", isthmus.io/affinity: none}
spec:
  vips: [%[3]s]
  ports: [{port: 80, targetPort: %[2]d, protocol: TCP}]
  selector: {app: isthmus-connectivity, role: echo}
`

// newAgentsTarget creates the test's own pods, service and policy on the
// given agents. Every step registers its undo in t.cleanup first.
func newAgentsTarget(ctx context.Context, o connectivityOptions, logf func(string, ...any)) (*ctTarget, error) {
	t := &ctTarget{Name: fmt.Sprintf("%d agents", len(o.agents)), Port: 80}
	var quoted []string
	for _, v := range o.vips {
		a, err := netip.ParseAddr(strings.TrimSpace(v))
		if err != nil {
			return nil, fmt.Errorf("--service-vip %q: %w", v, err)
		}
		t.VIPs = append(t.VIPs, a)
		quoted = append(quoted, `"`+a.String()+`"`)
	}
	for _, sock := range o.agents {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		s, err := api.NewClient(sock).Status(cctx)
		cancel()
		if err != nil {
			return nil, err
		}
		n := ctNode{Name: s.Node, Cluster: s.Cluster, Socket: sock, Status: s}
		if s.ClusterMesh != nil {
			n.IPs = s.ClusterMesh.NodeIPs
		}
		// The agent runs in the node's namespace: the socket's peer is it.
		if pid, err := socketPeerPid(sock); err == nil {
			n.Netns = fmt.Sprintf("/proc/%d/ns/net", pid)
		}
		t.Nodes = append(t.Nodes, n)
	}

	// Objects first, so the pods are enforced from their first packet: once
	// per cluster in cluster mode (apply is cluster-wide), on every
	// standalone agent.
	yaml := fmt.Appendf(nil, ctObjects, o.namespace, lab.EchoPort, strings.Join(quoted, ", "))
	applied := map[string]bool{}
	for _, n := range t.Nodes {
		key := "standalone " + n.Socket
		if n.Status.ClusterMesh != nil {
			key = "cluster " + n.Cluster
		}
		if applied[key] {
			continue
		}
		applied[key] = true
		client := api.NewClient(n.Socket)
		t.cleanup = append(t.cleanup, func(ctx context.Context) error {
			return errors.Join(
				ignoreNotFound(client.DeleteObject(ctx, "Service", o.namespace, "echo")),
				ignoreNotFound(client.DeleteObject(ctx, "NetworkPolicy", o.namespace, "echo-from-echo")))
		})
		cctx, cancel := context.WithTimeout(ctx, requestTimeout)
		_, err := client.Apply(cctx, yaml)
		cancel()
		if err != nil {
			return t, fmt.Errorf("apply the test's service and policy on %s: %w", n.Name, err)
		}
	}

	run := randomSuffix(4)
	serveCtx, stopServers := context.WithCancel(context.WithoutCancel(ctx))
	t.cleanup = append(t.cleanup, func(context.Context) error { stopServers(); return nil })
	denied := map[string]bool{}
	for i, n := range t.Nodes {
		specs := []string{lab.RoleEcho, lab.RoleEcho}
		if !denied[n.Cluster] {
			denied[n.Cluster] = true
			specs = append(specs, lab.RoleDenied)
		}
		for k, role := range specs {
			name := fmt.Sprintf("ct-%s-n%d-%s%d", run, i+1, role, k+1)
			if role == lab.RoleDenied {
				name = fmt.Sprintf("ct-%s-n%d-%s", run, i+1, role)
			}
			nsName := "isthmus-" + name
			nsPath := lab.NetnsPath(nsName)
			if out, err := exec.CommandContext(ctx, "ip", "netns", "add", nsName).CombinedOutput(); err != nil {
				return t, fmt.Errorf("ip netns add %s: %v: %s", nsName, err, strings.TrimSpace(string(out)))
			}
			t.cleanup = append(t.cleanup, func(ctx context.Context) error {
				if out, err := exec.CommandContext(ctx, "ip", "netns", "del", nsName).CombinedOutput(); err != nil {
					return fmt.Errorf("ip netns del %s: %v: %s", nsName, err, strings.TrimSpace(string(out)))
				}
				return nil
			})
			if role == lab.RoleEcho {
				// Listening before the pod has an address: the wildcard
				// socket picks eth0 up when the agent creates it.
				ln, err := listenIn(nsPath, fmt.Sprintf(":%d", lab.EchoPort))
				if err != nil {
					return t, err
				}
				go serveEcho(serveCtx, ln, name, n.Name, n.Cluster)
			}
			client := api.NewClient(n.Socket)
			t.cleanup = append(t.cleanup, func(ctx context.Context) error {
				return ignoreNotFound(client.DeleteEndpoint(ctx, o.namespace, name))
			})
			cctx, cancel := context.WithTimeout(ctx, requestTimeout)
			ep, err := client.AddEndpoint(cctx, api.EndpointRequest{Name: name, Namespace: o.namespace, Netns: nsPath,
				Labels: map[string]string{"app": "isthmus-connectivity", "role": role}})
			cancel()
			if err != nil {
				return t, fmt.Errorf("endpoint add %s on %s: %w", name, n.Name, err)
			}
			t.Pods = append(t.Pods, ctPod{Name: name, Cluster: n.Cluster, Node: n.Name, Netns: nsPath, IPs: ep.IPs, Role: role})
		}
	}
	logf("created %d test pods in namespace %s, Service %s/echo (%s) and NetworkPolicy %s/echo-from-echo", len(t.Pods), o.namespace, o.namespace, strings.Join(o.vips, ", "), o.namespace)
	return t, nil
}

func ignoreNotFound(err error) error {
	if api.IsNotFound(err) {
		return nil
	}
	return err
}

func randomSuffix(n int) string {
	const alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
	b := make([]byte, n)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// socketPeerPid returns the pid of the process serving a unix socket.
func socketPeerPid(path string) (int, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd)
	if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		return 0, err
	}
	cred, err := syscall.GetsockoptUcred(fd, syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	if err != nil {
		return 0, err
	}
	return int(cred.Pid), nil
}

// checker runs the checks of one report.
type checker struct {
	ctx context.Context
	t   *ctTarget
	o   connectivityOptions
	rep connectivityReport
}

func (k *checker) add(r checkResult) {
	switch r.Result {
	case resultPass:
		k.rep.Passed++
	case resultFail:
		k.rep.Failed++
	default:
		k.rep.Skipped++
	}
	k.rep.Results = append(k.rep.Results, r)
}

func runChecks(ctx context.Context, t *ctTarget, o connectivityOptions) connectivityReport {
	k := &checker{ctx: ctx, t: t, o: o, rep: connectivityReport{Target: t.Name}}
	k.podToPod()
	k.globalService()
	k.denied()
	k.encryption()
	return k.rep
}

// clusters returns the cluster names in the order of the nodes.
func (t *ctTarget) clusters() []string {
	var out []string
	for _, n := range t.Nodes {
		if !slices.Contains(out, n.Cluster) {
			out = append(out, n.Cluster)
		}
	}
	return out
}

// echoOn returns the echo pods of a node.
func (t *ctTarget) echoOn(node string) []ctPod {
	var out []ctPod
	for _, p := range t.Pods {
		if p.Node == node && p.Role == lab.RoleEcho {
			out = append(out, p)
		}
	}
	return out
}

// echoNodes returns the nodes of a cluster that have echo pods.
func (t *ctTarget) echoNodes(cluster string) []ctNode {
	var out []ctNode
	for _, n := range t.Nodes {
		if n.Cluster == cluster && len(t.echoOn(n.Name)) > 0 {
			out = append(out, n)
		}
	}
	return out
}

func (t *ctTarget) node(name string) (ctNode, bool) {
	for _, n := range t.Nodes {
		if n.Name == name {
			return n, true
		}
	}
	return ctNode{}, false
}

func (k *checker) podToPod() {
	var same, across, clusters []checkResult
	for _, n := range k.t.Nodes {
		if pods := k.t.echoOn(n.Name); len(pods) >= 2 {
			same = append(same, k.reach("pod to pod, same node", pods[0], pods[1]))
		}
	}
	cls := k.t.clusters()
	for _, c := range cls {
		nodes := k.t.echoNodes(c)
		if len(nodes) < 2 {
			continue
		}
		// A ring: every node sends to the next (with two nodes, both ways).
		for i, n := range nodes {
			to := k.t.echoOn(nodes[(i+1)%len(nodes)].Name)
			across = append(across, k.reach("pod to pod, across nodes", k.t.echoOn(n.Name)[0], to[len(to)-1]))
		}
	}
	for i, a := range cls {
		for j, b := range cls {
			if i == j {
				continue
			}
			an, bn := k.t.echoNodes(a), k.t.echoNodes(b)
			if len(an) == 0 || len(bn) == 0 {
				continue
			}
			// Vary the nodes so that every node takes part.
			from := k.t.echoOn(an[j%len(an)].Name)[0]
			to := k.t.echoOn(bn[i%len(bn)].Name)[0]
			clusters = append(clusters, k.reach("pod to pod, across clusters", from, to))
		}
	}
	for _, group := range []struct {
		rs   []checkResult
		name string
		why  string
	}{
		{same, "pod to pod, same node", "no node has two echo pods"},
		{across, "pod to pod, across nodes", "no cluster has two nodes with echo pods"},
		{clusters, "pod to pod, across clusters", "only one cluster"},
	} {
		if len(group.rs) == 0 {
			k.add(checkResult{Check: group.name, Result: resultSkip, Detail: group.why})
		}
		for _, r := range group.rs {
			k.add(r)
		}
	}
}

// reach checks that from reaches to's echo server over every family both
// have, retrying for o.timeout (the mesh may still be propagating).
func (k *checker) reach(check string, from, to ctPod) checkResult {
	r := checkResult{Check: check, From: from.Name, To: to.Name}
	var ok []string
	for _, v6 := range []bool{false, true} {
		src, dst := from.addr(v6), to.addr(v6)
		if !src.IsValid() || !dst.IsValid() {
			continue
		}
		addr := netip.AddrPortFrom(dst, lab.EchoPort)
		var reply echoReply
		err := k.eventually(func() error {
			var err error
			reply, err = fetchEcho(k.ctx, from.Netns, addr, 2*time.Second)
			if err == nil && reply.Pod != to.Name {
				err = fmt.Errorf("%s answered, not %s", reply.Pod, to.Name)
			}
			return err
		})
		if err != nil {
			r.Result, r.Detail = resultFail, fmt.Sprintf("%s: %v", addr, err)
			return r
		}
		ok = append(ok, familyName(v6))
	}
	if len(ok) == 0 {
		r.Result, r.Detail = resultSkip, "no address family in common"
		return r
	}
	r.Result, r.Detail = resultPass, fmt.Sprintf("%s answered over %s", to.Name, strings.Join(ok, " and "))
	return r
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// eventually retries fn until it succeeds or o.timeout has passed.
func (k *checker) eventually(fn func() error) error {
	deadline := time.Now().Add(k.o.timeout)
	for {
		err := fn()
		if err == nil || time.Now().After(deadline) || k.ctx.Err() != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// globalService: from one echo pod of every cluster, requests to the VIP
// until backends of every cluster have answered.
func (k *checker) globalService() {
	const check = "global service from every cluster"
	if len(k.t.VIPs) == 0 {
		k.add(checkResult{Check: check, Result: resultSkip, Detail: "no service to test"})
		return
	}
	want := map[string]bool{}
	for _, p := range k.t.Pods {
		if p.Role == lab.RoleEcho {
			want[p.Cluster] = true
		}
	}
	for _, c := range k.t.clusters() {
		nodes := k.t.echoNodes(c)
		if len(nodes) == 0 {
			continue
		}
		from := k.t.echoOn(nodes[0].Name)[0]
		for _, vip := range k.t.VIPs {
			addr := netip.AddrPortFrom(vip, uint16(k.t.Port))
			r := checkResult{Check: check, From: from.Name, To: addr.String()}
			got := map[string]int{}
			n := 0
			var lastErr error
			deadline := time.Now().Add(k.o.timeout)
			// The backends are picked at random, so with a few backends
			// per cluster a cluster missing after dozens of requests is
			// not in the service (yet): go on until the timeout.
			for len(got) < len(want) && time.Now().Before(deadline) && k.ctx.Err() == nil {
				reply, err := fetchEcho(k.ctx, from.Netns, addr, 2*time.Second)
				if err != nil {
					lastErr = err
					time.Sleep(200 * time.Millisecond)
					continue
				}
				n++
				got[reply.Cluster]++
			}
			var parts []string
			for _, cl := range slices.Sorted(maps.Keys(got)) {
				parts = append(parts, fmt.Sprintf("%s (%d)", cl, got[cl]))
			}
			var missing []string
			for _, cl := range slices.Sorted(maps.Keys(want)) {
				if got[cl] == 0 {
					missing = append(missing, cl)
				}
			}
			r.Detail = fmt.Sprintf("%d requests answered by %s", n, strings.Join(parts, ", "))
			switch {
			case n == 0:
				r.Result, r.Detail = resultFail, fmt.Sprintf("no answer: %v", lastErr)
			case len(missing) > 0:
				r.Result = resultFail
				r.Detail += "; no answer from " + strings.Join(missing, ", ")
			default:
				r.Result = resultPass
			}
			k.add(r)
		}
	}
}

// denied: every denied pod tries an echo pod of its own cluster, one of
// another cluster and the service; none may answer. The targets must answer
// an admitted pod of the same cluster first, or the denial proves nothing.
func (k *checker) denied() {
	const check = "policy denies"
	found := false
	for _, d := range k.t.Pods {
		if d.Role != lab.RoleDenied {
			continue
		}
		found = true
		nodes := k.t.echoNodes(d.Cluster)
		if len(nodes) == 0 {
			continue
		}
		admitted := k.t.echoOn(nodes[0].Name)[0]
		var targets []netip.AddrPort
		var names []string
		// An echo pod of the own cluster, on another node where there is one.
		local := k.t.echoOn(nodes[len(nodes)-1].Name)
		tgt := local[len(local)-1]
		targets, names = append(targets, netip.AddrPortFrom(tgt.addr(false), lab.EchoPort)), append(names, tgt.Name)
		for _, c := range k.t.clusters() {
			if c != d.Cluster {
				if rn := k.t.echoNodes(c); len(rn) > 0 {
					p := k.t.echoOn(rn[0].Name)[0]
					targets, names = append(targets, netip.AddrPortFrom(p.addr(false), lab.EchoPort)), append(names, p.Name)
					break
				}
			}
		}
		for _, v := range k.t.VIPs {
			if v.Is4() {
				a := netip.AddrPortFrom(v, uint16(k.t.Port))
				targets, names = append(targets, a), append(names, "service "+a.String())
			}
		}
		r := checkResult{Check: check, From: d.Name, To: strings.Join(names, ", ")}
		// Precondition: an admitted pod gets answers from the same targets.
		var pre error
		for _, a := range targets {
			if !a.Addr().IsValid() {
				continue
			}
			if err := k.eventually(func() error { _, err := fetchEcho(k.ctx, admitted.Netns, a, 2*time.Second); return err }); err != nil {
				pre = fmt.Errorf("%s does not answer the admitted pod %s either (%v): the denial would prove nothing", a, admitted.Name, err)
				break
			}
		}
		if pre != nil {
			r.Result, r.Detail = resultFail, pre.Error()
			k.add(r)
			continue
		}
		// All targets at once: each gets the full deny timeout.
		outcomes := make([]string, len(targets))
		var answered []string
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i, a := range targets {
			if !a.Addr().IsValid() {
				continue
			}
			wg.Go(func() {
				reply, err := fetchEcho(k.ctx, d.Netns, a, k.o.denyTimeout)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					answered = append(answered, fmt.Sprintf("%s answered (%s)", a, reply))
				case errors.Is(err, syscall.ECONNREFUSED):
					outcomes[i] = "refused"
				default:
					outcomes[i] = "timed out"
				}
			})
		}
		wg.Wait()
		if len(answered) > 0 {
			sort.Strings(answered)
			r.Result, r.Detail = resultFail, "not denied: "+strings.Join(answered, "; ")
		} else {
			counts := map[string]int{}
			for _, oc := range outcomes {
				if oc != "" {
					counts[oc]++
				}
			}
			var parts []string
			for _, oc := range slices.Sorted(maps.Keys(counts)) {
				parts = append(parts, fmt.Sprintf("%d %s", counts[oc], oc))
			}
			r.Result, r.Detail = resultPass, fmt.Sprintf("no answer (%s after %v); %s is admitted", strings.Join(parts, ", "), k.o.denyTimeout, admitted.Name)
		}
		k.add(r)
	}
	if !found {
		k.add(checkResult{Check: check, Result: resultSkip, Detail: "no denied pod"})
	}
}

// encryption: on the underlay interface of one node per cluster, capture
// while that node's pod talks to pods on other nodes (own cluster and
// another): WireGuard UDP must appear, no packet with a pod address.
func (k *checker) encryption() {
	const check = "encryption (WireGuard)"
	on := k.t.Encryption == "wireguard"
	ports := map[uint16]bool{}
	var without []string
	for _, n := range k.t.Nodes {
		if wg := n.Status.WireGuard; wg != nil {
			on = true
			ports[uint16(wg.ListenPort)] = true
		} else {
			without = append(without, n.Name)
		}
	}
	if !on {
		k.add(checkResult{Check: check, Result: resultSkip, Detail: "encryption is off"})
		return
	}
	if len(without) > 0 {
		k.add(checkResult{Check: check, Result: resultFail, Detail: "no WireGuard device on " + strings.Join(without, ", ")})
		return
	}
	watched := map[netip.Addr]bool{}
	for _, p := range k.t.Pods {
		for _, a := range p.IPs {
			watched[a] = true
		}
	}
	for _, v := range k.t.VIPs {
		watched[v] = true
	}
	var portList []string
	for _, p := range slices.Sorted(maps.Keys(ports)) {
		portList = append(portList, fmt.Sprint(p))
	}
	udp := "udp/" + strings.Join(portList, ",")
	did := false
	for _, c := range k.t.clusters() {
		nodes := k.t.echoNodes(c)
		if len(nodes) == 0 {
			continue
		}
		n := nodes[0]
		from := k.t.echoOn(n.Name)[0]
		var targets []ctPod
		if len(nodes) > 1 {
			targets = append(targets, k.t.echoOn(nodes[1].Name)[0])
		}
		for _, oc := range k.t.clusters() {
			if oc != c {
				if rn := k.t.echoNodes(oc); len(rn) > 0 {
					targets = append(targets, k.t.echoOn(rn[0].Name)[0])
					break
				}
			}
		}
		if len(targets) == 0 {
			continue
		}
		did = true
		var names []string
		for _, p := range targets {
			names = append(names, p.Name)
		}
		r := checkResult{Check: check, From: from.Name, To: strings.Join(names, ", ")}
		if n.Netns == "" || len(n.IPs) == 0 {
			r.Result, r.Detail = resultFail, fmt.Sprintf("cannot find the network namespace or underlay address of %s", n.Name)
			k.add(r)
			continue
		}
		capt, err := startCapture(n.Netns, n.IPs, watched, ports)
		if err != nil {
			r.Result, r.Detail = resultFail, fmt.Sprintf("capture on %s: %v", n.Name, err)
			k.add(r)
			continue
		}
		sent, failed := 0, 0
		for _, p := range targets {
			for _, a := range p.IPs {
				for range 5 {
					if _, err := fetchEcho(k.ctx, from.Netns, netip.AddrPortFrom(a, lab.EchoPort), 2*time.Second); err != nil {
						failed++
					}
					sent++
				}
			}
		}
		res, err := capt.stopCapture()
		switch {
		case err != nil:
			r.Result, r.Detail = resultFail, fmt.Sprintf("capture on %s: %v", n.Name, err)
		case res.Plaintext > 0:
			r.Result, r.Detail = resultFail, fmt.Sprintf("on %s/%s: %d packets with a pod address in the clear (first: %s)", n.Name, res.Interface, res.Plaintext, res.FirstLeak)
		case res.WireGuard == 0:
			r.Result, r.Detail = resultFail, fmt.Sprintf("on %s/%s: no WireGuard packet (%s) among %d", n.Name, res.Interface, udp, res.Total)
		case failed > 0:
			r.Result, r.Detail = resultFail, fmt.Sprintf("%d of %d requests failed during the capture", failed, sent)
		default:
			r.Result, r.Detail = resultPass, fmt.Sprintf("on %s/%s during %d requests: %d WireGuard packets (%s), 0 of %d packets with a pod address in the clear",
				n.Name, res.Interface, sent, res.WireGuard, udp, res.Total)
		}
		k.add(r)
	}
	if !did {
		k.add(checkResult{Check: check, Result: resultSkip, Detail: "no cross-node traffic possible (one node)"})
	}
}

// printReport writes the results as a table and a summary line.
func printReport(w io.Writer, rep connectivityReport) error {
	t := newTable(w)
	fmt.Fprintln(t, "CHECK\tFROM\tTO\tRESULT\tDETAIL")
	for _, r := range rep.Results {
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\n", r.Check, orDash(r.From), orDash(r.To), r.Result, r.Detail)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\n%s: %d passed, %d failed, %d skipped\n", rep.Target, rep.Passed, rep.Failed, rep.Skipped)
	return err
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
