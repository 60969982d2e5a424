#!/usr/bin/env bash
# Builds the Kubernetes binaries that Kubernetes mode is tested with (and
# that `isthmus lab up --kubernetes` runs) from the k8s.io/kubernetes module,
# through the wrapper module in tools/kubernetes, into
# bin/kubernetes/<version>/. Idempotent: a complete set for the version is
# kept; a cold build takes about ten minutes on two cores, a relink with a
# warm Go build cache under a minute.
#
# Usage: scripts/kube-binaries.sh [output-dir]   (default bin/kubernetes/<version>)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
MOD=tools/kubernetes
VERSION=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$MOD/go.mod")
[ -n "$VERSION" ] || { echo "kube-binaries: no k8s.io/kubernetes version in $MOD/go.mod" >&2; exit 1; }
OUT=${1:-bin/kubernetes/$VERSION}
case $OUT in /*) ;; *) OUT=$ROOT/$OUT ;; esac
CMDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl"

missing=""
for c in $CMDS; do [ -x "$OUT/$c" ] || missing="$missing $c"; done
if [ -z "$missing" ] && [ -f "$OUT/.complete" ]; then
	echo "kube-binaries: $VERSION up to date in $OUT"
	exit 0
fi

minor=${VERSION#v}; major=${minor%%.*}; minor=${minor#*.}; minor=${minor%%.*}
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	LDFLAGS="$LDFLAGS -X $p.gitVersion=$VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$OUT"
rm -f "$OUT/.complete"
echo "kube-binaries: building Kubernetes $VERSION ($CMDS) into $OUT; the first build takes about ten minutes, later ones reuse the Go build cache"
start=$(date +%s)
pkgs=""
for c in $CMDS; do pkgs="$pkgs k8s.io/kubernetes/cmd/$c"; done
# CGO off: static binaries, no libc in the way of the node namespaces.
(cd "$MOD" && CGO_ENABLED=0 go build -trimpath -ldflags "$LDFLAGS" -o "$OUT/" $pkgs)
touch "$OUT/.complete"
echo "kube-binaries: built in $(( $(date +%s) - start )) s"
