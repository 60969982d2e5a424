package main

// Section "service-backend": one standalone agent (no mesh) with
// -svc-services services of -svc-backends backends each, every backend a
// real endpoint (a pod namespace plumbed through the agent's API, as the
// CNI plugin does) selected by its service's label. -svc-endpoints
// endpoints back them: in groups of -svc-backends, each group selected by
// services/groups services (by default 1,000 endpoints, each the backend
// of 10 services: plumbing 10,000 pods one by one takes many minutes;
// -svc-endpoints 10000 gives every service endpoints of its own).
//
// Then endpoints churn: -svc-changes changes, one at a time, alternately
// deleting an endpoint (DELETE /v1/endpoints/...) and adding it again
// (POST /v1/endpoints, same pod namespace, a new address), each group in
// turn. Each change is timed from the start of its API call until the
// pinned BPF backends map of every service of its group reflects it (one
// backend fewer, or all of them again), polled every 100 µs.
//
// An add includes the pod's plumbing (a veth pair, the programs attached)
// before the agent's state changes; a delete changes the state first and
// removes the veth after the maps. Both are in the figure, and the info
// lines give each kind apart.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/lab"
)

var (
	svcCount      = flag.Int("svc-services", 1000, "service-backend: services")
	svcBackends   = flag.Int("svc-backends", 10, "service-backend: endpoints (backends) per service")
	svcEPs        = flag.Int("svc-endpoints", 1000, "service-backend: endpoints, in groups of -svc-backends that back services/groups services each")
	svcChanges    = flag.Int("svc-changes", 200, "service-backend: endpoint changes measured (half deletes, half adds)")
	svcProfile    = flag.String("svc-profile", "", "service-backend: write a CPU profile of the agent from the start of the churn to this file (go tool pprof)")
	svcProfileFor = flag.Duration("svc-profile-for", 15*time.Second, "service-backend: length of the -svc-profile profile")
)

// svcPodCIDR holds the section's pods: a /16, room for 65,000 endpoints.
var svcPodCIDR = netip.MustParsePrefix("10.64.0.0/16")

// svcVIP is the VIP of the i-th service of the section.
func svcVIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 98, byte(i / 250), byte(i%250 + 1)})
}

func serviceBackendBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	nSvc, nBe, nEP := *svcCount, *svcBackends, *svcEPs
	if nSvc < 1 || nSvc > 60_000 || nBe < 2 || nEP < nBe || nEP > 60_000 || nEP%nBe != 0 || nSvc%(nEP/nBe) != 0 || *svcChanges < 2 {
		return fmt.Errorf("-svc-services %d, -svc-backends %d, -svc-endpoints %d, -svc-changes %d: want 1..60000 services of 2 or more backends, endpoints a multiple of the backends, their groups dividing the services, 2 or more changes",
			nSvc, nBe, nEP, *svcChanges)
	}
	groups := nEP / nBe // service i and endpoint j are of group i%groups, j%groups
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	n, err := l.AddNode("svc")
	if err != nil {
		return err
	}
	a, err := n.StartAgent(ctx, lab.AgentOptions{PodCIDRs: []netip.Prefix{svcPodCIDR}})
	if err != nil {
		return err
	}
	cl := api.NewClient(a.Socket)
	svcs, err := bpf.OpenPinnedServices(n.PinDir())
	if err != nil {
		return err
	}
	defer svcs.Close()

	// 1. The endpoints, before the services (so that building them does
	// not resolve the services once per endpoint), from 4 workers: the
	// pod namespaces are made in parallel, the agent takes the adds one
	// after the other.
	type ep struct {
		name, netns string
		group       int
	}
	eps := make([]ep, nEP)
	t0 := time.Now()
	var next atomic.Int64
	var retried atomic.Int64 // endpoint adds that failed and were retried
	var failed atomic.Value
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for failed.Load() == nil && ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(eps) {
					return
				}
				e := ep{name: fmt.Sprintf("be-%d", i), group: i % groups}
				ns, err := l.AddPodNetns(e.name)
				if err == nil {
					e.netns = ns.Path()
					_, err = addEndpoint(ctx, cl, api.EndpointRequest{Name: e.name, Netns: e.netns, Labels: map[string]string{"app": groupLabel(e.group)}}, &retried)
				}
				if err != nil {
					failed.CompareAndSwap(nil, fmt.Errorf("endpoint %s: %w", e.name, err))
					return
				}
				eps[i] = e
				if i > 0 && i%2000 == 0 {
					progress("service-backend: %d endpoints in %s", i, time.Since(t0).Round(time.Second))
				}
			}
		})
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	podsTook := time.Since(t0)
	setupRetries := retried.Swap(0)

	// 2. The services, in applies of 500 (the API takes bodies up to 1 MiB).
	t0 = time.Now()
	for lo := 0; lo < nSvc; lo += 500 {
		var b strings.Builder
		for i := lo; i < min(lo+500, nSvc); i++ {
			b.WriteString(serviceYAML(fmt.Sprintf("svc-%d", i), svcVIP(i).String(), 80, groupLabel(i%groups)))
		}
		if _, err := cl.Apply(ctx, []byte(b.String())); err != nil {
			return fmt.Errorf("apply services %d..: %w", lo, err)
		}
	}
	applyTook := time.Since(t0)
	frontend := func(i int) bpf.Frontend { return bpf.Frontend{VIP: svcVIP(i), Port: 80, Proto: bpf.ProtoTCP} }
	for i := range nSvc {
		if bes, ok := svcs.Backends(frontend(i)); !ok || len(bes) != nBe {
			return fmt.Errorf("service %d: %d backends in the BPF map after the apply, want %d", i, len(bes), nBe)
		}
	}
	progress("service-backend: %d endpoints in %s, %d services applied in %s",
		len(eps), podsTook.Round(time.Millisecond), nSvc, applyTook.Round(time.Millisecond))
	// The frontends of each group's services.
	groupFrontends := make([][]bpf.Frontend, groups)
	for i := range nSvc {
		groupFrontends[i%groups] = append(groupFrontends[i%groups], frontend(i))
	}

	// 3. Churn: delete an endpoint of group k, then add it again; the
	// next pair goes to the next group (and the next of its endpoints),
	// so every change lands on services in their steady state.
	prof, err := startAgentProfile(ctx, a.Socket, *svcProfile)
	if err != nil {
		return err
	}
	before, err := readAgentCounters(ctx, a)
	if err != nil {
		return err
	}
	var all, dels, adds, calls []time.Duration
	for k := 0; k < *svcChanges/2; k++ {
		g := k % groups
		e := eps[g+groups*((k/groups)%nBe)]
		fs := groupFrontends[g]

		start := time.Now()
		call := startCall(func() error { return cl.DeleteEndpoint(ctx, "default", e.name) })
		d, err := pollBackends(ctx, svcs, fs, start, nBe-1, call)
		if err == nil {
			err = call.wait()
		}
		if err != nil {
			return fmt.Errorf("delete of %s: %w", e.name, err)
		}
		calls = append(calls, time.Since(start))
		dels, all = append(dels, d), append(all, d)

		start = time.Now()
		var added api.Endpoint
		call = startCall(func() (err error) {
			added, err = addEndpoint(ctx, cl, api.EndpointRequest{Name: e.name, Netns: e.netns, Labels: map[string]string{"app": groupLabel(g)}}, &retried)
			return err
		})
		d, err = pollBackends(ctx, svcs, fs, start, nBe, call)
		if err == nil {
			err = call.wait()
		}
		if err != nil {
			return fmt.Errorf("add of %s: %w", e.name, err)
		}
		calls = append(calls, time.Since(start))
		adds, all = append(adds, d), append(all, d)
		for _, f := range fs {
			bes, _ := svcs.Backends(f)
			if len(added.IPs) != 1 || !slices.ContainsFunc(bes, func(b bpf.Backend) bool { return b.Addr == added.IPs[0] }) {
				return fmt.Errorf("service %s: backends %v after adding %s with %v", f, bes, e.name, added.IPs)
			}
		}
	}
	after, err := readAgentCounters(ctx, a)
	if err != nil {
		return err
	}
	if err := prof.stop(); err != nil {
		return err
	}
	addsInOrder := slices.Clone(adds)
	for _, s := range [][]time.Duration{all, dels, adds, calls} {
		slices.Sort(s)
	}
	line("service-backend-update-p50", ms(pct(all, 50)), "ms",
		fmt.Sprintf("info: %d endpoint changes one at a time (half deletes, half adds) on %d services x %d backends (%d endpoints, each backing %d services), API call -> BPF backends map of them all",
			len(all), nSvc, nBe, nEP, nSvc/groups))
	line("service-backend-update-p99", ms(pct(all, 99)), "ms", "<= 10")
	line("service-backend-delete-p50", ms(pct(dels, 50)), "ms", fmt.Sprintf("info: deletes only; p99 %.2f ms", ms(pct(dels, 99))))
	line("service-backend-add-p50", ms(pct(adds, 50)), "ms", fmt.Sprintf("info: adds only (the pod's veth made first); p99 %.2f ms", ms(pct(adds, 99))))
	line("service-backend-api-call-p50", ms(pct(calls, 50)), "ms", fmt.Sprintf("info: the API calls until they answered; p99 %.2f ms", ms(pct(calls, 99))))
	perChange := func(sec float64) float64 { return 1000 * sec / float64(len(all)) }
	line("service-backend-agent-cpu", perChange(after.user-before.user+after.sys-before.sys), "ms/change",
		fmt.Sprintf("info: utime+stime of the agent per endpoint change of the churn, %.2f ms of it in user space (the rest the kernel's: veths, programs, maps, files); the machine's load inflates it less than the latencies",
			perChange(after.user-before.user)))
	// Where the adds' time went, from the phases the agent logs for each:
	// the plumbing (veth, programs attached) is the kernel's, the rest
	// the agent's (addresses, identity, store, the datapath run).
	if phases, err := addPhases(a.Proc.Log(), len(adds)); err == nil {
		plumb := make([]time.Duration, len(phases))
		dp := make([]time.Duration, len(phases))
		for i, ph := range phases {
			plumb[i], dp[i] = ph["veth"], ph["datapath"]
		}
		slices.Sort(plumb)
		slices.Sort(dp)
		line("service-backend-add-plumbing-p50", ms(pct(plumb, 50)), "ms",
			fmt.Sprintf("info: of each add, the veth made and the programs attached (kernel work before the agent's state changes); p99 %.2f ms", ms(pct(plumb, 99))))
		line("service-backend-add-datapath-p50", ms(pct(dp, 50)), "ms",
			fmt.Sprintf("info: of each add, the wait for the datapath loop to take it; p99 %.2f ms", ms(pct(dp, 99))))
		progress("service-backend: the adds' phases, p50/p99 ms: %s", phaseSummary(phases))
		// The slowest adds, phase by phase: what their tail is made of.
		order := make([]int, len(addsInOrder))
		for i := range order {
			order[i] = i
		}
		slices.SortFunc(order, func(a, b int) int { return int(addsInOrder[b] - addsInOrder[a]) })
		for _, i := range order[:min(3, len(order))] {
			progress("service-backend: an add of %.2f ms: %s", ms(addsInOrder[i]), phaseSummary(phases[i:i+1]))
		}
	} else {
		progress("service-backend: the adds' phases: %v", err)
	}
	for _, lp := range []struct{ name, metric string }{{"datapath", "isthmus_agent_reconcile"}, {"followup", "isthmus_agent_followup"}} {
		runs := after.loops[lp.metric+"_runs_total"] - before.loops[lp.metric+"_runs_total"]
		busy := after.loops[lp.metric+"_duration_seconds_sum"] - before.loops[lp.metric+"_duration_seconds_sum"]
		line("service-backend-"+lp.name+"-run", 1000*busy/max(runs, 1), "ms",
			fmt.Sprintf("info: mean length of a run of the agent's %s loop in the churn, %.2f runs per change", lp.name, runs/float64(len(all))))
	}
	line(fmt.Sprintf("service-backend-setup-%d", len(eps)), podsTook.Seconds(), "s",
		fmt.Sprintf("info: adding the endpoints (4 workers), then %s applying the %d services", applyTook.Round(time.Millisecond), nSvc))
	line("service-backend-add-retries", float64(setupRetries+retried.Load()), "adds",
		fmt.Sprintf("info: endpoint adds the agent refused and rolled back, then retried (%d while setting up, %d in the churn, timed from the first try)", setupRetries, retried.Load()))
	return nil
}

func groupLabel(g int) string { return fmt.Sprintf("g%d", g) }

// addEndpoint adds an endpoint, trying again (up to 5 times in all) when the
// agent refuses it: a reconcile fails when the kernel interrupts the
// agent's dump of the node's addresses (a pod's veth just got its
// link-local address), and the agent rolls the add back. retried counts
// the retries.
func addEndpoint(ctx context.Context, cl *api.Client, req api.EndpointRequest, retried *atomic.Int64) (api.Endpoint, error) {
	for attempt := 1; ; attempt++ {
		ep, err := cl.AddEndpoint(ctx, req)
		if err == nil || attempt == 5 || ctx.Err() != nil {
			return ep, err
		}
		retried.Add(1)
		time.Sleep(10 * time.Millisecond)
	}
}

// apiCall is an API call running in the background.
type apiCall struct {
	done chan struct{}
	err  error
}

func startCall(fn func() error) *apiCall {
	c := &apiCall{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		c.err = fn()
	}()
	return c
}

func (c *apiCall) wait() error {
	<-c.done
	return c.err
}

// pollBackends polls the backends of fs every 100 µs until each has want
// backends, and returns the time since start; it gives up when the API
// call failed, or after meshTimeout.
func pollBackends(ctx context.Context, svcs *bpf.PinnedServices, fs []bpf.Frontend, start time.Time, want int, call *apiCall) (time.Duration, error) {
	for i := 0; ; {
		for i < len(fs) {
			if bes, ok := svcs.Backends(fs[i]); !ok || len(bes) != want {
				break
			}
			i++
		}
		if i == len(fs) {
			return time.Since(start), nil
		}
		select {
		case <-call.done:
			if call.err != nil {
				return 0, call.err
			}
		default:
		}
		if time.Since(start) > meshTimeout {
			bes, _ := svcs.Backends(fs[i])
			return 0, fmt.Errorf("service %s: backends %v after %s, want %d", fs[i], bes, meshTimeout, want)
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		time.Sleep(pollInterval)
	}
}

// agentProfile is a CPU profile of the agent being taken over its API
// socket (/debug/pprof/profile) while the churn runs.
type agentProfile struct{ done chan error }

// startAgentProfile starts a CPU profile of -svc-profile-seconds of the
// agent behind socket into path ("": none). The agent writes nothing of a
// profile cut short, so it runs its full length: give the churn enough
// changes (-svc-changes) to fill it.
func startAgentProfile(ctx context.Context, socket, path string) (*agentProfile, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	hc := socketClient(socket)
	url := fmt.Sprintf("http://agent/debug/pprof/profile?seconds=%d", int(svcProfileFor.Seconds()))
	p := &agentProfile{done: make(chan error, 1)}
	go func() {
		defer f.Close()
		p.done <- func() error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if err != nil {
				return err
			}
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("agent profile: %s", resp.Status)
			}
			_, err = io.Copy(f, resp.Body)
			return err
		}()
	}()
	return p, nil
}

// stop waits for the profile (nil: none) to be written.
func (p *agentProfile) stop() error {
	if p == nil {
		return nil
	}
	if err := <-p.done; err != nil {
		return fmt.Errorf("agent profile: %w", err)
	}
	return nil
}

// socketClient is an HTTP client of the agent's API socket.
func socketClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}}
}

// agentCounters are the agent's CPU seconds (user, kernel) and the
// counters of its loops, read before and after the churn.
type agentCounters struct {
	user, sys float64
	loops     map[string]float64
}

func readAgentCounters(ctx context.Context, a *lab.Agent) (agentCounters, error) {
	var c agentCounters
	var err error
	if c.user, c.sys, err = procCPU(a.Proc.Pid()); err != nil {
		return c, err
	}
	c.loops, err = agentLoops(ctx, a.Socket)
	return c, err
}

// agentLoops reads the counters of the agent's loops from its /metrics
// (isthmus_agent_reconcile_* and isthmus_agent_followup_*, by name).
func agentLoops(ctx context.Context, socket string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := socketClient(socket).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, l := range strings.Split(string(body), "\n") {
		name, v, ok := strings.Cut(l, " ")
		if !ok || !(strings.HasPrefix(name, "isthmus_agent_reconcile_") || strings.HasPrefix(name, "isthmus_agent_followup_")) {
			continue
		}
		if f, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
			out[name] = f
		}
	}
	return out, nil
}

// addPhases returns the phases of the last n endpoint adds the agent
// logged ("endpoint added ... phases=\"labels=0s addresses=1.2ms ...\""),
// by name.
func addPhases(log string, n int) ([]map[string]time.Duration, error) {
	var out []map[string]time.Duration
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, `msg="endpoint added"`) {
			continue
		}
		_, rest, ok := strings.Cut(l, ` phases="`)
		if !ok {
			continue
		}
		list, _, _ := strings.Cut(rest, `"`)
		ph := map[string]time.Duration{}
		if err := parsePhases(list, "", ph); err != nil {
			return nil, err
		}
		out = append(out, ph)
	}
	if len(out) < n || n == 0 {
		return nil, fmt.Errorf("%d adds with phases in the agent's log, want %d", len(out), n)
	}
	return out[len(out)-n:], nil
}

// parsePhases reads a list of "name=duration" steps, where a step may list
// its own steps in parentheses ("veth(create=300µs pod=2ms)=4.7ms"), into
// ph under prefix+name (the inner ones as "veth.create").
func parsePhases(list, prefix string, ph map[string]time.Duration) error {
	for list = strings.TrimSpace(list); list != ""; list = strings.TrimSpace(list) {
		i := strings.IndexAny(list, "=(")
		if i <= 0 {
			return fmt.Errorf("phases %q: want name=duration", list)
		}
		name := prefix + list[:i]
		if list[i] == '(' {
			end := strings.Index(list, ")=")
			if end < i {
				return fmt.Errorf("phases %q: no closing parenthesis", list)
			}
			if err := parsePhases(list[i+1:end], name+".", ph); err != nil {
				return err
			}
			i = end + 1
		}
		v, rest, _ := strings.Cut(list[i+1:], " ")
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("phase %s: %w", name, err)
		}
		ph[name], list = d, rest
	}
	return nil
}

// phaseSummary gives each phase's p50 and p99 over the adds, by name.
func phaseSummary(phases []map[string]time.Duration) string {
	names := slices.Sorted(maps.Keys(phases[0]))
	var b strings.Builder
	for _, name := range names {
		var ds []time.Duration
		for _, ph := range phases {
			ds = append(ds, ph[name])
		}
		slices.Sort(ds)
		fmt.Fprintf(&b, " %s=%.2f/%.2f", name, ms(pct(ds, 50)), ms(pct(ds, 99)))
	}
	return strings.TrimSpace(b.String())
}
