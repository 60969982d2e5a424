package mirror

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// BenchmarkKindMirrorList measures the mirror's own cost per record of a
// first list of ipcache entries: validation, the gate, the bookkeeping and
// the batched writes into a real embedded etcd (fsync off: the CPU cost is
// what is measured). One op is one record.
func BenchmarkKindMirrorList(b *testing.B) {
	const n = 20_000
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := etcdserver.Start(ctx, etcdserver.Config{
		ClusterName: "c1", ClusterID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")},
		DataDir: filepath.Join(b.TempDir(), "c1"), ListenClient: etcdtest.FreeAddr(b), ListenPeer: etcdtest.FreeAddr(b),
		UnsafeNoFsync: true, Logger: log,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { srv.Close() })
	m, err := New(Config{Local: srv.ClusterConfig(), Client: srv.Client(), Logger: log, MaxIPCachePerRemote: -1})
	if err != nil {
		b.Fatal(err)
	}
	rcfg := records.ClusterConfig{Version: records.CurrentVersion, Name: "c2", ID: 2,
		PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/16"), netip.MustParsePrefix("fd00:2::/48")}}
	evs := make([]kvstore.Event, n)
	host := netip.MustParseAddr("192.168.0.2")
	for i := range evs {
		p := netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 2, 15: byte(i), 14: byte(i >> 8), 13: byte(i >> 16)}), 128)
		v, err := records.IPCacheEntry{Prefix: p, Identity: 2<<20 | 1, HostIP: host, Cluster: "c2",
			OwnerName: "bench-" + strconv.Itoa(i), OwnerNamespace: "default"}.Marshal()
		if err != nil {
			b.Fatal(err)
		}
		evs[i] = kvstore.Event{Type: kvstore.EventUpsert, Key: records.IPCacheKey("c2", "n1", p), Value: v}
	}
	r := newRemote(m, Remote{Name: "c2", ClusterID: 2}, newStatusBox("c2"))
	b.ResetTimer()
	for i := 0; i < b.N; i += n {
		sg := newSessionGate("c2", rcfg, m.cfg.limits())
		close(sg.nodesListed)
		km := newKindMirror(r, records.KindIP, 2, sg)
		for _, ev := range evs {
			if err := km.handle(ctx, ev); err != nil {
				b.Fatal(err)
			}
		}
		if err := km.handle(ctx, kvstore.Event{Type: kvstore.EventListDone}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if _, err := srv.Client().DeletePrefix(ctx, km.dst); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
