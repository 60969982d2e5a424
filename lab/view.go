package lab

import (
	"context"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
)

// View is the lab with every agent's live status: what `isthmus lab
// status` shows (-o json prints it as is).
type View struct {
	State        *State               `json:"state"`
	Problems     []string             `json:"problems"` // Check's: what keeps the mesh from being ready
	Nodes        []NodeView           `json:"nodes"`
	Connectivity *connectivity.Report `json:"connectivity,omitempty"` // set by `lab up`
}

// NodeView is one agent's status, or why it could not be read.
type NodeView struct {
	Cluster string      `json:"cluster"`
	Node    string      `json:"node"`
	Socket  string      `json:"socket"`
	Error   string      `json:"error,omitempty"`
	Status  *api.Status `json:"status,omitempty"`
}

// View asks every agent for its status (in parallel) and runs Check.
func (s *State) View(ctx context.Context) View {
	v := View{State: s, Problems: s.Check(ctx)}
	nodes := s.Nodes()
	v.Nodes = make([]NodeView, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			nv := NodeView{Cluster: n.Cluster, Node: n.Name, Socket: n.Socket}
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			st, err := api.NewClient(n.Socket).Status(cctx)
			if err != nil {
				nv.Error = err.Error()
			} else {
				nv.Status = &st
			}
			v.Nodes[i] = nv
		})
	}
	wg.Wait()
	return v
}
