#!/usr/bin/env bash
# Isthmus benchmarks (`make bench`; needs root and `make deps`).
#
# Every benchmark ends with one line:
#   bench: <name> <value> <unit> (goal <goal>)
# Ratios are measured side by side in one run (see tests/bench), because
# these machines are shared and absolute numbers drift.
#
# BENCH_RUN selects sections of tests/bench (regexp: throughput|cps),
# BENCH_DURATION the length of each measurement.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
	echo "bench: needs root (network namespaces, BPF); run it as root" >&2
	exit 1
fi
for tool in ip nsenter iperf3 iptables-restore; do
	command -v "$tool" >/dev/null || { echo "bench: $tool not found; run: make deps" >&2; exit 1; }
done

# 1. ns per packet of the from-pod program under BPF_PROG_TEST_RUN.
go test -run '^$' -bench 'BenchmarkFromPod' -benchtime 200x -count 1 ./bpf/ |
	awk '/^BenchmarkFromPod\// {
		name = $1; sub(/^BenchmarkFromPod\//, "", name); sub(/-[0-9]+$/, "", name); gsub(/\//, "-", name)
		for (i = 1; i <= NF; i++) if ($(i+1) == "ns/pkt") v = $i
		printf "bench: from-pod-%s %s ns/pkt (goal info: BPF_PROG_TEST_RUN)\n", name, v
	}'

# 2. Throughput against a plain veth pair, service scaling against one
#    service and against iptables (kube-proxy style).
go run ./tests/bench -run "${BENCH_RUN:-throughput|cps}" -duration "${BENCH_DURATION:-8s}"
