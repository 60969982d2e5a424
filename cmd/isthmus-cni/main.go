// Command isthmus-cni is the CNI plugin of Kubernetes mode: the container
// runtime runs it for every pod sandbox, and it asks the node's agent
// (isthmus-agent, over its unix socket) to plumb, check or remove the pod.
//
// It implements the CNI spec 1.1 (ADD, DEL, CHECK, STATUS, GC, VERSION)
// and speaks the config versions 0.4.0, 1.0.0 and 1.1.0. Its network
// configuration:
//
//	{"cniVersion": "1.0.0", "name": "isthmus", "type": "isthmus-cni",
//	 "agentSocket": "/var/run/isthmus/<node>.sock", "mtu": 1500, "timeout": "60s"}
//
// agentSocket defaults to /var/run/isthmus/agent.sock; mtu (optional) is
// the MTU CHECK expects on the pod's interface; timeout (optional, a Go
// duration) bounds one call to the agent (default 60s).
// See docs/kubernetes.md, "The CNI plugin".
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, Status: cmdStatus, GC: cmdGC},
		supportedVersions, "isthmus-cni: the Isthmus CNI plugin (asks the node's isthmus-agent to plumb pods)")
}

// supportedVersions are the config versions the plugin takes.
var supportedVersions = version.PluginSupports("0.4.0", "1.0.0", "1.1.0")
