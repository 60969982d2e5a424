// Package server is isthmus-clustermesh: the per-cluster API server that
// owns the cluster's etcd.
//
// By default it runs an embedded single-member etcd (data on disk under
// DataDir) with mutual TLS on both ports and etcd auth: on first start it
// creates the cluster's CA and certificates under DataDir/pki and reuses
// them afterwards. Users are authenticated by their client certificate's
// common name: "root" (the server itself), "agents" (read/write under
// isthmus/) and "remote-<cluster>" (read-only, one per connected cluster).
// With EtcdEndpoints it uses an external etcd instead and leaves users and
// certificates to whoever runs that etcd.
//
// Either way it writes isthmus/cluster-config/<cluster> and a heartbeat.
package server
