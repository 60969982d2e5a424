package kvstore

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
)

func TestMetrics(t *testing.T) {
	ctx := testCtx(t)
	m := NewMetrics()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	c, err := Connect(ctx, Config{Endpoints: []string{etcdtest.Start(t).Endpoint}, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})

	// Every operation is exported before it was ever called.
	fams := promtest.Scrape(t, h)
	for _, op := range opNames {
		if v := fams.Must(t, "isthmus_kvstore_operations_total", "operation", op); v != 0 && op != "status" {
			t.Errorf("%s calls before any = %v", op, v)
		}
	}
	for name, f := range fams {
		if !strings.HasPrefix(name, "isthmus_kvstore_") || f.GetHelp() == "" {
			t.Errorf("family %s: want the isthmus_kvstore_ prefix and a HELP text", name)
		}
	}

	for range 3 {
		if err := c.Put(ctx, "m/a", []byte("1")); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := c.Get(ctx, "m/a"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateOnly(ctx, "m/b", []byte("x")); err != nil {
		t.Fatal(err)
	}
	// A call that fails counts as an error of its operation.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := c.Get(cctx, "m/a"); err == nil {
		t.Fatal("Get with a cancelled context succeeded")
	}
	wctx, stopWatch := context.WithCancel(ctx)
	ch := c.WatchPrefix(wctx, "m/")
	for ev := range ch {
		if ev.Type == EventListDone {
			break
		}
	}

	fams = promtest.Scrape(t, h)
	for _, c := range []struct {
		name  string
		label []string
		want  float64
	}{
		{"isthmus_kvstore_operations_total", []string{"operation", "put"}, 3},
		{"isthmus_kvstore_operations_total", []string{"operation", "get"}, 2},
		{"isthmus_kvstore_operation_errors_total", []string{"operation", "get"}, 1},
		{"isthmus_kvstore_operation_errors_total", []string{"operation", "put"}, 0},
		{"isthmus_kvstore_operations_total", []string{"operation", "txn"}, 1},
		{"isthmus_kvstore_operations_total", []string{"operation", "get_prefix"}, 1},
		{"isthmus_kvstore_operation_duration_seconds", []string{"operation", "put"}, 3}, // sample count
		{"isthmus_kvstore_watches", nil, 1},
		{"isthmus_kvstore_watch_events_total", nil, 2},
	} {
		if got := fams.Must(t, c.name, c.label...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.label, got, c.want)
		}
	}
	if got := fams.Must(t, "isthmus_kvstore_operations_total", "operation", "status"); got < 1 {
		t.Errorf("Connect's probe was not counted: status calls = %v", got)
	}
	// The Stats snapshot and the metrics count the same calls.
	if s := c.Stats(); s.Ops["put"].Count != 3 || s.Ops["get"].Errors != 1 {
		t.Errorf("Stats = %+v", s.Ops)
	}

	stopWatch()
	for range ch {
	}
	deadline := time.Now().Add(5 * time.Second)
	for promtest.Scrape(t, h).Must(t, "isthmus_kvstore_watches") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("isthmus_kvstore_watches still counts a stopped watch")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
