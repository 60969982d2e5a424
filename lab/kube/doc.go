// Package kube runs real Kubernetes clusters (Version, built by `make
// kube-binaries`) inside the network namespaces of a lab (package lab), for
// the end-to-end tests of Kubernetes mode and `isthmus lab up --kubernetes`.
//
// A cluster (Start) is a control plane in one lab namespace (ControlPlane,
// e.g. the cluster's router): Debian's etcd on 127.0.0.1:12379 of that
// namespace, kube-apiserver on <AdvertiseAddr>:6443, kube-controller-manager
// (allocating dual-stack node pod CIDRs from ClusterCIDRs) and
// kube-scheduler. Each node (Cluster.AddNode) is a lab node's namespace
// running its own containerd and kubelet, started with `nsenter --net`
// (never `ip netns exec`, which remounts /sys and hides the cgroup tree).
// The nodes share the host's filesystem and mount namespace, so every path
// is per node. Layout, below the lab dir:
//
//	kube-<cluster>/pki/             ca.crt/.key (one CA signs everything), apiserver,
//	                                apiserver-kubelet-client, sa.key/sa.pub
//	kube-<cluster>/kubeconfigs/     <user>.kubeconfig (KubeconfigFor; admin, kcm,
//	                                scheduler, system:node:<n>, agents)
//	kube-<cluster>/etcd/            etcd data
//	<node>/kube/containerd.toml     containerd: root, state, socket, runc root,
//	<node>/kube/containerd-{root,state}/, runc/, containerd.sock
//	<node>/kube/cni/net.d/          CRI conf_dir (NodeOptions.CNIConfDir)
//	<node>/kube/cni-ipam/           host-local data dir (WritePTPConfig)
//	<node>/kube/kubelet/            kubelet root-dir, pki/ (cert-dir, serving cert)
//	<node>/kube/kubelet-config.yaml, pod-logs/, volume-plugins/
//	logs/                           every process's output (lab.Proc)
//
// Per node the kubelet runs with cgroupDriver cgroupfs, failCgroupV1 false
// (the host is cgroup v1 hybrid without systemd) and cgroupRoot
// /<prefix>-<node>, created beforehand in every hierarchy; containerd with
// restrict_oom_score_adj (no CAP_SYS_RESOURCE here). The node's pod CIDRs
// come from the API (spec.podCIDRs, Node.PodCIDRs); the node becomes Ready
// once a CNI config is in its conf dir (WritePTPConfig writes a ptp +
// host-local placeholder until the Isthmus CNI plugin replaces it).
//
// Images come without a registry: BuildImage writes a one-layer image as a
// tarball that `ctr -n k8s.io images import` takes; WriteImages writes the
// sandbox image (PauseImage: `isthmus connectivity pause`) and ToolsImage
// (entrypoint /isthmus) from a static isthmus binary. Pods use
// imagePullPolicy Never.
//
// Teardown: every name carries the lab prefix (namespaces, cgroup roots, the
// lab's temp dir that holds all paths), so lab.Close and the stale cleanup
// of a crashed run (lab.CleanupPrefix, lab.CleanupStale) find everything:
// the node's processes, its shims (by their -address in the lab dir), pods
// (by cgroup), their sandbox namespaces /run/netns/cni-* (by the namespace
// of a pod process), mounts under the lab dir and the cgroups. Cluster.Start
// and AddNode register OnClose hooks that do the same in order while the
// processes are known.
//
// Everything needs root; one cluster per ControlPlane namespace (fixed
// ports), one Kubernetes node per lab node.
package kube
