// Package meshsync is the etcd side of the agent's cluster mode: what a
// node publishes into its cluster's etcd and what it reads back from it.
//
//	etcd (own cluster's server)                 agent
//	───────────────────────────                 ─────
//	isthmus/cluster-config/<c>        ─┐
//	isthmus/state/{nodes,ip,services} ─┤  Watch ─▶ Tables (typed, validated,
//	isthmus/state/identities/v1/id/   ─┤           per cluster; remote state
//	isthmus/cache/<kind>/v1/<remote>/ ─┤           gated by sync canaries)
//	isthmus/synced/<remote>/...       ─┤              │ View, Objects
//	isthmus/config/<Kind>/<ns>/<name> ─┘              ▼
//	                                             the agent's reconciler
//	isthmus/state/nodes/v1/<c>/<node> ◀─┐
//	isthmus/state/ip/v1/<c>/<ip>      ◀─┴ Publisher (leased; everything put
//	                                      again when the lease is re-granted)
//
// Watchers are sources of desired state only: they never touch the kernel.
// Every value is decoded with the records (or objects) package and checked
// against its key and the cluster it belongs to; a bad one is logged,
// counted and skipped, and the rest keeps flowing. Node, ipcache and
// service records of every cluster, the own one included, then pass the
// cluster's records.Gate: only what the cluster owns reaches View (so
// routes and WireGuard AllowedIPs come only from accepted node pod CIDRs);
// refusals are logged and counted once per key and reason (Refusals), and
// re-decided when the cluster config or the node set changes. A remote cluster's state
// of a kind is used only once its canary isthmus/synced/<remote>/<kind>
// exists and its cluster-config (for the ID to validate against) is known.
//
// Losing etcd changes nothing here: the tables keep what they have, and the
// kvstore watcher's re-list after a reconnect reports what vanished.
package meshsync
