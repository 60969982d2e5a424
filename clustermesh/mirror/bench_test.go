package mirror_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
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
	c2 := servertest.Start(t, "c2", 2, "10.2.0.0/16", "fd00:2::/48")
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
}
