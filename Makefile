# Isthmus build, test and tooling entry points. Most targets need root
# (network namespaces, BPF); `make deps` installs what they need on Debian.

GO                  ?= go
BIN                 := bin
CMDS                := isthmus-agent isthmus-clustermesh isthmus isthmus-cni
TEST_TIMEOUT        ?= 20m
STATICCHECK_VERSION ?= v0.8.2
CONTROLLER_GEN_VERSION ?= v0.23.0
HELM_VERSION        ?= v4.3.2
# make images: IMAGE_TAG defaults to the chart's appVersion (scripts/images).
IMAGE_REPOSITORY    ?= localhost/isthmus
IMAGE_TAG           ?=

# Every Debian package the project needs (build, datapath, tests, benchmarks).
DEB_PACKAGES := clang llvm libbpf-dev linux-libc-dev bpftool iproute2 iperf3 \
	tcpdump iptables nftables ethtool netcat-openbsd util-linux procps \
	iputils-ping iputils-arping jq python3 git make etcd-client etcd-server \
	wireguard-tools wireguard-go curl containerd runc containernetworking-plugins \
	bird2 ndisc6

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all build generate test bench lint deps clean demo lab lab-down kube-binaries crds images helm

all: build

build:
	$(GO) build ./...
	@mkdir -p $(BIN)
	@for c in $(CMDS); do \
		if ls cmd/$$c/*.go >/dev/null 2>&1; then \
			echo "$(GO) build -o $(BIN)/$$c ./cmd/$$c"; \
			$(GO) build -o $(BIN)/$$c ./cmd/$$c || exit 1; \
		else \
			echo "build: cmd/$$c has no Go files yet; skipped"; \
		fi; \
	done

# Regenerates the bpf2go bindings and objects (needs clang).
generate:
	$(GO) generate ./bpf/...

# Regenerates the deepcopy functions of k8s/apis and the CRD manifests in
# k8s/crds (controller-gen from the module proxy, not in go.mod).
crds:
	$(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_GEN_VERSION) \
		object paths=./k8s/apis/... crd:crdVersions=v1 output:crd:dir=./k8s/crds
	cp k8s/crds/*.yaml deploy/helm/isthmus/crds/

test: lint kube-binaries helm
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	@if command -v clang >/dev/null 2>&1; then \
		scripts/check-generated.sh; \
	else \
		echo "test: clang not found; skipping the check that committed bpf objects match their sources"; \
	fi

bench:
	scripts/bench.sh

# The main job on one machine: a node, pods, a service and a policy, checked,
# then the status (`make demo DEMO_ARGS=-keep` keeps it running).
demo:
	$(GO) run ./tests/demo $(DEMO_ARGS)

# The quick start: `isthmus lab up` builds two clusters of two nodes with
# WireGuard in network namespaces, checks them with the connectivity test
# and leaves them running (docs/lab.md); LAB_ARGS passes flags, e.g.
# LAB_ARGS="--clusters 3 --encryption none". `make lab-down` removes the lab.
# bin/isthmus runs the bin/isthmus-agent and bin/isthmus-clustermesh next to
# it (it never builds them).
# With LAB_ARGS=--kubernetes it also builds the Kubernetes binaries (once)
# and Helm; the binaries are static (CGO_ENABLED=0) so that the Kubernetes
# lab can package them into the chart's images.
lab: $(if $(findstring --kubernetes,$(LAB_ARGS)),kube-binaries helm)
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/isthmus ./cmd/isthmus-agent ./cmd/isthmus-clustermesh ./cmd/isthmus-cni
	$(BIN)/isthmus lab up $(LAB_ARGS)

lab-down:
	@if [ -x $(BIN)/isthmus ]; then $(BIN)/isthmus lab down; else $(GO) run ./cmd/isthmus lab down; fi

# go vet and staticcheck; part of `make test`. staticcheck is built from the
# module proxy into bin/ once per version.
lint:
	$(GO) vet ./...
	@[ -x $(BIN)/staticcheck-$(STATICCHECK_VERSION) ] || { \
		mkdir -p $(BIN) && GOBIN=$(CURDIR)/$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) && \
		mv $(BIN)/staticcheck $(BIN)/staticcheck-$(STATICCHECK_VERSION); }
	$(BIN)/staticcheck-$(STATICCHECK_VERSION) ./...

# Idempotent: apt-get runs only when a package is missing; bpffs is mounted
# only when it is not.
deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "deps: installing$$missing"; \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	else \
		echo "deps: all Debian packages present"; \
	fi
	@mountpoint -q /sys/fs/bpf || { echo "deps: mounting bpffs at /sys/fs/bpf"; $(SUDO) mount -t bpf bpf /sys/fs/bpf; }

clean:
	rm -rf $(BIN)

# The Kubernetes binaries Kubernetes mode is tested with, built once from the
# module proxy into bin/kubernetes/<version>/ (scripts/kube-binaries.sh).
kube-binaries:
	scripts/kube-binaries.sh

# The agent and clustermesh server images of the Helm chart
# (deploy/helm/isthmus), as tarballs in bin/images/ that
# `ctr -n k8s.io images import` takes: static binaries in bin/static/,
# packaged without a registry or docker (scripts/images, internal/ociimage).
images:
	@mkdir -p $(BIN)/static
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/static/ ./cmd/isthmus-agent ./cmd/isthmus-cni ./cmd/isthmus-clustermesh ./cmd/isthmus
	$(GO) run ./scripts/images --bin $(BIN)/static --out $(BIN)/images --repository $(IMAGE_REPOSITORY) $(if $(IMAGE_TAG),--tag $(IMAGE_TAG))

# Helm (v4, for the chart's tests in deploy/helm), built from the module
# proxy into bin/ once per version, like staticcheck.
helm:
	@[ -x $(BIN)/helm-$(HELM_VERSION) ] || { \
		mkdir -p $(BIN) && GOBIN=$(CURDIR)/$(BIN) $(GO) install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION) && \
		mv $(BIN)/helm $(BIN)/helm-$(HELM_VERSION); }
