package desired

import (
	"github.com/isthmus-mesh/isthmus/clustermesh/lbipam"
)

// AllocateLB runs LB-IPAM over objs in standalone mode: the allocator
// starts from prev (the assignments in use) and the result is filled
// into the services' and pools' status. It returns the objects with the
// status and the new assignments (for the state dir).
func AllocateLB(objs Objects, prev map[string]lbipam.Assignment) (Objects, map[string]lbipam.Assignment) {
	svcs, pools := lbipam.Inputs(objs)
	res := lbipam.Allocate(pools, svcs, prev)
	out, _ := lbipam.ApplyStatus(objs, res.Assignments)
	return Objects(out), res.Assignments
}

// WithLBStatus fills stored assignments into objs without allocating
// (cluster mode: the server allocates; until etcd is read, the copy in
// the state dir stands in).
func WithLBStatus(objs Objects, asg map[string]lbipam.Assignment) Objects {
	out, _ := lbipam.ApplyStatus(objs, asg)
	return Objects(out)
}
