package agent

import "github.com/isthmus-mesh/isthmus/agent/desired"

func (a *Agent) objects() desired.Objects {
	// In cluster mode etcd is the source once it was listed; until then
	// the objects persisted by the last run keep the datapath as it was.
	if objs, ok := a.mesh.Objects(); ok {
		return objs
	}
	return a.objSet.Get()
}
