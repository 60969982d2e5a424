package mirror_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
)

// TestBenchMirror measures the mirror alone (two servers in this process,
// the mirroring one with fsync on): a full sync of 100,000 ipcache entries
// and the propagation of single changes. It runs only with ISTHMUS_BENCH=1
// and prints `bench:` lines.
// cpuTime returns the CPU time (user and system) this process used so far.
func cpuTime(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestBenchMirror(t *testing.T) {
	if os.Getenv("ISTHMUS_BENCH") == "" {
		t.Skip("set ISTHMUS_BENCH=1 to run")
	}
	const n = 100_000
	c1 := servertest.New(t, "c1", 1, "10.1.0.0/16")
	c1.Config.Server.UnsafeNoFsync = false
	c1.Config.Mirror.MaxIPCachePerRemote = -1 // n is past the default cap
	c1.Start(t)
	// IPv6 endpoints: c2's IPv4 /16 holds fewer than n.
	// c2 with fsync on too, as a real remote: a change's way is two commits.
	c2 := servertest.New(t, "c2", 2, "10.2.0.0/16", "fd00:2::/48")
	c2.Config.Server.UnsafeNoFsync = false
	c2.Start(t)
	ctx := context.Background()
	var ops []kvstore.Op
	for i := range n {
		p := netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 2, 15: byte(i), 14: byte(i >> 8), 13: byte(i >> 16)}), 128)
		v := marshal(t, records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 1, HostIP: netip.MustParseAddr("192.168.0.2"), Cluster: "c2"})
		ops = append(ops, kvstore.OpPut(records.IPCacheKey("c2", "n1", p), v))
		if len(ops) == 128 || i == n-1 {
			if _, err := c2.KV().Txn(ctx, nil, ops); err != nil {
				t.Fatal(err)
			}
			ops = nil
		}
	}
	cpu0 := cpuTime(t)
	start := time.Now()
	servertest.Connect(t, c1, c2)
	// The canary is written after the complete first list (what agents
	// wait for); the status is checked after it.
	servertest.Eventually(t, 2*time.Minute, "canary", func() error {
		if _, found, err := c1.KV().Get(ctx, records.SyncedKey("c2", records.KindIP)); err != nil || !found {
			return fmt.Errorf("no canary yet (%v)", err)
		}
		return nil
	})
	took := time.Since(start)
	cpu := cpuTime(t) - cpu0
	servertest.Eventually(t, 2*time.Minute, "full sync", func() error {
		st, err := status(c1, "c2")
		if err != nil || !st.Synced.Endpoints || st.Endpoints != n {
			return fmt.Errorf("status %+v %v", st, err)
		}
		return nil
	})
	fmt.Printf("bench: mirror-full-sync-%d %.2f s\n", n, took.Seconds())
	fmt.Printf("bench: mirror-full-sync-cpu-%d %.2f s (both servers, this process)\n", n, cpu.Seconds())

	var lat []time.Duration
	for i := range 200 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 2, 9, byte(i)}), 32)
		key := records.IPCacheKey("c2", "n1", p)
		ck, _ := records.CacheKey(key, "c2")
		s := time.Now()
		put(t, c2.KV(), key, marshal(t, records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 1, Cluster: "c2"}))
		for {
			if _, found, _ := c1.KV().Get(ctx, ck); found {
				break
			}
			if time.Since(s) > 10*time.Second {
				t.Fatalf("change %d: %s not mirrored after 10s", i, ck)
			}
		}
		lat = append(lat, time.Since(s))
	}
	slices.Sort(lat)
	fmt.Printf("bench: mirror-propagation-p50 %.1f ms\n", float64(lat[len(lat)/2])/1e6)
	fmt.Printf("bench: mirror-propagation-p99 %.1f ms\n", float64(lat[len(lat)*99/100])/1e6)
	benchMirrorChurn(t, c1, c2)
}

// benchMirrorChurn writes 1,000 changes per second into c2 (32 writers,
// one put or delete each, paced open loop) for ISTHMUS_BENCH_CHURN
// seconds (default 10) and times each from just before its write until a
// watch on c1's cache sees it: the mirror's share of the mesh bench's
// churn figure.
func benchMirrorChurn(t *testing.T, c1, c2 *servertest.Cluster) {
	secs := 10
	if v := os.Getenv("ISTHMUS_BENCH_CHURN"); v != "" {
		if _, err := fmt.Sscan(v, &secs); err != nil {
			t.Fatalf("ISTHMUS_BENCH_CHURN=%q: %v", v, err)
		}
	}
	const rate = 1000
	total := secs * rate
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	key := func(i int) (string, string, []byte) {
		p := netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 2, 0, 0, 0, 1, 15: byte(i), 14: byte(i >> 8), 13: byte(i >> 16)}), 128)
		k := records.IPCacheKey("c2", "n1", p)
		ck, _ := records.CacheKey(k, "c2")
		return k, ck, marshal(t, records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 1, HostIP: netip.MustParseAddr("192.168.0.2"), Cluster: "c2"})
	}
	var mu sync.Mutex
	started := map[string]time.Time{}
	var lat, writeLat []time.Duration
	events := c1.KV().WatchPrefix(ctx, records.CachePrefix(records.KindIP, "c2"))
	for ev := range events { // the list of what is there first
		if ev.Type == kvstore.EventListDone {
			break
		}
	}
	go func() {
		for ev := range events {
			now := time.Now()
			mu.Lock()
			if s, ok := started[ev.Key]; ok {
				lat = append(lat, now.Sub(s))
				delete(started, ev.Key)
			}
			mu.Unlock()
		}
	}()
	// The changes: 1,500 adds, then in turn an add and a delete of the
	// oldest key left.
	type change struct {
		n   int // the key's number
		del bool
	}
	plan := make([]change, total)
	added, deleted := 0, 0
	for i := range plan {
		if i < 1500 || i%2 == 0 {
			plan[i] = change{n: added}
			added++
		} else {
			plan[i] = change{n: deleted, del: true}
			deleted++
		}
	}
	ops := make(chan change, 1024)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for c := range ops {
				k, ck, v := key(c.n)
				start := time.Now()
				mu.Lock()
				started[ck] = start
				mu.Unlock()
				var err error
				if c.del {
					err = c2.KV().Delete(ctx, k)
				} else {
					err = c2.KV().Put(ctx, k, v)
				}
				if err != nil {
					t.Errorf("change %+v: %v", c, err)
				}
				mu.Lock()
				writeLat = append(writeLat, time.Since(start))
				mu.Unlock()
			}
		})
	}
	t0 := time.Now()
	for i, c := range plan {
		time.Sleep(time.Until(t0.Add(time.Duration(i) * time.Second / rate)))
		ops <- c
	}
	close(ops)
	wg.Wait()
	wrote := time.Since(t0)
	time.Sleep(2 * time.Second)
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lat)
	fmt.Printf("bench: mirror-churn-p50 %.1f ms (%d changes in %s, %d timed, %d not seen)\n",
		float64(lat[len(lat)/2])/1e6, total, wrote.Round(time.Millisecond), len(lat), len(started))
	fmt.Printf("bench: mirror-churn-p99 %.1f ms\n", float64(lat[len(lat)*99/100])/1e6)
	fmt.Printf("bench: mirror-churn-max %.1f ms\n", float64(lat[len(lat)-1])/1e6)
	slices.Sort(writeLat)
	fmt.Printf("bench: mirror-churn-c2-write-p50 %.1f ms (of which the write into c2's etcd; p99 %.1f ms)\n",
		float64(writeLat[len(writeLat)/2])/1e6, float64(writeLat[len(writeLat)*99/100])/1e6)
}
