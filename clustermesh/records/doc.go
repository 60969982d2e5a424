// Package records owns the etcd key layout under "isthmus/" and the typed,
// versioned JSON records stored there.
//
// Key builders and parsers are exact inverses; a parser rejects anything a
// builder would not produce. Decode* functions decode strictly (unknown
// fields, a missing or unknown "version", trailing data and invalid values
// are errors) and never panic on any input; they are fuzzed. Validate*
// functions decode and also check the record against its key and against
// the cluster the connection belongs to: a record of cluster A arriving
// from cluster B's etcd is refused (ErrClusterMismatch), whatever it says.
//
// Owner and Gate check what Validate* cannot: that a record claims only
// what its cluster owns (identities of its ID, addresses inside the pod
// CIDRs of its config or of its accepted nodes, node pod CIDRs that
// overlap no earlier-named node's, at most Limits.MaxIPCache ipcache
// entries). The mirror and the agent use the same Gate.
package records
