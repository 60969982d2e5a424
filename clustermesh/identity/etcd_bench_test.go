package identity

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// BenchmarkEtcdAllocate measures identity allocations per second with 10
// concurrent allocators (each its own kvstore client and node name, as 10
// agents) against one embedded etcd (etcdtest: plain HTTP, no fsync).
// `make bench` (scripts/bench.sh) runs it with a fixed -benchtime Nx and
// turns the allocs/s metrics into bench: lines.
//
//   - new: every call allocates a label set nobody has (create: master,
//     claim and the node's reference in one transaction).
//   - existing: every call allocates a label set another node created
//     (join: read the claim and the master, then a transaction for the
//     node's reference).
//   - racing: all 10 allocators allocate the same new label sets at once
//     (one creates, nine join or retry); counted per call.
//
// A call for labels this node already references is a local reference
// count and never reaches etcd; it is not measured here.
func BenchmarkEtcdAllocate(b *testing.B) {
	const allocators = 10
	etcd := etcdtest.Start(b)
	as := make([]*Etcd, allocators)
	for i := range as {
		kv, err := kvstore.Connect(context.Background(), kvstore.Config{
			Endpoints: []string{etcd.Endpoint}, BackoffMin: 5 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
		})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { kv.Close() })
		if as[i], err = NewEtcd(kv, "c1", 3, fmt.Sprintf("node-%d", i), WithLeaseTTL(time.Minute)); err != nil {
			b.Fatal(err)
		}
	}
	ctx := context.Background()
	var round atomic.Int64 // label sets are unique across b.N rounds
	labels := func(kind string, r int64, i int) Labels {
		return Labels{"app": fmt.Sprintf("%s-%d-%d", kind, r, i), LabelNamespace: "default", LabelCluster: "c1"}
	}
	// run calls f(allocator, k) for k in [0, n) split over the allocators,
	// all at once, and fails the benchmark on the first error.
	run := func(b *testing.B, n int, f func(a int, k int) error) {
		var wg sync.WaitGroup
		var failed atomic.Value
		for a := range allocators {
			wg.Go(func() {
				for k := a; k < n; k += allocators {
					if err := f(a, k); err != nil {
						failed.CompareAndSwap(nil, err)
						return
					}
				}
			})
		}
		wg.Wait()
		if err := failed.Load(); err != nil {
			b.Fatal(err)
		}
	}
	conflicts := func() (n uint64) {
		for _, a := range as {
			n += a.Stats().Conflicts
		}
		return n
	}
	// report gives the rate of calls and the transactions lost to another
	// writer since conflicts0 (each one a retried round).
	report := func(b *testing.B, calls int, conflicts0 uint64) {
		b.ReportMetric(float64(calls)/b.Elapsed().Seconds(), "allocs/s")
		b.ReportMetric(float64(conflicts()-conflicts0), "conflicts")
	}

	b.Run("new", func(b *testing.B) {
		r := round.Add(1)
		c0 := conflicts()
		b.ResetTimer()
		run(b, b.N, func(a, k int) error {
			_, err := as[a].Allocate(ctx, labels("new", r, k))
			return err
		})
		b.StopTimer()
		report(b, b.N, c0)
	})

	b.Run("existing", func(b *testing.B) {
		r := round.Add(1)
		// Label set k is created by allocator k%10 (untimed) and joined by
		// allocator (k+1)%10 (timed).
		b.StopTimer()
		run(b, b.N, func(a, k int) error {
			_, err := as[a].Allocate(ctx, labels("existing", r, k))
			return err
		})
		c0 := conflicts()
		b.StartTimer()
		run(b, b.N, func(a, k int) error {
			_, err := as[(a+1)%allocators].Allocate(ctx, labels("existing", r, k))
			return err
		})
		b.StopTimer()
		report(b, b.N, c0)
	})

	b.Run("racing", func(b *testing.B) {
		r := round.Add(1)
		sets := max(1, b.N/allocators)
		c0 := conflicts()
		b.ResetTimer()
		var wg sync.WaitGroup
		var failed atomic.Value
		for a := range allocators {
			wg.Go(func() {
				for k := range sets {
					if _, err := as[a].Allocate(ctx, labels("racing", r, k)); err != nil {
						failed.CompareAndSwap(nil, err)
						return
					}
				}
			})
		}
		wg.Wait()
		b.StopTimer()
		if err := failed.Load(); err != nil {
			b.Fatal(err)
		}
		report(b, sets*allocators, c0)
	})
}
