package connectivity

import (
	"net/netip"
)

// Host is an external workload (a VM or bare-metal host enrolled with
// `isthmus-agent --join`) that runs the echo server on its mesh addresses.
type Host struct {
	Name    string // also what its echo server answers with
	Cluster string // the cluster it joined
	Netns   string // path of its network namespace
	IPs     []netip.Addr
}

// hosts: an echo pod of every cluster reaches every host's echo server,
// and every host reaches an echo pod of every cluster, over every family
// both have (through WireGuard: the hosts' tunnels to the nodes).
func (k *checker) hosts() {
	if len(k.t.Hosts) == 0 {
		return
	}
	for _, h := range k.t.Hosts {
		hp := Pod{Name: h.Name, Cluster: h.Cluster, Netns: h.Netns, IPs: h.IPs, Role: RoleEcho}
		for _, c := range k.t.clusters() {
			nodes := k.t.echoNodes(c)
			if len(nodes) == 0 {
				continue
			}
			pod := k.t.echoOn(nodes[0].Name)[0]
			k.add(k.reach("pod to external workload", pod, hp))
			k.add(k.reach("external workload to pod", hp, pod))
		}
	}
}
