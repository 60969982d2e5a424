package main

// The cluster-mesh benchmarks (section "mesh"): two clusters of
// -mesh-nodes nodes, each with its own isthmus-clustermesh server, the
// agents in cluster mode, all in network namespaces (package lab).
//
//   - Propagation: one ipcache record at a time written into cluster c1's
//     etcd (leased, with the agents' credentials: what an agent publishes
//     for a new endpoint) until c2's node has the address in its BPF
//     ipcache. The path: c1's etcd -> c2's server mirror -> c2's etcd
//     (isthmus/cache/...) -> c2's agent watch -> reconcile -> BPF map.
//     The map is polled with one lookup every 100 µs.
//   - Burst: -mesh-changes records written at once by 16 writers, until
//     all are in c2's BPF ipcache.
//   - Full sync: -mesh-endpoints records written into c2's etcd (in
//     transactions of 128; c2's own node takes them in meanwhile: the
//     local-sync line); then c1's server is told to mirror c2, and the
//     clock runs until every node of c1 holds all of them in its BPF
//     ipcache. The mirror line says when c1's server had copied them all
//     into c1's etcd (its canary); the rest is the agent's. Then the RSS of
//     c1's agent, and the propagation of single changes (c2 -> c1) with
//     that many entries in the tables.
//
// The records are written straight into etcd rather than through pods:
// creating a pod (a netns, a veth pair) costs far more than the mesh does,
// and the mesh cannot tell the difference. -mesh-perf DIR records perf
// profiles of c1's agent and both servers during the full sync, and of
// c1's agent during the changes after it (`perf report -i DIR/c1-agent.perf`).

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/lab"
)

var (
	meshChanges   = flag.Int("mesh-changes", 1000, "mesh: sequential changes measured for propagation (and the size of the burst)")
	meshEndpoints = flag.Int("mesh-endpoints", 100_000, "mesh: endpoints of the full sync")
	meshAtScale   = flag.Int("mesh-changes-at-scale", 100, "mesh: sequential changes measured after the full sync (0: skip)")
	meshNodes     = flag.Int("mesh-nodes", 1, "mesh: nodes per cluster")
	meshPerf      = flag.String("mesh-perf", "", "mesh: `dir` for perf profiles (perf record -g) of c1's agent and both servers during the full sync")
)

const (
	// meshTimeout bounds one change's propagation.
	meshTimeout = 10 * time.Second
	// pollInterval is the pause between two lookups of an address in a
	// node's BPF ipcache (one syscall each): sub-millisecond, without
	// spinning a core the agents need.
	pollInterval = 100 * time.Microsecond
	// txnOps is the batch size of the full sync's writes (etcd's default
	// limit of operations per transaction is 128).
	txnOps = 128
	// virtualNode is the number of the node the records name as host.
	virtualNode = 50
)

// quiet logs only errors of the benchmark's own etcd clients.
var quiet = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

func meshBench(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	l, err := newLab()
	if err != nil {
		return err
	}
	defer l.Close()
	t0 := time.Now()
	// Long leases: the benchmark's machine is busy, and no agent is killed.
	opts := lab.ClusterOptions{Nodes: *meshNodes, LeaseTTL: time.Minute}
	// The full sync goes past the default per-remote ipcache cap (65536).
	opts.ServerArgs = []string{"--max-remote-ipcache=-1"}
	opts.AgentArgs = []string{"--max-remote-ipcache=-1"}
	c1, err := l.AddCluster(ctx, 1, opts)
	if err != nil {
		return err
	}
	c2, err := l.AddCluster(ctx, 2, opts)
	if err != nil {
		return err
	}
	// c2 mirrors c1 now; c1 mirrors c2 only for the full sync.
	if err := connectOneWay(ctx, l, c2, c1); err != nil {
		return err
	}
	progress("mesh: 2 clusters x %d nodes up in %s", *meshNodes, time.Since(t0).Round(time.Second))

	kv1, err := kvConnectNode(ctx, c1, benchNode)
	if err != nil {
		return err
	}
	defer kv1.Close()
	kv2, err := kvConnectNode(ctx, c2, benchNode)
	if err != nil {
		return err
	}
	defer kv2.Close()
	// The changes are written as an agent writes them: with a node's own
	// credential, under that node's prefix, a lease per 100 endpoints (etcd checks a non-admin
	// user's permission on every key of the lease at each leased put, so
	// the size of a lease matters). The full sync's records are written
	// with the root credentials: writing them is not what is measured.
	root2, err := kvConnect(ctx, c2, "root")
	if err != nil {
		return err
	}
	defer root2.Close()
	// The records name as host a node the lab does not run (an agent
	// leaves records naming its own node to its local state).
	w1, err := newWriter(ctx, kv1, kv1, c1, virtualNode, 100)
	if err != nil {
		return err
	}
	w2, err := newWriter(ctx, kv2, kv2, c2, virtualNode, 100)
	if err != nil {
		return err
	}
	w2root, err := newWriter(ctx, kv2, root2, c2, virtualNode, 1000)
	if err != nil {
		return err
	}
	// The nodes whose BPF ipcache is watched.
	ipc2, err := bpf.OpenPinnedIPCache(c2.Nodes[len(c2.Nodes)-1].PinDir())
	if err != nil {
		return err
	}
	defer ipc2.Close()
	var ipc1s []*bpf.PinnedIPCache // every node of c1, for the full sync
	for _, node := range c1.Nodes {
		ipc, err := bpf.OpenPinnedIPCache(node.PinDir())
		if err != nil {
			return err
		}
		defer ipc.Close()
		ipc1s = append(ipc1s, ipc)
	}
	ipc1 := ipc1s[len(ipc1s)-1]

	if *meshChanges < 1 || 2*(*meshChanges)+1 > 127<<8 || *meshAtScale > 127<<8 {
		return fmt.Errorf("-mesh-changes %d, -mesh-changes-at-scale %d: want 1..16000", *meshChanges, *meshAtScale)
	}
	// 1. Propagation c1 -> c2, one change at a time. The first change
	// waits for c2's mirror and agent to have synced c1 (canaries).
	addrs1 := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 1, byte(128 + i>>8), byte(i)}) }
	if _, err := w1.propagate(ctx, addrs1(0), ipc2, 60*time.Second); err != nil {
		return fmt.Errorf("first change: %w", err)
	}
	lat := make([]time.Duration, 0, *meshChanges)
	for i := 1; i <= *meshChanges; i++ {
		d, err := w1.propagate(ctx, addrs1(i), ipc2, meshTimeout)
		if err != nil {
			return fmt.Errorf("change %d: %w", i, err)
		}
		lat = append(lat, d)
	}
	slices.Sort(lat)
	line("mesh-propagation-p50", ms(pct(lat, 50)), "ms", fmt.Sprintf("info: %d sequential changes, c1 etcd -> c2 node's BPF ipcache", len(lat)))
	line("mesh-propagation-p99", ms(pct(lat, 99)), "ms", "<= 250")
	line("mesh-propagation-max", ms(lat[len(lat)-1]), "ms", "info")

	// Burst: as many changes at once from 16 writers.
	var burst []netip.Addr
	for i := range *meshChanges {
		burst = append(burst, addrs1(*meshChanges+1+i))
	}
	start := time.Now()
	if err := w1.putAll(ctx, burst, 16, 1); err != nil {
		return err
	}
	wrote := time.Since(start)
	if err := waitAll(ctx, ipc2, burst, w1.id, 60*time.Second); err != nil {
		return fmt.Errorf("burst: %w", err)
	}
	took := time.Since(start)
	line("mesh-propagation-burst", float64(len(burst))/took.Seconds(), "changes/s",
		fmt.Sprintf("info: %d changes from 16 writers (written in %s) all in c2's BPF ipcache after %s",
			len(burst), wrote.Round(time.Millisecond), took.Round(time.Millisecond)))

	// 2. Full sync: the endpoints go into c2's etcd first (c2's own agent
	// takes them in meanwhile), then c1 connects to c2.
	n := *meshEndpoints
	if n < 1 || n > 400_000 {
		return fmt.Errorf("-mesh-endpoints %d: want 1..400000 (the BPF ipcache holds 512k entries)", n)
	}
	addrs2 := meshAddrs(c2.Index, n)
	start = time.Now()
	if err := w2root.putAll(ctx, addrs2, 4, txnOps); err != nil {
		return err
	}
	wrote = time.Since(start)
	progress("mesh: %d records written into c2's etcd in %s (%d transactions retried)", n, wrote.Round(time.Millisecond), w2root.retries.Load())
	if err := waitAll(ctx, ipc2, addrs2, w2root.id, 2*time.Minute); err != nil {
		return fmt.Errorf("c2's own agent: %w", err)
	}
	line(fmt.Sprintf("mesh-local-sync-%d", n), time.Since(start).Seconds(), "s",
		fmt.Sprintf("info: writing them into c2's etcd (%s, txns of %d) until c2's own node has them all", wrote.Round(time.Millisecond), txnOps))

	agent1 := c1.Agents[len(c1.Agents)-1]
	var stopPerf []func() error
	if *meshPerf != "" {
		if err := os.MkdirAll(*meshPerf, 0o755); err != nil {
			return err
		}
		for name, pid := range map[string]int{"c1-agent": agent1.Proc.Pid(), "c1-server": c1.Server.Pid(), "c2-server": c2.Server.Pid()} {
			stop, err := perfRecord(pid, filepath.Join(*meshPerf, name+".perf"))
			if err != nil {
				return err
			}
			stopPerf = append(stopPerf, stop)
		}
	}
	runs0, err := reconcileRuns(ctx, agent1)
	if err != nil {
		return err
	}
	bundle, err := exportBundle(ctx, l, c1, c2)
	if err != nil {
		return err
	}
	start = time.Now()
	if err := connect(ctx, c1, c2, bundle); err != nil {
		return err
	}
	// Meanwhile: when c1's server has mirrored all of c2's ipcache into
	// c1's etcd (it writes the canary after the first complete list).
	mirrored := make(chan time.Duration, 1)
	wctx, wcancel := context.WithCancel(ctx)
	go func() {
		defer close(mirrored)
		for wctx.Err() == nil {
			if _, found, err := kv1.Get(wctx, records.SyncedKey(c2.Name, records.KindIP)); err == nil && found {
				mirrored <- time.Since(start)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	for _, ipc := range ipc1s {
		if err = waitAll(ctx, ipc, addrs2, w2root.id, 5*time.Minute); err != nil {
			break
		}
	}
	full := time.Since(start)
	wcancel()
	if err != nil {
		return fmt.Errorf("full sync: %w", err)
	}
	for _, stop := range stopPerf {
		if err := stop(); err != nil {
			fmt.Fprintln(os.Stderr, "bench mesh: perf:", err)
		}
	}
	runs1, err := reconcileRuns(ctx, agent1)
	if err != nil {
		return err
	}
	rss, hwm, err := procMemory(agent1.Proc.Pid())
	if err != nil {
		return err
	}
	line(fmt.Sprintf("mesh-full-sync-%d", n), full.Seconds(), "s", "<= 3")
	if d, ok := <-mirrored; ok {
		line(fmt.Sprintf("mesh-full-sync-mirror-%d", n), d.Seconds(), "s",
			"info: of which until c1's server had mirrored them all into c1's etcd (canary written)")
	}
	line(fmt.Sprintf("mesh-full-sync-reconciles-%d", n), float64(runs1-runs0), "runs", "info: datapath reconciles of c1's agent during the full sync")
	line(fmt.Sprintf("mesh-agent-rss-%d", n), float64(rss)/(1<<20), "MB", "<= 150")
	line(fmt.Sprintf("mesh-agent-peak-rss-%d", n), float64(hwm)/(1<<20), "MB", "info: VmHWM of c1's agent")

	// 3. Single changes c2 -> c1 with the full-sync entries in place.
	if *meshAtScale > 0 {
		addrs := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 2, byte(128 + i>>8), byte(i)}) }
		var stop func() error
		if *meshPerf != "" {
			if stop, err = perfRecord(agent1.Proc.Pid(), filepath.Join(*meshPerf, "c1-agent-at-scale.perf")); err != nil {
				return err
			}
		}
		lat = lat[:0]
		for i := range *meshAtScale {
			d, err := w2.propagate(ctx, addrs(i), ipc1, 30*time.Second)
			if err != nil {
				return fmt.Errorf("change %d after the full sync: %w", i, err)
			}
			lat = append(lat, d)
		}
		if stop != nil {
			if err := stop(); err != nil {
				fmt.Fprintln(os.Stderr, "bench mesh: perf:", err)
			}
		}
		slices.Sort(lat)
		line(fmt.Sprintf("mesh-propagation-p50-at-%d", n), ms(pct(lat, 50)), "ms",
			fmt.Sprintf("info: %d sequential changes, c2 -> c1 node with %d endpoints", len(lat), n))
		line(fmt.Sprintf("mesh-propagation-p99-at-%d", n), ms(pct(lat, 99)), "ms", "<= 25")
	}
	// 4. Sustained churn against c1's agent holding the full sync's entries.
	if *meshChurnDuration > 0 {
		if err := meshChurn(ctx, w2, c2, kv1, ipc1, agent1, n); err != nil {
			return err
		}
	}
	progress("mesh: done in %s", time.Since(t0).Round(time.Second))
	return nil
}

func progress(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// pct returns the p-th percentile of sorted durations (nearest rank).
func pct(sorted []time.Duration, p int) time.Duration {
	i := (len(sorted)*p + 99) / 100
	return sorted[min(max(i-1, 0), len(sorted)-1)]
}

// connectOneWay makes local's server mirror remote.
func connectOneWay(ctx context.Context, l *lab.Lab, local, remote *lab.Cluster) error {
	bundle, err := exportBundle(ctx, l, local, remote)
	if err != nil {
		return err
	}
	return connect(ctx, local, remote, bundle)
}

// exportBundle exports the credentials with which local reads remote.
func exportBundle(ctx context.Context, l *lab.Lab, local, remote *lab.Cluster) (string, error) {
	bundle := filepath.Join(l.Dir(), fmt.Sprintf("bundle-%s-for-%s", remote.Name, local.Name))
	_, err := remote.CLI(ctx, "clustermesh", "certs", "--data-dir", remote.ServerDir, "--for-remote", local.Name, "--out", bundle)
	return bundle, err
}

// connect tells local's server to mirror remote (`isthmus clustermesh connect`).
func connect(ctx context.Context, local, remote *lab.Cluster, bundle string) error {
	_, err := local.CLI(ctx, "clustermesh", "connect", "--name", remote.Name, "--endpoints", remote.ServerAddr(), "--bundle", bundle)
	return err
}

// kvConnect connects to a cluster's etcd with the bundle of user. The
// server listens in its router's namespace; a forwarder on loopback dials
// it from there.
func kvConnect(ctx context.Context, c *lab.Cluster, user string) (*kvstore.Client, error) {
	return kvConnectDir(ctx, c, c.Bundle(user))
}

// kvConnectNode connects to a cluster's etcd with node's own credential.
func kvConnectNode(ctx context.Context, c *lab.Cluster, node string) (*kvstore.Client, error) {
	dir, err := c.NodeBundle(ctx, node)
	if err != nil {
		return nil, err
	}
	return kvConnectDir(ctx, c, dir)
}

func kvConnectDir(ctx context.Context, c *lab.Cluster, dir string) (*kvstore.Client, error) {
	tc, err := meshsync.LoadBundle(dir, c.Name)
	if err != nil {
		return nil, err
	}
	// The relay lives as long as the process (the lab's namespaces go
	// first; then dials fail).
	addr, _, err := c.Router.NS().Forward(strings.TrimPrefix(c.ServerAddr(), "https://"))
	if err != nil {
		return nil, err
	}
	return kvstore.Connect(ctx, kvstore.Config{Endpoints: []string{"https://" + addr}, TLS: tc, Logger: quiet,
		RequestTimeout: 30 * time.Second})
}

// writer publishes ipcache records of one cluster the way agents do:
// leased, with an identity allocated through etcd, naming a node of the
// cluster as host. Every perLease records get a lease of their own, as the
// endpoints of one node share its lease.
type writer struct {
	kv       *kvstore.Client
	cluster  string
	node     string // the records sit under this (virtual) node's prefix
	id       uint32
	host4    netip.Addr
	host6    netip.Addr
	perLease int
	alloc    *identity.Etcd // allocates with the node's own credential
	seq      atomic.Int64
	retries  atomic.Int64 // transactions written again after an error

	mu     sync.Mutex
	leases []*kvstore.Lease
}

// benchNode is the virtual node the benchmark's records belong to.
const benchNode = "bench"

// newWriter publishes the record of the virtual node (unless there is one)
// and allocates the identity with idKV (that node's own credential), and
// writes the ipcache records through kv. The node owns the ranges the
// benchmark writes: 10.<c>.128.0/17 and fd00:<c>:0:ff00::/64, outside
// every lab node's pod CIDRs.
func newWriter(ctx context.Context, idKV, kv *kvstore.Client, c *lab.Cluster, node, perLease int) (*writer, error) {
	w := &writer{kv: kv, cluster: c.Name, node: benchNode, perLease: perLease,
		// The lab's address plan (lab/mesh.go): node j is .10+j.
		host4: netip.AddrFrom4([4]byte{10, byte(100 + c.Index), 0, byte(10 + node)}),
		host6: netip.MustParseAddr(fmt.Sprintf("fd10:%x::%x", c.Index, 10+node)),
	}
	lease, err := idKV.GrantLease(ctx, 10*time.Minute)
	if err != nil {
		return nil, err
	}
	nodeRec, err := records.Node{Name: benchNode, Cluster: c.Name, ClusterID: c.ID, IPs: []netip.Addr{w.host4, w.host6},
		PodCIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(c.Index), 128, 0}), 17),
			netip.MustParsePrefix(fmt.Sprintf("fd00:%x:0:ff00::/64", c.Index))}}.Marshal()
	if err != nil {
		return nil, err
	}
	if _, err := idKV.CreateOnlyLeased(ctx, records.NodeKey(c.Name, benchNode), nodeRec, lease); err != nil {
		return nil, fmt.Errorf("the record of node %s: %w", benchNode, err)
	}
	alloc, err := identity.NewEtcd(idKV, c.Name, c.ID, benchNode, identity.WithLease(lease), identity.WithLogger(quiet))
	if err != nil {
		return nil, err
	}
	w.alloc = alloc
	w.id, err = alloc.Allocate(ctx, identity.Labels{"app": "bench", identity.LabelNamespace: "default", identity.LabelCluster: c.Name})
	if err != nil {
		return nil, err
	}
	return w, nil
}

// lease returns the lease of the n-th record.
func (w *writer) lease(ctx context.Context, n int) (*kvstore.Lease, error) {
	i := n / w.perLease
	w.mu.Lock()
	defer w.mu.Unlock()
	for len(w.leases) <= i {
		l, err := w.kv.GrantLease(ctx, 10*time.Minute)
		if err != nil {
			return nil, err
		}
		w.leases = append(w.leases, l)
	}
	return w.leases[i], nil
}

func (w *writer) record(ctx context.Context, a netip.Addr) (string, []byte, *kvstore.Lease, error) {
	host := w.host4
	if a.Is6() {
		host = w.host6
	}
	return w.recordAs(ctx, a, w.id, host)
}

// recordAs is the record of a with identity id on host (one of the
// virtual node's addresses), with the lease of the next sequence number.
func (w *writer) recordAs(ctx context.Context, a netip.Addr, id uint32, host netip.Addr) (string, []byte, *kvstore.Lease, error) {
	p := netip.PrefixFrom(a, a.BitLen())
	n := w.seq.Add(1)
	lease, err := w.lease(ctx, int(n-1))
	if err != nil {
		return "", nil, nil, err
	}
	v, err := records.IPCacheEntry{Prefix: p, Identity: id, HostIP: host, Cluster: w.cluster,
		OwnerName: "bench-" + strconv.FormatInt(n, 10), OwnerNamespace: "default"}.Marshal()
	return records.IPCacheKey(w.cluster, w.node, p), v, lease, err
}

// propagate writes the record of a and returns the time until ipc maps a
// to the writer's identity.
func (w *writer) propagate(ctx context.Context, a netip.Addr, ipc *bpf.PinnedIPCache, timeout time.Duration) (time.Duration, error) {
	key, v, lease, err := w.record(ctx, a)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := w.kv.PutLeased(ctx, key, v, lease); err != nil {
		return 0, err
	}
	for {
		if e, ok := ipc.Lookup(a); ok && e.Identity == w.id {
			return time.Since(start), nil
		}
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("%s not in the BPF ipcache after %s", a, timeout)
		}
		time.Sleep(pollInterval)
	}
}

// putAll writes the records of addrs from `writers` goroutines, perTxn
// records per transaction.
func (w *writer) putAll(ctx context.Context, addrs []netip.Addr, writers, perTxn int) error {
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	for range writers {
		wg.Go(func() {
			for failed.Load() == nil {
				lo := int(next.Add(int64(perTxn))) - perTxn
				if lo >= len(addrs) {
					return
				}
				var ops []kvstore.Op
				var err error
				for _, a := range addrs[lo:min(lo+perTxn, len(addrs))] {
					key, v, lease, rerr := w.record(ctx, a)
					if rerr != nil {
						err = rerr
						break
					}
					if perTxn == 1 {
						err = w.kv.PutLeased(ctx, key, v, lease)
						break
					}
					ops = append(ops, kvstore.OpPutLeased(key, v, lease))
				}
				// Plain puts: repeating a transaction that timed out is harmless.
				for attempt := 0; err == nil && len(ops) > 0; attempt++ {
					if _, err = w.kv.Txn(ctx, nil, ops); err == nil || attempt == 4 || ctx.Err() != nil {
						break
					}
					w.retries.Add(1)
					err = nil
					time.Sleep(100 * time.Millisecond)
				}
				if err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		return err
	}
	return nil
}

// waitAll waits until ipc maps every address to id. While the first
// missing address is missing, a round is one lookup (every millisecond);
// once it is there, a round is one pass over the addresses still missing.
// So the wait costs about one lookup per address, and the check's own time
// after the last write is a pass over what that write brought, not over
// every address: the datapath writes in its own order (a whole remote
// cluster's entries arrive in one reconcile), and a check in the order of
// addrs would otherwise start counting only once nearly all are in.
func waitAll(ctx context.Context, ipc *bpf.PinnedIPCache, addrs []netip.Addr, id uint32, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	present := func(a netip.Addr) bool { e, ok := ipc.Lookup(a); return ok && e.Identity == id }
	missing := addrs
	for len(missing) > 0 {
		if !present(missing[0]) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%d of %d addresses in the BPF ipcache after %s (first missing: %s)", len(addrs)-len(missing), len(addrs), timeout, missing[0])
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			time.Sleep(time.Millisecond)
			continue
		}
		var still []netip.Addr
		for _, a := range missing[1:] {
			if !present(a) {
				still = append(still, a)
			}
		}
		missing = still
	}
	return nil
}

// reconcileRuns returns the number of datapath reconciles the agent ran.
func reconcileRuns(ctx context.Context, a *lab.Agent) (uint64, error) {
	out, err := a.CLI(ctx, "status", "-o", "json")
	if err != nil {
		return 0, err
	}
	var st api.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return 0, fmt.Errorf("agent status: %w", err)
	}
	return st.Reconcile.Runs, nil
}

// procMemory returns VmRSS and VmHWM of a process in bytes.
func procMemory(pid int) (rss, hwm int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, ln := range strings.Split(string(b), "\n") {
		f := strings.Fields(ln)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v << 10
		case "VmHWM:":
			hwm = v << 10
		}
	}
	if rss == 0 {
		return 0, 0, errors.New("no VmRSS in /proc/" + strconv.Itoa(pid) + "/status")
	}
	return rss, hwm, nil
}

// perfRecord starts `perf record -g` on pid; the returned function stops
// it and waits until the file is written.
func perfRecord(pid int, out string) (func() error, error) {
	cmd := exec.Command("perf", "record", "-g", "-F", "499", "-o", out, "-p", strconv.Itoa(pid))
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("perf: %w", err)
	}
	return func() error {
		_ = cmd.Process.Signal(syscall.SIGINT)
		err := cmd.Wait()
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ProcessState.Sys().(syscall.WaitStatus).Signal() == syscall.SIGINT {
			err = nil // perf stops on SIGINT; the file is written
		}
		return err
	}, nil
}
