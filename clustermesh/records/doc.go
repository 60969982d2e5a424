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
package records
