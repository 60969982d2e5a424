// Package mirror copies the state of remote clusters into the local
// cluster's etcd, so that agents only ever watch their own etcd.
//
// The Manager watches isthmus/remotes/<cluster> (records written by
// `isthmus clustermesh connect`, decoded strictly by DecodeRemote: a remote
// cluster's name, ID, endpoints, CA and a client certificate for the
// read-only etcd user remote-<local>). For each remote it:
//
//  1. connects with the record's credentials (jittered exponential backoff
//     between attempts);
//  2. reads the remote's isthmus/cluster-config/<remote> and refuses the
//     cluster — logged at error level, shown in its status, nothing
//     mirrored and any earlier cache deleted — if it names another cluster
//     or ID than the record, or conflicts (records.CheckClusterConflicts:
//     same name or ID, overlapping pod CIDRs) with the local cluster or with
//     another accepted remote. Check and claim are one step, so two remotes
//     with the same ID are never both accepted; a refused remote is retried
//     with backoff, since the conflict may go away. The rest of the mesh is
//     untouched;
//  3. copies the remote's cluster config to the local etcd (agents
//     validate mirrored records against its ID), then watches the remote's
//     isthmus/state/{nodes,ip,services}/v1/<remote>/ and
//     isthmus/state/identities/v1/id/ (masters in the remote's ID range),
//     validates every record against its key and the connection
//     (records.Validate*), writes valid ones to
//     isthmus/cache/<kind>/v1/<remote>/... (records.CacheKey) in batched
//     transactions, and skips, counts and logs invalid ones (an invalid
//     update also deletes the cached old value: nothing stale is kept).
//     Node, ipcache and service records also pass the session's
//     records.Gate: what the remote does not own (reserved identities,
//     prefixes, node pod CIDRs and service backends outside its pod CIDRs
//     and node addresses, overlapping node CIDRs, ipcache entries past
//     Config.MaxIPCachePerRemote) is not written, or deleted from the
//     cache, and logged and counted once per key and reason; it is written
//     once it becomes valid (a node record deciding an endpoint on its
//     address). The ipcache and service canaries wait for the nodes' list;
//  4. after each complete list (kvstore.EventListDone) deletes the cache
//     keys that did not come back — this reconciles the cache after a
//     reconnect and after a restart of this server, whose memory is empty
//     then — and writes the canary isthmus/synced/<remote>/isthmus/state/<kind>/v1;
//  5. re-reads the remote's cluster config every ProbeInterval: a change
//     is checked again, a failure marks the remote unreachable.
//
// Cost of a full sync: the remote's list arrives page by page (kvstore),
// and each record costs one canonical decode (records.DecodeIPCacheEntry),
// one gate change and one map entry of bookkeeping before it joins a
// batch; batches of MaxTxnOps are written while the next one is built,
// and live changes after the first list at most 5 ms after the first of
// their batch (2 ms after the last, if the stream pauses),
// through Config.Writer (the server's in-process client of its embedded
// etcd: no gRPC or TLS on the way).
// Each kind mirror has one transaction in flight of its own, and starts
// more (up to four) while no other kind mirror has one in flight: etcd
// commits those that arrive together with one fsync, and remotes syncing
// at once keep it busy already. Never two name the same key (a batch that
// names a key of one in flight waits for it, so a key's writes land in
// order).
//
// Cache TTL: with CacheTTL 0 (the default, as in Cilium) the last state of
// an unreachable remote is kept and served forever. With CacheTTL > 0 a
// remote unreachable for longer than that (counted from its last contact,
// remembered across restarts through the status key) has its cache,
// canaries and mirrored cluster config deleted; it is mirrored afresh when
// it comes back. Deleting the record (`isthmus clustermesh disconnect`)
// deletes all of it at once, also if that happened while this server was
// down. Stopping the server leaves the cache in place.
//
// Status: per remote, in memory (Manager.Status) and as JSON at
// isthmus/status/remotes/<remote> (written at most every StatusInterval,
// only when changed), for `isthmus clustermesh status`.
package mirror
