package agent

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/datapath"
	"github.com/isthmus-mesh/isthmus/agent/internal/agenttest"
)

// An endpoint add waits for the datapath loop (the maps that enforce its
// identity and policy), not for the follow-up steps (routes, tunnels,
// device sizes, BGP, north-south): while a follow-up run hangs, adds still
// return, with their endpoint in the endpoints map and under policy.
func TestAddDoesNotWaitForFollowUp(t *testing.T) {
	ctx := context.Background()
	dp, plumb := agenttest.NewFakeDatapath(), agenttest.NewFakePlumber()
	a, err := New(testConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	a.plumb = plumb
	a.openDatapath = func(Config) (datapath.Datapath, error) { return dp, nil }
	a.nodeAddrs = func() ([]netip.Addr, error) { return []netip.Addr{nodeIP}, nil }
	var hang atomic.Bool
	hanging, release := make(chan struct{}, 1), make(chan struct{})
	a.beforeFollowUp = func() {
		if hang.Load() {
			select {
			case hanging <- struct{}{}:
			default:
			}
			<-release
		}
	}
	c, _ := launch(t, a)
	t.Cleanup(func() { close(release) })
	if _, err := c.Apply(ctx, []byte(serverPolicy)); err != nil {
		t.Fatal(err)
	}

	hang.Store(true)
	if _, err := c.AddEndpoint(ctx, api.EndpointRequest{Name: "first", Netns: "/netns/first", Labels: map[string]string{"app": "client"}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-hanging:
	case <-time.After(10 * time.Second):
		t.Fatal("no follow-up run after the first add")
	}

	done := make(chan error, 1)
	var web api.Endpoint
	go func() {
		var err error
		web, err = c.AddEndpoint(ctx, api.EndpointRequest{Name: "web", Netns: "/netns/web", Labels: map[string]string{"app": "web"}})
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("an add waited for a hanging follow-up run")
	}
	// Enforced when the add returned: its endpoint entry, with policy on.
	eps, err := dp.EndpointList()
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range web.IPs {
		info, ok := eps[ip]
		if !ok || info.ID != web.ID || info.Identity != web.Identity {
			t.Errorf("endpoint entry of %s after the add: %+v, %v; want ID %d, identity %d", ip, info, ok, web.ID, web.Identity)
		}
		if !info.PolicyIngress {
			t.Errorf("endpoint %s is not under its ingress policy after the add: %+v", ip, info)
		}
	}
}
