package main

// Section "mesh-scale": -mesh-scale-clusters remote clusters of
// -mesh-scale-endpoints endpoints each into one agent. Cluster c1 has one
// node (the agent measured); the remote clusters c2.. run their server
// only (lab.ClusterOptions.ServerOnly): their records are written straight
// into their etcd, as in the mesh section's full sync, so no agent of
// theirs costs the machine anything. The records go in first (the remotes
// in parallel), then c1's server is told to mirror every remote, and the
// clock runs until c1's node holds every record in its BPF ipcache; then
// the agent's RSS.
//
// The BPF ipcache holds bpf.IPCacheMaxEntries entries (isth_ipcache in
// bpf/c/datapath.c): remote entries, the node's and its pods' addresses
// and two world prefixes; the agent keeps datapath.IPCacheReserve of them
// for the node's own and leaves out the mesh's entries past the rest. A
// run that asks for more remote entries than fit does not wait for a sync
// that cannot complete: it waits until the map stops growing and reports
// what the agent does then (the entries it left out, its reconcile state,
// and whether it can still add a pod).

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/lab"
)

var (
	meshScaleClusters  = flag.Int("mesh-scale-clusters", 4, "mesh-scale: remote clusters (server only) mirrored into one agent")
	meshScaleEndpoints = flag.Int("mesh-scale-endpoints", 100_000, "mesh-scale: endpoints per remote cluster")
)

// meshIPCacheLimit is how many entries the agent lets the mesh's fill.
const meshIPCacheLimit = bpf.IPCacheMaxEntries - datapath.IPCacheReserve

// meshAddrs are the n addresses the benchmark writes for cluster index c:
// IPv6 from the bench node's range fd00:<c>:0:ff00::/64, outside every lab
// node's /64 (an IPv4 /17 holds fewer than 100,000).
func meshAddrs(c, n int) []netip.Addr {
	addrs := make([]netip.Addr, n)
	for i := range addrs {
		addrs[i] = netip.AddrFrom16([16]byte{0xfd, 0, 0, byte(c), 0, 0, 0xff, 0, 0, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
	}
	return addrs
}

func meshScaleBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	k, n := *meshScaleClusters, *meshScaleEndpoints
	if k < 1 || k > 20 || n < 1 || n > 1_000_000 {
		return fmt.Errorf("-mesh-scale-clusters %d, -mesh-scale-endpoints %d: want 1..20 clusters of 1..1000000", k, n)
	}
	total := k * n
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	t0 := time.Now()
	// No cap per remote cluster (the default, 65536, is below n): the map
	// is the limit.
	noCap := []string{"--max-remote-ipcache=-1"}
	c1, err := l.AddCluster(ctx, 1, lab.ClusterOptions{Nodes: 1, LeaseTTL: time.Minute, ServerArgs: noCap, AgentArgs: noCap})
	if err != nil {
		return err
	}
	remotes := make([]*lab.Cluster, k)
	for i := range remotes {
		if remotes[i], err = l.AddCluster(ctx, 2+i, lab.ClusterOptions{ServerOnly: true, LeaseTTL: time.Minute}); err != nil {
			return err
		}
	}
	progress("mesh-scale: c1 (1 node) and %d server-only clusters up in %s", k, time.Since(t0).Round(time.Second))
	agent1 := c1.Agents[0]
	ipc1, err := bpf.OpenPinnedIPCache(c1.Nodes[0].PinDir())
	if err != nil {
		return err
	}
	defer ipc1.Close()
	kv1, err := kvConnectNode(ctx, c1, benchNode)
	if err != nil {
		return err
	}
	defer kv1.Close()

	// 1. The records, into every remote's etcd at once (2 writers each).
	type remote struct {
		c     *lab.Cluster
		w     *writer
		addrs []netip.Addr
	}
	rs := make([]remote, k)
	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var clients []*kvstore.Client
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	errs := make([]error, k)
	for i, c := range remotes {
		rs[i] = remote{c: c, addrs: meshAddrs(c.Index, n)}
		wg.Go(func() {
			errs[i] = func() error {
				kvNode, err := kvConnectNode(ctx, c, benchNode)
				if err != nil {
					return err
				}
				root, err := kvConnect(ctx, c, "root")
				if err != nil {
					kvNode.Close()
					return err
				}
				mu.Lock()
				clients = append(clients, kvNode, root)
				mu.Unlock()
				w, err := newWriter(ctx, kvNode, root, c, virtualNode, 1000)
				if err != nil {
					return err
				}
				rs[i].w = w
				return w.putAll(ctx, rs[i].addrs, 2, txnOps)
			}()
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("records of %s: %w", remotes[i].Name, err)
		}
	}
	progress("mesh-scale: %d x %d records written into the remotes' etcd in %s", k, n, time.Since(start).Round(time.Millisecond))

	// 2. c1 mirrors every remote; the clock runs from the first connect.
	runs0, err := reconcileRuns(ctx, agent1)
	if err != nil {
		return err
	}
	before, err := ipc1.Count()
	if err != nil {
		return err
	}
	var bundles []string
	for _, r := range rs {
		b, err := exportBundle(ctx, l, c1, r.c)
		if err != nil {
			return err
		}
		bundles = append(bundles, b)
	}
	start = time.Now()
	for i, r := range rs {
		if err := connect(ctx, c1, r.c, bundles[i]); err != nil {
			return err
		}
	}
	// Meanwhile: when c1's server had mirrored every remote (canaries).
	mirrored := make(chan time.Duration, 1)
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	go func() {
		defer close(mirrored)
		for _, r := range rs {
			for {
				if _, found, err := kv1.Get(wctx, records.SyncedKey(r.c.Name, records.KindIP)); err == nil && found {
					break
				}
				if wctx.Err() != nil {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		mirrored <- time.Since(start)
	}()
	if before+total > meshIPCacheLimit {
		return meshOverflow(ctx, agent1, ipc1, mirrored, before, total)
	}
	for _, r := range rs {
		if err := waitAll(ctx, ipc1, r.addrs, r.w.id, 10*time.Minute); err != nil {
			return fmt.Errorf("full sync of %s: %w", r.c.Name, err)
		}
	}
	full := time.Since(start)
	wcancel()
	runs1, err := reconcileRuns(ctx, agent1)
	if err != nil {
		return err
	}
	rss, hwm, err := procMemory(agent1.Proc.Pid())
	if err != nil {
		return err
	}
	count, err := ipc1.Count()
	if err != nil {
		return err
	}
	line(fmt.Sprintf("mesh-full-sync-%d", total), full.Seconds(), "s", "<= 12")
	if d, ok := <-mirrored; ok {
		line(fmt.Sprintf("mesh-full-sync-mirror-%d", total), d.Seconds(), "s",
			fmt.Sprintf("info: of which until c1's server had mirrored all %d remotes into c1's etcd (canaries written)", k))
	}
	line(fmt.Sprintf("mesh-full-sync-reconciles-%d", total), float64(runs1-runs0), "runs", "info: datapath reconciles of c1's agent during the full sync")
	line(fmt.Sprintf("mesh-agent-rss-%d", total), float64(rss)/(1<<20), "MB", "<= 500")
	line(fmt.Sprintf("mesh-agent-peak-rss-%d", total), float64(hwm)/(1<<20), "MB", "info: VmHWM of c1's agent")
	line("mesh-ipcache-limit", bpf.IPCacheMaxEntries, "entries",
		fmt.Sprintf("info: max_entries of the BPF ipcache, %d of them kept for the node's own; %d in use after this sync (%d remote); past the limit the agent leaves mesh entries out (status ipcacheOverflow), see docs/benchmarks.md",
			datapath.IPCacheReserve, count, total))
	progress("mesh-scale: done in %s", time.Since(t0).Round(time.Second))
	return nil
}

// meshOverflow watches an agent asked to hold more remote entries than its
// BPF ipcache can: once c1's server has mirrored every remote, it waits
// until the map stops growing, then reports the map's count, the agent's
// reconcile state and whether a pod can still be added on the node.
func meshOverflow(ctx context.Context, a *lab.Agent, ipc *bpf.PinnedIPCache, mirrored <-chan time.Duration, before, total int) error {
	progress("mesh-scale: %d remote entries and %d of the node's own do not fit in the BPF ipcache (%d, of which %d for the node's own): watching the overflow",
		total, before, bpf.IPCacheMaxEntries, datapath.IPCacheReserve)
	d, ok := <-mirrored
	if !ok {
		return fmt.Errorf("c1's server did not mirror every remote: %w", ctx.Err())
	}
	progress("mesh-scale: overflow: c1's server mirrored every remote after %s", d.Round(time.Millisecond))
	last, since := -1, time.Now()
	var count int
	for time.Since(since) < 30*time.Second {
		var err error
		if count, err = ipc.Count(); err != nil {
			return err
		}
		if count != last || count == before {
			last, since = count, time.Now()
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		time.Sleep(2 * time.Second)
	}
	out, err := a.CLI(ctx, "status", "-o", "json")
	if err != nil {
		return err
	}
	var st api.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return fmt.Errorf("agent status: %w", err)
	}
	msg := clip(st.Reconcile.LastError)
	progress("mesh-scale: overflow: %d entries in the BPF ipcache (unchanged for 30s), status ipcacheEntries %d ipcacheOverflow %d, reconcile runs %d, last success %s, last error: %q",
		count, st.IPCacheEntries, st.IPCacheOverflow, st.Reconcile.Runs, st.Reconcile.LastSuccess.Format(time.RFC3339), msg)
	_, podErr := a.AddPod(ctx, "overflow-probe", "default", map[string]string{"app": "probe"})
	podMsg := "added"
	if podErr != nil {
		podMsg = clip(podErr.Error())
	}
	progress("mesh-scale: overflow: adding a pod on the full node: %s", podMsg)
	line("mesh-ipcache-overflow-entries", float64(count), "entries",
		fmt.Sprintf("info: %d remote entries asked, %d in the map (max_entries %d), %d left out by the agent's count; a pod added on the node: %v",
			total, count, bpf.IPCacheMaxEntries, st.IPCacheOverflow, podErr == nil))
	return fmt.Errorf("%d remote ipcache entries do not fit in the BPF ipcache (%d entries): no full-sync figure", total, bpf.IPCacheMaxEntries)
}

// clip shortens an error message of the agent (at the ipcache's limit it
// joins one error per entry that did not fit, megabytes of them).
func clip(msg string) string {
	if len(msg) > 400 {
		return fmt.Sprintf("%s... (%d bytes)", msg[:400], len(msg))
	}
	return msg
}
