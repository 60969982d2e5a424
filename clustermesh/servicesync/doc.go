// Package servicesync is the clustermesh server's service syncer: it
// publishes the cluster's Services for remote clusters.
//
// It watches, in the cluster's own etcd, the applied Services
// (isthmus/config/Service/<ns>/<name>), the cluster's ipcache
// (isthmus/state/ip/v1/<cluster>/) and identities
// (isthmus/state/identities/v1/id/, the cluster's ID range), and keeps
// isthmus/state/services/v1/<cluster>/<ns>/<name> equal to what they say:
//
//   - frontends: every VIP x port (protocol, port name);
//   - backends: for every port, the target port on each address of the
//     endpoints of the service's namespace whose identity labels contain
//     the selector (an endpoint's namespace is its identity's
//     isthmus.io/namespace label), plus the explicit backends; only
//     addresses of a family the service has a VIP of; sorted, deduplicated,
//     each carrying the cluster;
//   - global, shared, affinity from the annotations isthmus.io/global,
//     isthmus.io/shared (default true when global) and isthmus.io/affinity
//     (local|remote|none). Annotations that do not parse are logged and the
//     service is published as not global.
//
// Records of services that are gone (or no longer valid) are deleted.
//
// The work is incremental (index.go): label indexes lead from an endpoint
// to the services that select its identity and from a service to the
// identities and endpoints it selects, so a changed endpoint or identity
// rebuilds only the records of the services that select it (before or
// after), a changed Service only its own, and only the record keys so
// touched (or written by someone else) are compared with etcd. Writes
// start only once every watched prefix has been listed (the first one
// compares every key of the output prefix, deleting records of services
// that are gone), write only what differs (idempotent: an unchanged record
// is never rewritten), in transactions of at most 128 operations, and are
// at least Debounce apart: a change after a quiet spell is written at once,
// together with the changes already queued; a flood is written in
// batches, one per Debounce.
//
// Agents compute their own cluster's backends directly; these records are
// for the other clusters, which receive them through their mirrors.
package servicesync
