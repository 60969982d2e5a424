#!/usr/bin/env bash
# Isthmus benchmarks (`make bench`; needs root and `make deps`).
#
# Every benchmark ends with one line:
#   bench: <name> <value> <unit> (goal <goal>) [ok|MISSED]
# Goals (">= X", "<= X") are evaluated in code (tests/bench): a miss prints
# MISSED and this script exits non-zero; "info" lines are not goals.
# Ratios are measured side by side in one run (see tests/bench), because
# these machines are shared and absolute numbers drift.
#
# BENCH_RUN selects sections (a regexp matched against the whole section name:
# throughput|cps|mesh|mesh-scale|service-backend|wireguard|labup|bigtcp|k8s|k8s-lab|bgp|northsouth|l2|vm; mesh also runs
# the identity allocation benchmark), BENCH_DURATION the length of each
# measurement of throughput and cps, BENCH_ARGS more flags of tests/bench
# (for a CI-sized run, e.g. "-mesh-endpoints 10000 -mesh-churn-duration 10s
# -mesh-churn-rate 200 -mesh-scale-endpoints 10000 -svc-services 100").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
	echo "bench: needs root (network namespaces, BPF); run it as root" >&2
	exit 1
fi
for tool in ip nsenter iperf3 iptables-restore wg wireguard-go; do
	command -v "$tool" >/dev/null || { echo "bench: $tool not found; run: make deps" >&2; exit 1; }
done

# 1. ns per packet of the from-pod program under BPF_PROG_TEST_RUN.
#    Beside the plain paths: a first and a later fragment, IPv6 without and
#    with two extension headers, and a related ICMP error (bpf/bench_test.go).
go test -run '^$' -bench 'BenchmarkFromPod' -benchtime 200x -count 1 ./bpf/ |
	awk '/^BenchmarkFromPod\// {
		name = $1; sub(/^BenchmarkFromPod\//, "", name); sub(/-[0-9]+$/, "", name); gsub(/\//, "-", name)
		for (i = 1; i <= NF; i++) if ($(i+1) == "ns/pkt") v = $i
		printf "bench: from-pod-%s %s ns/pkt (goal info: BPF_PROG_TEST_RUN)\n", name, v
	}'

run="${BENCH_RUN:-throughput|cps|mesh|mesh-scale|service-backend|wireguard|labup|bigtcp|k8s|k8s-lab|bgp|northsouth|l2|vm}"

# 2. Identity allocations per second, 10 concurrent allocators (each its
#    own etcd client and node name) against one embedded etcd (no fsync).
if [[ mesh =~ $run ]]; then
	go test -run '^$' -bench 'BenchmarkEtcdAllocate' -benchtime 2000x -count 1 ./clustermesh/identity/ |
		awk '/^BenchmarkEtcdAllocate\// {
			name = $1; sub(/^BenchmarkEtcdAllocate\//, "", name); sub(/-[0-9]+$/, "", name)
			for (i = 1; i <= NF; i++) if ($(i+1) == "allocs/s") v = $i
			what["new"] = "new label sets"
			what["existing"] = "label sets another node created"
			what["racing"] = "all 10 allocating the same new label sets"
			printf "bench: identity-allocs-%s %s allocs/s (goal info: 10 concurrent allocators, %s)\n", name, v, what[name]
		}'
fi

# 2b. Heap per remote ipcache entry in the agent: its mesh tables (the
#     ownership Gate's decoded record, the index by prefix), at 100,000
#     entries; the datapath reconciler's shadow of the BPF ipcache, at 60,000.
if [[ mesh =~ $run ]]; then
	go test -run '^$' -bench 'BenchmarkTablesHeapPerEntry' -benchtime 1x -count 1 ./agent/meshsync/ |
		awk '/^BenchmarkTablesHeapPerEntry/ {
			for (i = 1; i <= NF; i++) if ($(i+1) == "B/entry") v = $i
			printf "bench: mesh-tables-heap-per-entry %s B (goal info: agent tables, 100,000 remote ipcache entries)\n", v
		}'
	go test -run '^$' -bench 'BenchmarkReconcilerHeapPerEntry' -benchtime 1x -count 1 ./agent/datapath/ |
		awk '/^BenchmarkReconcilerHeapPerEntry/ {
			for (i = 1; i <= NF; i++) if ($(i+1) == "B/entry") v = $i
			printf "bench: mesh-reconciler-heap-per-entry %s B (goal info: the reconciler'"'"'s shadow of the BPF ipcache, 60,000 remote entries)\n", v
		}'
fi

# 3. Throughput against a plain veth pair, service scaling against one
#    service and against iptables (kube-proxy style); the cluster mesh:
#    propagation, full sync of 100,000 endpoints, agent RSS, sustained churn
#    (tests/bench/mesh.go, churn.go); 4 remote clusters x 100,000 endpoints into
#    one agent (meshscale.go); endpoint churn under 1,000 services
#    (services.go); the time from `isthmus lab up` to a ready mesh, 2x2 and 4x3
#    (tests/bench/labup.go); Kubernetes mode: the CNI ADD of 50 pods, a new
#    pod reached from the other cluster, a deleted pod gone from it
#    (tests/bench/k8s.go; it relinks the Kubernetes binaries with
#    scripts/kube-binaries.sh and needs containerd, runc and etcd); `lab up
#    --kubernetes` to ready and the longest stall of a cross-cluster stream
#    while helm upgrade rolls both clusters' agents (tests/bench/k8slab.go,
#    needs make helm); BGP, north-south, L2 failover and VM enrollment
#    (bgp.go, northsouth.go, l2.go, vm.go).
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
go run ./tests/bench -run "$run" -duration "${BENCH_DURATION:-8s}" ${BENCH_ARGS:-}
