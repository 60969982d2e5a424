package connectivity

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// Node is one agent of the target mesh.
type Node struct {
	Name    string
	Cluster string
	Socket  string
	Netns   string       // path of the node's network namespace (for the capture)
	IPs     []netip.Addr // underlay addresses
	Status  api.Status
}

// Pod is one endpoint the checks use.
type Pod struct {
	Name    string // also what its echo server answers with
	Cluster string
	Node    string
	Netns   string // path
	IPs     []netip.Addr
	Role    string // RoleEcho or RoleDenied
}

func (p Pod) addr(v6 bool) netip.Addr {
	for _, a := range p.IPs {
		if a.Is6() == v6 {
			return a
		}
	}
	return netip.Addr{}
}

// Target is what the checks run against: the lab of `isthmus lab up`
// (lab.State.ConnectivityTarget) or the test's own pods on any agents
// (NewAgentsTarget).
type Target struct {
	Name       string
	Nodes      []Node
	Pods       []Pod
	VIPs       []netip.Addr
	Port       int    // service port
	Encryption string // "wireguard": required; "" or "none": checked where agents report WireGuard
	// Outside are hosts outside the mesh that dial the service's external
	// addresses (none: the north-south check is left out).
	Outside []OutsideClient
	// Hosts are external workloads running the echo server (none: the
	// pod <-> host checks are left out).
	Hosts   []Host
	cleanup []func(context.Context) error
}

// Cleanup removes what the target created for the test (pods, echo
// servers, service, policy), newest first; it tries every step.
func (t *Target) Cleanup(ctx context.Context) error {
	var errs []error
	for i := len(t.cleanup) - 1; i >= 0; i-- {
		if err := t.cleanup[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	t.cleanup = nil
	return errors.Join(errs...)
}

// Verdicts of one check.
const (
	Pass = "PASS"
	Fail = "FAIL"
	Skip = "SKIP"
)

// Result is the verdict of one check and the evidence it rests on.
type Result struct {
	Check    string   `json:"check"`
	From     string   `json:"from,omitempty"`
	To       string   `json:"to,omitempty"`
	Result   string   `json:"result"`
	Detail   string   `json:"detail"`
	Evidence Evidence `json:"evidence"`
}

// Report is the outcome of Run.
type Report struct {
	Target  string   `json:"target"`
	Results []Result `json:"results"`
	Passed  int      `json:"passed"`
	Failed  int      `json:"failed"`
	Skipped int      `json:"skipped"`
}

// Options tune Run.
type Options struct {
	// Timeout is how long a connection that must work may take to start
	// working (default 30s).
	Timeout time.Duration
	// DenyTimeout is how long a connection that must be denied is given to
	// answer (default 2s).
	DenyTimeout time.Duration
}

// checker runs the checks of one report.
type checker struct {
	ctx context.Context
	t   *Target
	o   Options
	rep Report
}

func (k *checker) add(r Result) {
	switch r.Result {
	case Pass:
		k.rep.Passed++
	case Fail:
		k.rep.Failed++
	default:
		k.rep.Skipped++
	}
	k.rep.Results = append(k.rep.Results, r)
}

// Run runs every check against t: pod to pod (same node, across nodes,
// across clusters), the global service from every cluster, the service
// from outside the mesh (when the target has outside clients), policy
// denials and encryption.
func Run(ctx context.Context, t *Target, o Options) Report {
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	if o.DenyTimeout == 0 {
		o.DenyTimeout = 2 * time.Second
	}
	k := &checker{ctx: ctx, t: t, o: o, rep: Report{Target: t.Name, Results: []Result{}}}
	k.podToPod()
	k.globalService()
	k.northSouth()
	k.hosts()
	k.denied()
	k.encryption()
	return k.rep
}

// clusters returns the cluster names in the order of the nodes.
func (t *Target) clusters() []string {
	var out []string
	for _, n := range t.Nodes {
		if !slices.Contains(out, n.Cluster) {
			out = append(out, n.Cluster)
		}
	}
	return out
}

// echoOn returns the echo pods of a node.
func (t *Target) echoOn(node string) []Pod {
	var out []Pod
	for _, p := range t.Pods {
		if p.Node == node && p.Role == RoleEcho {
			out = append(out, p)
		}
	}
	return out
}

// echoNodes returns the nodes of a cluster that have echo pods.
func (t *Target) echoNodes(cluster string) []Node {
	var out []Node
	for _, n := range t.Nodes {
		if n.Cluster == cluster && len(t.echoOn(n.Name)) > 0 {
			out = append(out, n)
		}
	}
	return out
}

func (k *checker) podToPod() {
	var same, across, clusters []Result
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
		rs   []Result
		name string
		why  string
	}{
		{same, "pod to pod, same node", "no node has two echo pods"},
		{across, "pod to pod, across nodes", "no cluster has two nodes with echo pods"},
		{clusters, "pod to pod, across clusters", "only one cluster"},
	} {
		if len(group.rs) == 0 {
			k.add(Result{Check: group.name, Result: Skip, Detail: group.why})
		}
		for _, r := range group.rs {
			k.add(r)
		}
	}
}

// fetch sends one request from a pod and records it, and what answered,
// in the probe.
func (k *checker) fetch(pr *Probe, from Pod, timeout time.Duration) (Reply, error) {
	reply, err := FetchEcho(k.ctx, from.Netns, pr.To, timeout)
	pr.record(reply, err)
	return reply, err
}

// reach checks that from reaches to's echo server over every family both
// have, retrying for o.Timeout (the mesh may still be propagating).
func (k *checker) reach(check string, from, to Pod) Result {
	r := Result{Check: check, From: from.Name, To: to.Name}
	var ok []string
	for _, v6 := range []bool{false, true} {
		src, dst := from.addr(v6), to.addr(v6)
		if !src.IsValid() || !dst.IsValid() {
			continue
		}
		pr := newProbe(from.Name, netip.AddrPortFrom(dst, EchoPort))
		err := k.eventually(func() error {
			reply, err := k.fetch(pr, from, 2*time.Second)
			if err == nil && reply.Pod != to.Name {
				err = fmt.Errorf("%s answered, not %s", reply.Pod, to.Name)
			}
			return err
		})
		r.Evidence.Probes = append(r.Evidence.Probes, *pr)
		if err != nil {
			r.Result, r.Detail = Fail, fmt.Sprintf("%s: %v", pr.To, err)
			return r
		}
		ok = append(ok, familyName(v6))
	}
	if len(ok) == 0 {
		// Nothing was checked: not a pass.
		r.Result, r.Detail = Fail, fmt.Sprintf("no address family in common (%s %v, %s %v): nothing to check", from.Name, from.IPs, to.Name, to.IPs)
		return r
	}
	r.Result, r.Detail = Pass, fmt.Sprintf("%s answered over %s", to.Name, strings.Join(ok, " and "))
	return r
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// eventually retries fn until it succeeds or o.Timeout has passed.
func (k *checker) eventually(fn func() error) error {
	deadline := time.Now().Add(k.o.Timeout)
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
		k.add(Result{Check: check, Result: Skip, Detail: "no service to test"})
		return
	}
	want := map[string]bool{}
	for _, p := range k.t.Pods {
		if p.Role == RoleEcho {
			want[p.Cluster] = true
		}
	}
	if len(want) == 0 {
		k.add(Result{Check: check, Result: Fail, Detail: "no echo pod: no backend to expect and no pod to send from"})
		return
	}
	for _, c := range k.t.clusters() {
		nodes := k.t.echoNodes(c)
		if len(nodes) == 0 {
			continue
		}
		from := k.t.echoOn(nodes[0].Name)[0]
		for _, vip := range k.t.VIPs {
			k.add(k.spread(check, from.Name, from.Netns, netip.AddrPortFrom(vip, uint16(k.t.Port)), want))
		}
	}
}

// spread sends requests from the namespace at nsPath (named from) to addr
// until backends of every cluster in want have answered, or the timeout.
func (k *checker) spread(check, from, nsPath string, addr netip.AddrPort, want map[string]bool) Result {
	pr := newProbe(from, addr)
	r := Result{Check: check, From: from, To: pr.To.String()}
	got := map[string]int{}
	n := 0
	var lastErr error
	deadline := time.Now().Add(k.o.Timeout)
	// The backends are picked at random, so with a few backends per
	// cluster a cluster missing after dozens of requests is not in the
	// service (yet): go on until the timeout.
	for len(got) < len(want) && time.Now().Before(deadline) && k.ctx.Err() == nil {
		if pr.Sent >= 50 {
			// 50 answers from one cluster make another one's backends
			// unlikely (2^-49 with two clusters): slow down rather than
			// use up the client's ports.
			time.Sleep(20 * time.Millisecond)
		}
		reply, err := FetchEcho(k.ctx, nsPath, addr, 2*time.Second)
		pr.record(reply, err)
		if err != nil {
			lastErr = err
			time.Sleep(200 * time.Millisecond)
			continue
		}
		n++
		got[reply.Cluster]++
	}
	r.Evidence.Probes = []Probe{*pr}
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
	case n == 0 && lastErr == nil:
		r.Result, r.Detail = Fail, "no request sent"
	case n == 0:
		r.Result, r.Detail = Fail, fmt.Sprintf("no answer: %v", lastErr)
	case len(missing) > 0:
		r.Result = Fail
		r.Detail += "; no answer from " + strings.Join(missing, ", ")
	default:
		r.Result = Pass
	}
	return r
}

// denied: every denied pod tries, over every family it has, an echo pod
// of its own cluster (on another node where there is one), one of another
// cluster and the service VIPs: every connection attempt must time out,
// which is how the datapath denies (it drops). Anything else fails the
// check: an answer, but also a refusal, an unreachable route or any other
// error, which the policy does not cause. Two preconditions come first,
// or the denial would prove nothing: the same targets answer an admitted
// pod of the same cluster, and the denied pod's own network works over
// the same family and protocol (proveNetwork).
func (k *checker) denied() {
	const check = "policy denies"
	found := false
	for _, d := range k.t.Pods {
		if d.Role != RoleDenied {
			continue
		}
		found = true
		k.add(k.deny(check, d))
	}
	if !found {
		k.add(Result{Check: check, Result: Skip, Detail: "no denied pod"})
	}
}

// denyTarget is one address a denied pod must not reach; pod is the echo
// pod behind it ("" for a VIP).
type denyTarget struct {
	addr netip.AddrPort
	pod  string
}

// denyTargets returns what d must not reach, over the families d has, and
// the admitted pod of d's cluster that the targets must answer.
func (t *Target) denyTargets(d Pod) (admitted Pod, targets []denyTarget, families []bool, err error) {
	nodes := t.echoNodes(d.Cluster)
	if len(nodes) == 0 {
		return Pod{}, nil, nil, fmt.Errorf("no echo pod in cluster %s: nothing to deny and no admitted pod to compare with", d.Cluster)
	}
	admitted = t.echoOn(nodes[0].Name)[0]
	// An echo pod of the own cluster, on another node where there is one,
	// and one of another cluster.
	local := t.echoOn(nodes[len(nodes)-1].Name)
	pods := []Pod{local[len(local)-1]}
	for _, c := range t.clusters() {
		if c != d.Cluster {
			if rn := t.echoNodes(c); len(rn) > 0 {
				pods = append(pods, t.echoOn(rn[0].Name)[0])
				break
			}
		}
	}
	for _, v6 := range []bool{false, true} {
		if !d.addr(v6).IsValid() {
			continue
		}
		n := len(targets)
		for _, p := range pods {
			if a := p.addr(v6); a.IsValid() {
				targets = append(targets, denyTarget{netip.AddrPortFrom(a, EchoPort), p.Name})
			}
		}
		for _, v := range t.VIPs {
			if v.Is6() == v6 {
				targets = append(targets, denyTarget{addr: netip.AddrPortFrom(v, uint16(t.Port))})
			}
		}
		if len(targets) > n {
			families = append(families, v6)
		}
	}
	if len(targets) == 0 {
		return admitted, nil, nil, fmt.Errorf("nothing to deny: no echo pod or VIP shares an address family with %s (%v)", d.Name, d.IPs)
	}
	return admitted, targets, families, nil
}

// Denial judges what one request of a denied pod got: only a connection
// attempt that timed out (OutcomeTimedOut) is a denial by the policy. An
// answer is no denial; a refusal, an unreachable route, a connection that
// was established but did not answer, or any other error (e.g. the pod's
// namespace could not be entered) is not the policy's doing and proves
// nothing: why says which.
func Denial(reply Reply, err error) (denied bool, why string) {
	if err == nil {
		return false, "answered (" + reply.String() + ")"
	}
	oc := Outcome(err)
	if oc == OutcomeTimedOut {
		return true, oc
	}
	return false, fmt.Sprintf("%s (%v)", oc, err)
}

func (k *checker) deny(check string, d Pod) Result {
	r := Result{Check: check, From: d.Name}
	admitted, targets, families, err := k.t.denyTargets(d)
	if err != nil {
		r.Result, r.Detail = Fail, err.Error()
		return r
	}
	var names []string
	for _, tg := range targets {
		if tg.pod != "" && !slices.Contains(names, tg.pod) {
			names = append(names, tg.pod)
		}
	}
	var vips []string
	for _, tg := range targets {
		if tg.pod == "" {
			vips = append(vips, tg.addr.String())
		}
	}
	if len(vips) > 0 {
		names = append(names, "service "+strings.Join(vips, ", "))
	}
	r.To = strings.Join(names, ", ")
	var fams []string
	for _, v6 := range families {
		fams = append(fams, familyName(v6))
	}

	// Precondition: an admitted pod gets answers from the same targets.
	for _, tg := range targets {
		pr := newProbe(admitted.Name, tg.addr)
		pr.Purpose = PurposeAdmitted
		err := k.eventually(func() error {
			reply, err := k.fetch(pr, admitted, 2*time.Second)
			if err == nil && tg.pod != "" && reply.Pod != tg.pod {
				err = fmt.Errorf("%s answered, not %s", reply.Pod, tg.pod)
			}
			return err
		})
		r.Evidence.Probes = append(r.Evidence.Probes, *pr)
		if err != nil {
			r.Result, r.Detail = Fail, fmt.Sprintf("%s does not answer the admitted pod %s either (%v): the denial would prove nothing", tg.addr, admitted.Name, err)
			return r
		}
	}
	// Precondition: the denied pod's own network works, per family.
	var proofs []string // "c1-denied reaches c2-denied over IPv4 and IPv6"
	proven := map[string][]string{}
	for _, v6 := range families {
		pr, who, err := k.proveNetwork(d, admitted, v6)
		r.Evidence.Probes = append(r.Evidence.Probes, pr)
		if err != nil {
			r.Result, r.Detail = Fail, fmt.Sprintf("the network of %s is not proven over %s: %s failed (%v): the denial would prove nothing", d.Name, familyName(v6), who, err)
			return r
		}
		if proven[who] == nil {
			proofs = append(proofs, who)
		}
		proven[who] = append(proven[who], familyName(v6))
	}
	for i, who := range proofs {
		proofs[i] = who + " over " + strings.Join(proven[who], " and ")
	}

	// All targets at once: each gets the full deny timeout.
	probes := make([]*Probe, len(targets))
	whys := make([]string, len(targets))
	var wg sync.WaitGroup
	for i, tg := range targets {
		probes[i] = newProbe(d.Name, tg.addr)
		probes[i].Purpose = PurposeDeny
		wg.Go(func() {
			reply, err := k.fetch(probes[i], d, k.o.DenyTimeout)
			if denied, why := Denial(reply, err); !denied {
				whys[i] = fmt.Sprintf("%s %s", tg.addr, why)
			}
		})
	}
	wg.Wait()
	var answered, other []string
	for i, pr := range probes {
		r.Evidence.Probes = append(r.Evidence.Probes, *pr)
		switch {
		case whys[i] == "":
		case len(pr.Answers) > 0:
			answered = append(answered, whys[i])
		default:
			other = append(other, whys[i])
		}
	}
	switch {
	case len(answered) > 0:
		r.Result, r.Detail = Fail, "not denied: "+strings.Join(slices.Concat(answered, other), "; ")
	case len(other) > 0:
		r.Result, r.Detail = Fail, "not a policy drop (only a connection attempt that times out is): "+strings.Join(other, "; ")
	default:
		r.Result, r.Detail = Pass, fmt.Sprintf("all %d connection attempts timed out after %v (%s); the targets answer %s; %s",
			len(targets), k.o.DenyTimeout, strings.Join(fams, " and "), admitted.Name, strings.Join(proofs, ", "))
	}
	return r
}

// proveNetwork proves that the denied pod d has a working network over
// one family, with the protocol of the denial (TCP): d reaches another
// denied pod (whose ingress no policy selects), of another cluster where
// there is one; without one, the admitted pod reaches d's own echo server.
// who names the proof ("c1-denied reaches c2-denied").
func (k *checker) proveNetwork(d, admitted Pod, v6 bool) (pr Probe, who string, err error) {
	var peer Pod
	for _, p := range k.t.Pods {
		if p.Role == RoleDenied && p.Name != d.Name && p.addr(v6).IsValid() &&
			(peer.Name == "" || peer.Cluster == d.Cluster && p.Cluster != d.Cluster) {
			peer = p
		}
	}
	from, to := d, peer
	if peer.Name == "" {
		from, to = admitted, d
	}
	who = fmt.Sprintf("%s reaches %s", from.Name, to.Name)
	p := newProbe(from.Name, netip.AddrPortFrom(to.addr(v6), EchoPort))
	p.Purpose = PurposeOwnNetwork
	err = k.eventually(func() error {
		reply, err := k.fetch(p, from, 2*time.Second)
		if err == nil && reply.Pod != to.Name {
			err = fmt.Errorf("%s answered, not %s", reply.Pod, to.Name)
		}
		return err
	})
	return *p, who, err
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
		k.add(Result{Check: check, Result: Skip, Detail: "encryption is off"})
		return
	}
	if len(without) > 0 {
		k.add(Result{Check: check, Result: Fail, Detail: "no WireGuard device on " + strings.Join(without, ", ")})
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
		var targets []Pod
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
		r := Result{Check: check, From: from.Name, To: strings.Join(names, ", ")}
		if n.Netns == "" || len(n.IPs) == 0 {
			r.Result, r.Detail = Fail, fmt.Sprintf("cannot find the network namespace or underlay address of %s", n.Name)
			k.add(r)
			continue
		}
		capt, err := startCapture(n.Netns, n.IPs, watched, ports)
		if err != nil {
			r.Result, r.Detail = Fail, fmt.Sprintf("capture on %s: %v", n.Name, err)
			k.add(r)
			continue
		}
		sent, failed := 0, 0
		for _, p := range targets {
			for _, a := range p.IPs {
				pr := newProbe(from.Name, netip.AddrPortFrom(a, EchoPort))
				for range 5 {
					if _, err := k.fetch(pr, from, 2*time.Second); err != nil {
						failed++
					}
					sent++
				}
				r.Evidence.Probes = append(r.Evidence.Probes, *pr)
			}
		}
		res, err := capt.stopCapture()
		res.Node = n.Name
		r.Evidence.Capture = &res
		switch {
		case err != nil:
			r.Result, r.Detail = Fail, fmt.Sprintf("capture on %s: %v", n.Name, err)
		case res.Plaintext > 0:
			r.Result, r.Detail = Fail, fmt.Sprintf("on %s/%s: %d packets with a pod address in the clear (first: %s)", n.Name, res.Interface, res.Plaintext, res.FirstLeak)
		case sent == 0:
			r.Result, r.Detail = Fail, "no address to send to: nothing crossed the capture"
		case res.WireGuard == 0:
			r.Result, r.Detail = Fail, fmt.Sprintf("on %s/%s: no WireGuard packet (%s) among %d", n.Name, res.Interface, udp, res.Total)
		case failed > 0:
			r.Result, r.Detail = Fail, fmt.Sprintf("%d of %d requests failed during the capture", failed, sent)
		default:
			r.Result, r.Detail = Pass, fmt.Sprintf("on %s/%s during %d requests: %d WireGuard packets (%s), 0 of %d packets with a pod address in the clear",
				n.Name, res.Interface, sent, res.WireGuard, udp, res.Total)
		}
		k.add(r)
	}
	if !did {
		k.add(Result{Check: check, Result: Skip, Detail: "no cross-node traffic possible (one node)"})
	}
}
