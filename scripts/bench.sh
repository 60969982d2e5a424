#!/usr/bin/env bash
# Isthmus benchmarks (`make bench`; needs root, iperf3 and python3 from `make deps`).
#
# Every benchmark ends with one line:
#   bench: <name> <value> <unit> (goal <goal>)
# Ratios are measured side by side in one run.
#
# Namespaces are named "<prefix>-<name>" with a prefix that starts with the lab
# marker "ilab" (as tests/lab does), and an owner record in /run/isthmus-lab
# tells concurrent labs that they are in use. A trap removes everything on
# exit; leftovers of a killed run are removed by the next lab's stale cleanup.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BENCH_SECONDS=${BENCH_SECONDS:-10}

bench_line() { # name value unit goal
	printf 'bench: %s %s %s (goal %s)\n' "$1" "$2" "$3" "$4"
}

if [ "$(id -u)" != 0 ]; then
	echo "bench: needs root (network namespaces); run: sudo make bench" >&2
	exit 1
fi
for tool in ip nsenter iperf3 python3 ss; do
	command -v "$tool" >/dev/null || { echo "bench: $tool not found; run: make deps" >&2; exit 1; }
done

OWNER_DIR=/run/isthmus-lab
random_prefix() {
	local alphabet=0123456789abcdefghijklmnopqrstuvwxyz p=ilab i
	for i in 1 2 3 4; do p+=${alphabet:RANDOM%36:1}; done
	echo "$p"
}
mkdir -p "$OWNER_DIR"
while :; do
	PREFIX=$(random_prefix)
	compgen -G "/var/run/netns/$PREFIX*" >/dev/null || compgen -G "$OWNER_DIR/$PREFIX*" >/dev/null || break
done
NETNS=()    # full names of the namespaces this run created
BG_PIDS=()  # background processes this run started

cleanup() {
	local pid ns
	for pid in "${BG_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
	for pid in "${BG_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	for ns in "${NETNS[@]}"; do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
		ip netns del "$ns" 2>/dev/null || true
	done
	rm -f "$OWNER_DIR/$PREFIX.json"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

printf '{"pid":%d,"start_time":%s,"detached":false}\n' "$$" "$(awk '{print $22}' /proc/$$/stat)" >"$OWNER_DIR/$PREFIX.json"

# in_ns <ns> cmd...: run a command in a namespace (nsenter, not `ip netns exec`,
# which would remount /sys and hide bpffs pins).
in_ns() {
	local ns=$1; shift
	nsenter --net="/var/run/netns/$ns" -- "$@"
}

# new_ns <var> <name>: creates "<prefix>-<name>" with lo up and stores its full
# name in the variable <var> (no command substitution: it would lose NETNS).
new_ns() {
	local ns="$PREFIX-$2"
	ip netns add "$ns"
	NETNS+=("$ns")
	in_ns "$ns" ip link set lo up
	in_ns "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
	printf -v "$1" '%s' "$ns"
}

# veth_pair <nsA> <ipA/len> <nsB> <ipB/len>: a plain veth between two namespaces.
veth_pair() {
	ip -n "$1" link add eth0 type veth peer name eth0 netns "$3"
	ip -n "$1" addr add "$2" dev eth0
	ip -n "$3" addr add "$4" dev eth0
	ip -n "$1" link set eth0 up
	ip -n "$3" link set eth0 up
}

# iperf_server_start <ns>: an iperf3 server in the namespace, ready on return.
iperf_server_start() {
	nsenter --net="/var/run/netns/$1" -- iperf3 -s >/dev/null 2>&1 &
	BG_PIDS+=("$!")
	local i
	for i in $(seq 100); do
		in_ns "$1" ss -Htln 'sport = :5201' | grep -q . && return 0
		sleep 0.05
	done
	echo "bench: iperf3 server in $1 did not start" >&2
	return 1
}

# iperf_gbps <client_ns> <server_ip>: single-stream TCP throughput in Gbit/s
# (received side, BENCH_SECONDS long) to an iperf3 server already running at
# server_ip.
iperf_gbps() {
	in_ns "$1" iperf3 -c "$2" -t "$BENCH_SECONDS" -J | python3 -c '
import json, sys
d = json.load(sys.stdin)
if "error" in d:
    sys.exit("iperf3: " + d["error"])
print("%.2f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))
'
}

# --- Baseline: plain veth pair between two namespaces, no BPF ----------------
bench_veth_baseline() {
	local a b
	new_ns a veth-a
	new_ns b veth-b
	veth_pair "$a" 192.0.2.1/24 "$b" 192.0.2.2/24
	iperf_server_start "$b"
	VETH_BASELINE_GBPS=$(iperf_gbps "$a" 192.0.2.2)
	bench_line veth-baseline-throughput "$VETH_BASELINE_GBPS" Gbit/s info
}

bench_veth_baseline
