// Package service owns the resolution of Services into datapath entries:
// every frontend (VIP x port) with the backends it load-balances to.
//
// Contract:
//
//	type Endpoint struct { Namespace string; Labels identity.Labels; IPs []netip.Addr }
//	func Resolve(svcs []objects.Service, eps []Endpoint) map[bpf.Frontend][]bpf.Backend
//	func NewResolver() *Resolver  // Resolve + Merge, kept up to date per change
//
// Backends of a frontend are the addresses of the endpoints in the
// service's namespace whose labels contain the selector (only when the
// selector is non-empty), plus the explicit backends, keeping only addresses
// of the VIP's family. The backend port is the target port (default: the
// service port). Backends are deduplicated and sorted by address, then port.
// A frontend without backends is still present, with an empty slice, so the
// datapath drops its traffic as "no backend" instead of passing it on.
//
// Backend.ClusterID is left 0 (local); global services fill it in:
//
//	func GlobalOf(svc objects.Service) (Global, error)  // isthmus.io/global, shared, affinity
//	func Merge(local map[bpf.Frontend][]bpf.Backend, svcs []objects.Service, remote []records.ServiceRecord) map[bpf.Frontend][]bpf.Backend
//
// Merge adds, per frontend of a global service, the backends of other
// clusters' records of the same namespace/name that are global and shared
// (matched by protocol and port name, same address family, with their
// cluster ID), then applies affinity: local (remote only while no local
// backend exists), remote (the inverse) or none (all).
// Services that fail validation contribute nothing. Two services that claim
// the same frontend (objects.CheckConflicts keeps that from happening) are
// resolved deterministically: the one whose namespace/name sorts first wins.
package service
