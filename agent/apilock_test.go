package agent

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
	"github.com/isthmus-mesh/isthmus/internal/etcdtest"
)

// With etcd unreachable and an endpoint add waiting for its identity in
// etcd, the reads answer at once (status, endpoint list, get, identities)
// and the API lock does not queue other pods behind it: an add whose
// identity the node already references, and a delete, complete while the
// first add still waits. When etcd is back, the waiting add completes.
func TestClusterModeAPIWhileEtcdUnreachable(t *testing.T) {
	ctx := context.Background()
	e := etcdtest.Start(t)
	writeClusterConfig(t, kvClient(t, e), "c1", 1, "10.1.0.0/16", "fd00:1::/32")
	proxy := etcdtest.StartProxy(t, strings.TrimPrefix(e.Endpoint, "http://"))
	cfg := meshConfig(t, e, "node1", "192.0.2.11", "10.1.1.0/24", "fd00:1:1::/64")
	cfg.KVStoreEndpoints = []string{"http://" + proxy.Addr}
	n := startMesh(t, cfg, agenttest.NewFakeDatapath(), agenttest.NewFakePlumber())
	n.meshSynced(t)
	web1, err := n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web1", Netns: "/netns/web1", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.client.Apply(ctx, []byte(globalWeb)); err != nil {
		t.Fatal(err)
	}

	proxy.Cut()
	slow := make(chan error, 1)
	go func() {
		_, err := n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "slow", Netns: "/netns/slow", Labels: map[string]string{"app": "new"}})
		slow <- err
	}()
	time.Sleep(500 * time.Millisecond) // the add is waiting for etcd now
	pending := func(what string) {
		t.Helper()
		select {
		case err := <-slow:
			t.Fatalf("%s: the add that needs etcd returned while etcd is cut: %v", what, err)
		default:
		}
	}
	pending("before the reads")

	within := func(what string, d time.Duration, f func() error) {
		t.Helper()
		start := time.Now()
		err := f()
		if took := time.Since(start); took > d {
			t.Errorf("%s took %s with etcd unreachable and an add in flight; want < %s", what, took.Round(time.Millisecond), d)
		}
		if err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
	within("status", time.Second, func() error {
		st, err := n.client.Status(ctx)
		if err == nil && (st.Endpoints != 1 || st.Services != 1) {
			err = fmt.Errorf("status counts %d endpoints, %d services; want 1, 1", st.Endpoints, st.Services)
		}
		return err
	})
	within("endpoint list", time.Second, func() error {
		eps, err := n.client.ListEndpoints(ctx)
		if err == nil && (len(eps) != 1 || eps[0].Name != "web1") {
			err = fmt.Errorf("endpoints %+v; want web1", eps)
		}
		return err
	})
	within("get (object list)", time.Second, func() error {
		objs, err := n.client.ListObjects(ctx, "")
		if err == nil && (len(objs) != 1 || objs[0].Name != "web") {
			err = fmt.Errorf("objects %+v; want service web", objs)
		}
		return err
	})
	within("identities", time.Second, func() error {
		_, err := n.client.Identities(ctx)
		return err
	})
	// Another pod with labels the node references already: no etcd round
	// trip, and not queued behind the add that waits for etcd.
	var web2 api.Endpoint
	within("add of a pod whose identity is known", 2*time.Second, func() error {
		var err error
		web2, err = n.client.AddEndpoint(ctx, api.EndpointRequest{Name: "web2", Netns: "/netns/web2", Labels: map[string]string{"app": "web"}})
		if err == nil && web2.Identity != web1.Identity {
			err = fmt.Errorf("web2 has identity %d, web1 %d", web2.Identity, web1.Identity)
		}
		return err
	})
	within("delete of another pod", 2*time.Second, func() error {
		return n.client.DeleteEndpoint(ctx, "default", "web2")
	})
	pending("after the reads and the other pod's add and delete")

	proxy.Restore()
	select {
	case err := <-slow:
		if err != nil {
			t.Fatalf("the add that waited for etcd: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the add that waited for etcd did not complete after etcd came back")
	}
	eps, err := n.client.ListEndpoints(ctx)
	if err != nil || len(eps) != 2 {
		t.Fatalf("endpoints after etcd came back: %+v, %v", eps, err)
	}
}
