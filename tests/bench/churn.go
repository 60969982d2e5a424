package main

// Sustained churn (section "mesh", after the full sync): c1's agent holds
// the full sync's entries of c2, and records of c2 change at
// -mesh-churn-rate changes per second for -mesh-churn-duration. The changes
// are a steady mix, in turn: an add (a new address), an update (an address
// changes identity, or its host changes between the virtual node's two
// addresses) and a delete, so the population stays the same. They are
// written into c2's etcd as an agent writes them (the virtual node's own
// credential, a lease per 100 records) by -mesh-churn-writers goroutines, paced
// open loop: change i is due at start + i/rate whatever became of the
// ones before, and the achieved rate is checked. An address changes again
// only seconds later (the changes go through a queue of live addresses),
// so every change has a state of its own to wait for.
//
// One change in -mesh-churn-sample (drawn at random) is timed from just before its write
// until c1's node's BPF ipcache shows it (the new identity and host, or
// the address gone), by one goroutine that looks each pending change up
// every churnPoll, or every 1/20 of its age once that is longer (an error
// of at most 5 %, and a bounded number of lookups per change however slow
// the agent is); timing every change, or polling every pending change
// every millisecond, would put hundreds of lookups per millisecond on the
// agent's two cores. At the end every address the churn touched is
// checked against its last change.

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/lab"
)

var (
	meshChurnDuration = flag.Duration("mesh-churn-duration", 60*time.Second, "mesh: length of the sustained churn against c1's agent after the full sync (0: skip)")
	meshChurnRate     = flag.Int("mesh-churn-rate", 1000, "mesh: changes per second of the sustained churn")
	meshChurnSample   = flag.Int("mesh-churn-sample", 10, "mesh: time every n-th change of the churn (1: every change)")
	meshChurnWriters  = flag.Int("mesh-churn-writers", 32, "mesh: concurrent writers of the churn (each change is one etcd request)")
)

const (
	churnPoll = time.Millisecond
	// churnLag is how late a change may be written before it counts as
	// late (the writers fell behind).
	churnLag = 100 * time.Millisecond
)

// churnAddr is the i-th address of the churn: fd00:<c>:0:ff00:100::/80,
// inside the virtual node's /64, apart from the full sync's.
func churnAddr(c, i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0xfd, 0, 0, byte(c), 0, 0, 0xff, 0, 1, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
}

// churnState is what an address should look like after a change.
type churnState struct {
	addr netip.Addr
	live bool
	id   uint32
	host netip.Addr
}

// shows reports whether ipc shows s.
func (s churnState) shows(ipc *bpf.PinnedIPCache, ids [2]uint32) bool {
	e, ok := ipc.Lookup(s.addr)
	if !s.live {
		// Gone: the lookup finds a covering prefix (the world) or nothing.
		return !ok || (e.Identity != ids[0] && e.Identity != ids[1])
	}
	return ok && e.Identity == s.id && e.HostIP == s.host
}

type churnOp struct {
	seq   int
	due   time.Time
	state churnState
}

type churnSample struct {
	state churnState
	start time.Time
	next  time.Time // of its next lookup
}

func meshChurn(ctx context.Context, w *writer, c *lab.Cluster, kv1 *kvstore.Client, ipc *bpf.PinnedIPCache, agent *lab.Agent, held int) error {
	rate, dur, every := *meshChurnRate, *meshChurnDuration, *meshChurnSample
	if rate < 1 || every < 1 || *meshChurnWriters < 1 {
		return fmt.Errorf("-mesh-churn-rate %d, -mesh-churn-sample %d, -mesh-churn-writers %d: want 1 or more", rate, every, *meshChurnWriters)
	}
	total := int(dur.Seconds() * float64(rate))
	if total < 3 {
		return fmt.Errorf("-mesh-churn-duration %s at %d/s: fewer than 3 changes", dur, rate)
	}
	alt, err := w.alloc.Allocate(ctx, identity.Labels{"app": "bench-churn", identity.LabelNamespace: "default", identity.LabelCluster: w.cluster})
	if err != nil {
		return err
	}
	ids := [2]uint32{w.id, alt}
	hosts := [2]netip.Addr{w.host6, w.host4}

	// The population: 5 s worth of changes, written (and in c1's map)
	// before the clock starts, so that an address changes every ~7 s.
	prefill := max(rate*5, 3)
	live := make([]churnState, 0, prefill+total)
	var addrs []netip.Addr
	for i := range prefill {
		st := churnState{addr: churnAddr(c.Index, i), live: true, id: w.id, host: w.host6}
		live = append(live, st)
		addrs = append(addrs, st.addr)
	}
	if err := w.putAll(ctx, addrs, 4, txnOps); err != nil {
		return err
	}
	if err := waitAll(ctx, ipc, addrs, w.id, 2*time.Minute); err != nil {
		return fmt.Errorf("the churn's population: %w", err)
	}
	fresh := prefill

	// The changes, planned in advance: their states in order, and which
	// are timed (drawn at random, so that every kind of change is).
	plan := make([]churnState, total)
	timed := make([]bool, total)
	rng := rand.New(rand.NewPCG(11, uint64(total)))
	for i := range plan {
		timed[i] = rng.IntN(every) == 0
		switch {
		case i%3 == 0 || len(live) == 0: // add
			plan[i] = churnState{addr: churnAddr(c.Index, fresh), live: true, id: w.id, host: w.host6}
			fresh++
			live = append(live, plan[i])
		case i%3 == 1: // update: identity, or host, in turn
			st := live[0]
			live = live[1:]
			if i%6 == 1 {
				st.id = ids[0] + ids[1] - st.id
			} else {
				st.host = hosts[0]
				if st.host == w.host6 {
					st.host = hosts[1]
				}
			}
			plan[i] = st
			live = append(live, st)
		default: // delete
			st := live[0]
			live = live[1:]
			st.live = false
			plan[i] = st
		}
	}
	final := map[netip.Addr]churnState{}
	for _, st := range plan {
		final[st.addr] = st
	}

	// The leases of every record the churn writes, granted beforehand
	// (an agent's lease exists before its endpoints change).
	if _, err := w.lease(ctx, int(w.seq.Load())+total); err != nil {
		return err
	}

	// The mirror's share: a watch on c1's etcd sees each timed change
	// arrive in c1's server's copy of c2's state.
	mirror, err := watchMirror(ctx, kv1, w.cluster, w.node)
	if err != nil {
		return err
	}
	defer mirror.stop()

	var stopPerf func() error
	if *meshPerf != "" {
		if stopPerf, err = perfRecord(agent.Proc.Pid(), filepath.Join(*meshPerf, "c1-agent-churn.perf")); err != nil {
			return err
		}
	}
	runs0, err := reconcileRuns(ctx, agent)
	if err != nil {
		return err
	}
	cpu0, err := cpuSeconds([]int{agent.Proc.Pid()})
	if err != nil {
		return err
	}

	// The poller of the timed changes.
	samples := make(chan churnSample, 4096)
	var lat []time.Duration
	var timeline []churnTimed
	var t0 time.Time // set before the first change
	var lost []churnState
	pollDone := make(chan struct{})
	go func() {
		defer close(pollDone)
		var pending []*churnSample
		open := true
		for open || len(pending) > 0 {
			for drained := false; open && !drained; {
				select {
				case s, ok := <-samples:
					if !ok {
						open = false
					} else {
						pending = append(pending, &s)
					}
				default:
					drained = true
				}
			}
			now := time.Now()
			pending = slices.DeleteFunc(pending, func(s *churnSample) bool {
				if now.Before(s.next) {
					return false
				}
				if s.state.shows(ipc, ids) {
					d := time.Since(s.start)
					lat = append(lat, d)
					timeline = append(timeline, churnTimed{at: s.start.Sub(t0), took: d})
					return true
				}
				age := now.Sub(s.start)
				if age > 30*time.Second {
					lost = append(lost, s.state)
					return true
				}
				s.next = now.Add(max(churnPoll, age/20))
				return false
			})
			time.Sleep(churnPoll)
		}
	}()

	// The writers, fed by the pacer below.
	ops := make(chan churnOp, 1024)
	var late atomic.Int64
	var maxLag atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	for range *meshChurnWriters {
		wg.Go(func() {
			for op := range ops {
				if failed.Load() != nil {
					continue
				}
				start := time.Now()
				if lag := start.Sub(op.due); lag > churnLag {
					late.Add(1)
					for {
						m := maxLag.Load()
						if int64(lag) <= m || maxLag.CompareAndSwap(m, int64(lag)) {
							break
						}
					}
				}
				st := op.state
				if timed[op.seq] {
					mirror.expect(st, start)
				}
				var err error
				if st.live {
					key, v, lease, rerr := w.recordAs(ctx, st.addr, st.id, st.host)
					if err = rerr; err == nil {
						err = w.kv.PutLeased(ctx, key, v, lease)
					}
				} else {
					err = w.kv.Delete(ctx, records.IPCacheKey(w.cluster, w.node, netip.PrefixFrom(st.addr, st.addr.BitLen())))
				}
				if err != nil {
					failed.CompareAndSwap(nil, fmt.Errorf("change %d (%s): %w", op.seq, st.addr, err))
					continue
				}
				if timed[op.seq] {
					samples <- churnSample{state: st, start: start}
				}
			}
		})
	}
	t0 = time.Now()
	interval := time.Second / time.Duration(rate)
	for i, st := range plan {
		due := t0.Add(time.Duration(i) * interval)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		if failed.Load() != nil || ctx.Err() != nil {
			break
		}
		ops <- churnOp{seq: i, due: due, state: st}
	}
	close(ops)
	wg.Wait()
	wrote := time.Since(t0)
	close(samples)
	if err, _ := failed.Load().(error); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	<-pollDone

	// Every address touched, against its last change.
	settleStart := time.Now()
	var wrong []churnState
	for {
		wrong = wrong[:0]
		for _, st := range final {
			if !st.shows(ipc, ids) {
				wrong = append(wrong, st)
			}
		}
		if len(wrong) == 0 || time.Since(settleStart) > time.Minute {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	settled := time.Since(t0)
	cpu1, err := cpuSeconds([]int{agent.Proc.Pid()})
	if err != nil {
		return err
	}
	runs1, err := reconcileRuns(ctx, agent)
	if err != nil {
		return err
	}
	if stopPerf != nil {
		if err := stopPerf(); err != nil {
			progress("bench mesh: perf: %v", err)
		}
	}
	if len(wrong) > 0 {
		return fmt.Errorf("churn: %d of %d addresses still not as last written a minute after the last change (first: %+v)", len(wrong), len(final), wrong[0])
	}
	if len(lost) > 0 {
		return fmt.Errorf("churn: %d timed changes not in c1's BPF ipcache after 30s (first: %+v)", len(lost), lost[0])
	}
	progress("mesh churn: timed changes by when they were written: %s", churnWindows(timeline, wrote))
	mirrorLat, mirrorMissed := mirror.result()
	slices.Sort(mirrorLat)
	slices.Sort(lat)
	achieved := float64(total) / wrote.Seconds()
	line("mesh-churn-propagation-p50", ms(pct(lat, 50)), "ms",
		fmt.Sprintf("info: %d changes (adds, identity/host updates, deletes) at %d/s for %s by %d writers into c2's etcd, c1's agent holding %d entries; 1 in %d timed (%d) until c1's node's BPF ipcache shows it, polled every %s or 1/20 of its age",
			total, rate, dur, *meshChurnWriters, held+prefill, every, len(lat), churnPoll))
	line("mesh-churn-propagation-p99", ms(pct(lat, 99)), "ms", "<= 50")
	if len(mirrorLat) > 0 {
		line("mesh-churn-mirror-p50", ms(pct(mirrorLat, 50)), "ms",
			fmt.Sprintf("info: of which c2's etcd -> c1's etcd (c1's server's mirror), seen by a watch on c1's etcd; p99 %.2f ms; %d of the timed changes not seen there",
				ms(pct(mirrorLat, 99)), mirrorMissed))
	}
	behind := ""
	if achieved < 0.95*float64(rate) {
		behind = "; the writers FELL BEHIND"
	}
	line("mesh-churn-rate", achieved, "changes/s", fmt.Sprintf("info: achieved (asked %d/s: %d changes written in %s; %d written more than %s after due, at most %s)%s",
		rate, total, wrote.Round(time.Millisecond), late.Load(), churnLag, time.Duration(maxLag.Load()).Round(time.Millisecond), behind))
	line("mesh-churn-agent-cpu-per-1000", (cpu1-cpu0)/(float64(total)/1000), "s",
		fmt.Sprintf("info: utime+stime of c1's agent per 1,000 changes, from the first change until all %d addresses showed their last (%s)", len(final), settled.Round(time.Millisecond)))
	line("mesh-churn-reconciles", float64(runs1-runs0), "runs", "info: datapath reconciles of c1's agent during the churn")
	if achieved < 0.95*float64(rate) {
		return fmt.Errorf("churn: the writers achieved %.0f changes/s of the %d/s asked: the churn figures do not hold at that rate", achieved, rate)
	}
	return nil
}

// churnTimed is one timed change: written at `at` after the churn's start,
// shown after `took`.
type churnTimed struct{ at, took time.Duration }

// churnWindows summarizes the timed changes in 10 windows of the churn
// (p50 and max of each), so that a p99 made of a few stalls shows as such.
func churnWindows(ts []churnTimed, dur time.Duration) string {
	const n = 10
	win := make([][]time.Duration, n)
	for _, t := range ts {
		i := min(int(t.at*n/max(dur, 1)), n-1)
		win[i] = append(win[i], t.took)
	}
	var b strings.Builder
	for i, w := range win {
		if len(w) == 0 {
			continue
		}
		slices.Sort(w)
		fmt.Fprintf(&b, "[+%s: p50 %.0f max %.0f ms] ", (dur * time.Duration(i) / n).Round(100*time.Millisecond), ms(pct(w, 50)), ms(w[len(w)-1]))
	}
	return strings.TrimSpace(b.String())
}

// mirrorWatch times changes from their write into c2's etcd until c1's
// server has mirrored them into c1's etcd (isthmus/cache/ip/v1/c2/...).
type mirrorWatch struct {
	cluster, node string // of the records
	cancel        context.CancelFunc
	done          chan struct{}

	mu      sync.Mutex
	pending map[string]churnSample // by cache key
	lat     []time.Duration
}

func watchMirror(ctx context.Context, kv *kvstore.Client, cluster, node string) (*mirrorWatch, error) {
	wctx, cancel := context.WithCancel(ctx)
	m := &mirrorWatch{cluster: cluster, node: node, cancel: cancel, done: make(chan struct{}), pending: map[string]churnSample{}}
	prefix := records.CachePrefix(records.KindIP, cluster)
	events := kv.WatchPrefix(wctx, prefix)
	listed := make(chan struct{})
	go func() {
		defer close(m.done)
		once := sync.OnceFunc(func() { close(listed) })
		for ev := range events {
			now := time.Now()
			if ev.Type == kvstore.EventListDone {
				once()
				continue
			}
			m.mu.Lock()
			if s, ok := m.pending[ev.Key]; ok && now.After(s.start) {
				seen := !s.state.live && ev.Type == kvstore.EventDelete
				if s.state.live && ev.Type == kvstore.EventUpsert {
					e, err := records.DecodeIPCacheEntry(ev.Value)
					seen = err == nil && e.Identity == s.state.id && e.HostIP == s.state.host
				}
				if seen {
					m.lat = append(m.lat, now.Sub(s.start))
					delete(m.pending, ev.Key)
				}
			}
			m.mu.Unlock()
		}
	}()
	select {
	case <-listed:
		return m, nil
	case <-time.After(2 * time.Minute):
	case <-ctx.Done():
	}
	m.stop()
	return nil, fmt.Errorf("the watch of %s in c1's etcd did not list it", prefix)
}

// expect registers a timed change before it is written.
func (m *mirrorWatch) expect(st churnState, start time.Time) {
	stateKey := records.IPCacheKey(m.cluster, m.node, netip.PrefixFrom(st.addr, st.addr.BitLen()))
	key, err := records.CacheKey(stateKey, m.cluster)
	if err != nil {
		return
	}
	m.mu.Lock()
	m.pending[key] = churnSample{state: st, start: start}
	m.mu.Unlock()
}

// result returns the latencies seen and how many timed changes were not.
func (m *mirrorWatch) result() ([]time.Duration, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.lat), len(m.pending)
}

func (m *mirrorWatch) stop() {
	m.cancel()
	<-m.done
}
