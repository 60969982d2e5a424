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
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/lab"
)

var (
	svcCount    = flag.Int("svc-services", 1000, "service-backend: services")
	svcBackends = flag.Int("svc-backends", 10, "service-backend: endpoints (backends) per service")
	svcEPs      = flag.Int("svc-endpoints", 1000, "service-backend: endpoints, in groups of -svc-backends that back services/groups services each")
	svcChanges  = flag.Int("svc-changes", 200, "service-backend: endpoint changes measured (half deletes, half adds)")
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
