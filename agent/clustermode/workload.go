package clustermode

import (
	"context"
	"net/netip"

	"github.com/isthmus-mesh/isthmus/agent/desired"
	"github.com/isthmus-mesh/isthmus/agent/meshsync"
	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// Workload is the host's own endpoint on an external workload's agent
// (isthmus-agent --join, docs/vms.md): its addresses, which are its node's
// whole "pod CIDRs", under the identity of its labels. It is published like
// a pod's endpoint, so every node's ipcache maps the addresses to that
// identity and policies select the host by its labels.
type Workload struct {
	Name, Namespace string
	Labels          identity.Labels // without isthmus.io/ labels
	IPs             []netip.Addr
}

// WorkloadIdentity returns the host's identity (0 until allocated).
func (m *Mesh) WorkloadIdentity() uint32 {
	if m == nil {
		return 0
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.workloadID
}

// referenceWorkload allocates (references) the host's identity when this
// process holds none, as referenceIdentities does for pods. It reports
// whether the identity changed.
func (m *Mesh) referenceWorkload(ctx context.Context, alloc *identity.Etcd) bool {
	w := m.cfg.Workload
	if w == nil {
		return false
	}
	cur := m.WorkloadIdentity()
	if cur != 0 && alloc.Holds(cur) {
		return false
	}
	actx, cancel := context.WithTimeout(ctx, allocateTimeout)
	id, err := alloc.Allocate(actx, desired.IdentityLabels(m.cfg.Local.Cluster, w.Namespace, w.Labels))
	cancel()
	if err != nil {
		m.log.Warn("clustermesh: cannot allocate the host's identity; retrying", "err", err)
		return false
	}
	m.mu.Lock()
	m.workloadID = id
	m.mu.Unlock()
	m.log.Info("clustermesh: external workload identity", "identity", id, "addresses", w.IPs)
	return id != cur
}

// workloadLabels are the labels of the node record: the external
// workload's mark, nil on a node.
func (m *Mesh) workloadLabels() map[string]string {
	if m.cfg.Workload == nil {
		return nil
	}
	return map[string]string{records.LabelExternalWorkload: "true"}
}

// workloadEndpoint is the host's endpoint as published (none until its
// identity is allocated).
func (m *Mesh) workloadEndpoint() []meshsync.Endpoint {
	w := m.cfg.Workload
	id := m.WorkloadIdentity()
	if w == nil || id == 0 {
		return nil
	}
	return []meshsync.Endpoint{{Name: w.Name, Namespace: w.Namespace, IPs: w.IPs, Identity: id}}
}
