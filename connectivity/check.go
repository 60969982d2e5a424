package connectivity

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
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
	cleanup    []func(context.Context) error
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
// across clusters), the global service from every cluster, policy denials
// and encryption.
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
		r.Result, r.Detail = Skip, "no address family in common"
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
	for _, c := range k.t.clusters() {
		nodes := k.t.echoNodes(c)
		if len(nodes) == 0 {
			continue
		}
		from := k.t.echoOn(nodes[0].Name)[0]
		for _, vip := range k.t.VIPs {
			pr := newProbe(from.Name, netip.AddrPortFrom(vip, uint16(k.t.Port)))
			r := Result{Check: check, From: from.Name, To: pr.To.String()}
			got := map[string]int{}
			n := 0
			var lastErr error
			deadline := time.Now().Add(k.o.Timeout)
			// The backends are picked at random, so with a few backends
			// per cluster a cluster missing after dozens of requests is
			// not in the service (yet): go on until the timeout.
			for len(got) < len(want) && time.Now().Before(deadline) && k.ctx.Err() == nil {
				reply, err := k.fetch(pr, from, 2*time.Second)
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
			case n == 0:
				r.Result, r.Detail = Fail, fmt.Sprintf("no answer: %v", lastErr)
			case len(missing) > 0:
				r.Result = Fail
				r.Detail += "; no answer from " + strings.Join(missing, ", ")
			default:
				r.Result = Pass
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
		if d.Role != RoleDenied {
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
		targets, names = append(targets, netip.AddrPortFrom(tgt.addr(false), EchoPort)), append(names, tgt.Name)
		for _, c := range k.t.clusters() {
			if c != d.Cluster {
				if rn := k.t.echoNodes(c); len(rn) > 0 {
					p := k.t.echoOn(rn[0].Name)[0]
					targets, names = append(targets, netip.AddrPortFrom(p.addr(false), EchoPort)), append(names, p.Name)
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
		r := Result{Check: check, From: d.Name, To: strings.Join(names, ", ")}
		// Precondition: an admitted pod gets answers from the same targets.
		var pre error
		for _, a := range targets {
			if !a.Addr().IsValid() {
				continue
			}
			pr := newProbe(admitted.Name, a)
			err := k.eventually(func() error { _, err := k.fetch(pr, admitted, 2*time.Second); return err })
			r.Evidence.Probes = append(r.Evidence.Probes, *pr)
			if err != nil {
				pre = fmt.Errorf("%s does not answer the admitted pod %s either (%v): the denial would prove nothing", a, admitted.Name, err)
				break
			}
		}
		if pre != nil {
			r.Result, r.Detail = Fail, pre.Error()
			k.add(r)
			continue
		}
		// All targets at once: each gets the full deny timeout.
		outcomes := make([]string, len(targets))
		probes := make([]*Probe, len(targets))
		var answered []string
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i, a := range targets {
			if !a.Addr().IsValid() {
				continue
			}
			probes[i] = newProbe(d.Name, a)
			wg.Go(func() {
				reply, err := k.fetch(probes[i], d, k.o.DenyTimeout)
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
		for _, pr := range probes {
			if pr != nil {
				r.Evidence.Probes = append(r.Evidence.Probes, *pr)
			}
		}
		if len(answered) > 0 {
			sort.Strings(answered)
			r.Result, r.Detail = Fail, "not denied: "+strings.Join(answered, "; ")
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
			r.Result, r.Detail = Pass, fmt.Sprintf("no answer (%s after %v); %s is admitted", strings.Join(parts, ", "), k.o.DenyTimeout, admitted.Name)
		}
		k.add(r)
	}
	if !found {
		k.add(Result{Check: check, Result: Skip, Detail: "no denied pod"})
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
