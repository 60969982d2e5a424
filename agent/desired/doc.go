// Package desired holds the agent's desired state as the reconcilers read
// it: one snapshot per run (State) made of the local endpoints, the applied
// objects, the identities, the node's addresses and the mesh's part.
//
// Sources (the local API, the cluster's etcd) write it, and check a batch
// of objects here before it joins (ValidateBatch, CheckServiceConflicts,
// PlanApply); reconcilers (agent/datapath, agent/routes,
// agent/encryption) only read it. Nothing here touches the kernel.
package desired
