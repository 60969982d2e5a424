// Package etcdserver is the etcd side of isthmus-clustermesh: the per-cluster
// API server that owns the cluster's etcd. (The whole process, with the
// mirror and the service syncer, is package clustermesh/server.)
//
// By default it runs an embedded single-member etcd (data on disk under
// DataDir) with mutual TLS on both ports and etcd auth: on first start it
// creates the cluster's CA and certificates under DataDir/pki and reuses
// them afterwards. Users are authenticated by their client certificate's
// common name: "root" (the server itself and the CLI), "agents" (read/write
// under isthmus/ except isthmus/remotes/, which holds the private keys the
// mirror uses) and "remote-<cluster>" (read-only on cluster config,
// heartbeat, state and canaries; one per connected cluster). With
// EtcdEndpoints it uses an external etcd instead and leaves users and
// certificates to whoever runs that etcd.
//
// Either way it writes isthmus/cluster-config/<cluster> (refusing an etcd
// that belongs to another cluster, while accepting the mirror's copies of
// remote clusters' configs), a heartbeat, and its Info at
// isthmus/status/server (and DataDir/cluster.json). OpenDataDir gives the
// CLI on the server host the bundles and the power to issue remote bundles
// while the server runs.
package etcdserver
