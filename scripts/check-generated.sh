#!/usr/bin/env bash
# Fails when `go generate ./bpf/...` changes anything under bpf/, i.e. when the
# committed bpf2go bindings and objects do not match their C sources.
#
# It compares checksums of every file under bpf/ before and after generating,
# so it also works in a work tree with uncommitted changes; in a clean
# checkout (CI) it is the same as `git status --porcelain bpf/` staying empty.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

snapshot() { find bpf -type f -print0 | sort -z | xargs -0 -r sha256sum; }

before=$(snapshot)
go generate ./bpf/...
after=$(snapshot)

if [ "$before" != "$after" ]; then
	echo "check-generated: go generate ./bpf/... changed files under bpf/:" >&2
	diff <(echo "$before") <(echo "$after") | sed -n 's/^[<>] [0-9a-f]*  /  /p' | sort -u >&2
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
		git status --porcelain bpf/ >&2 || true
	fi
	echo "check-generated: run 'make generate' and commit the result" >&2
	exit 1
fi
echo "check-generated: bpf/ objects and bindings match their sources"
