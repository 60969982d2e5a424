package lab

import (
	"context"
	"fmt"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
)

// ConnectivityTarget describes the lab for the connectivity test: its
// nodes with each agent's current status, its echo and denied pods, the
// global service and the encryption. It changes nothing in the lab.
func (s *State) ConnectivityTarget(ctx context.Context) (*connectivity.Target, error) {
	if !s.Ready {
		return nil, fmt.Errorf("lab %s is still being built (or its 'lab up' died: 'isthmus lab down' removes it)", s.Prefix)
	}
	t := &connectivity.Target{Name: "lab " + s.Prefix, VIPs: s.Service.VIPs, Port: s.Service.Port, Encryption: s.Encryption}
	for _, n := range s.Nodes() {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := api.NewClient(n.Socket).Status(cctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("agent of %s: %w", n.Name, err)
		}
		t.Nodes = append(t.Nodes, connectivity.Node{Name: n.Name, Cluster: n.Cluster, Socket: n.Socket, Netns: NetnsPath(n.Netns), IPs: n.IPs, Status: st})
	}
	for _, p := range s.Pods {
		t.Pods = append(t.Pods, connectivity.Pod{Name: p.Name, Cluster: p.Cluster, Node: p.Node, Netns: NetnsPath(p.Netns), IPs: p.Addrs(), Role: p.Role})
	}
	for _, v := range s.VMs {
		t.Hosts = append(t.Hosts, connectivity.Host{Name: v.Name, Cluster: v.Cluster, Netns: NetnsPath(v.Netns), IPs: v.IPs})
	}
	for _, o := range s.Outside {
		t.Outside = append(t.Outside, connectivity.OutsideClient{Name: o.Name, Cluster: o.Cluster, Netns: NetnsPath(o.Netns), Addrs: o.Addrs, Via: o.Via})
	}
	return t, nil
}
