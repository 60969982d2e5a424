// Package kvstore is the project's one etcd client wrapper.
//
// Every other package talks to etcd through a *Client: plain reads and
// writes with retries, compare-and-swap creation (CreateOnly, Txn), leases
// that are re-granted when lost (Lease.OnRegrant tells the owner to re-put
// its keys), and WatchPrefix, a list-then-watch stream that re-lists after
// any watch failure and synthesises deletions for keys that vanished in
// between, so that consumers never keep stale state.
//
// Counters are read with Client.Stats; Config.Metrics exports them (with
// latency histograms) to Prometheus as isthmus_kvstore_*.
package kvstore
