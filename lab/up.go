package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/connectivity"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
)

// Up builds the demo mesh of `isthmus lab up`: clusters of nodes on separate
// subnets behind a fabric router (see mesh.go for the address plan), one
// clustermesh server per cluster, every pair of clusters connected, echo pods
// on every node, one denied pod per cluster (which runs the echo server as
// well), a global service over the echo pods of every cluster and a policy
// that admits only echo pods to them. It
// returns when every agent sees the whole mesh.
//
// The echo servers are the CLI's hidden `isthmus lab echo-server` (so the lab
// needs no binary of its own); it answers every HTTP request with
// "pod=<pod> node=<node> cluster=<cluster>".

const (
	// EnvStateFile overrides DefaultStateFile (tests run their own lab next
	// to a developer's).
	EnvStateFile = "ISTHMUS_LAB_STATE"
	// DefaultStateFile records the lab `isthmus lab up` built; the other lab
	// verbs and `isthmus connectivity test` read it. It sits next to the
	// owner records, which CleanupStale ignores by name (no prefix).
	DefaultStateFile = ownerDir + "/up.json"
)

// StateFile returns the path of the lab state file.
func StateFile() string {
	if p := os.Getenv(EnvStateFile); p != "" {
		return p
	}
	return DefaultStateFile
}

// UpOptions size the demo mesh.
type UpOptions struct {
	Clusters    int    // default 2
	Nodes       int    // per cluster, default 2
	PodsPerNode int    // echo pods per node, default 2
	Encryption  string // "wireguard" or "none" (default)
	// BGP makes each cluster's router a BIRD top-of-rack router peered
	// with every node (pod CIDRs and load-balancer addresses come from
	// BGP, no static pod routes), makes the echo service a LoadBalancer
	// service with an address from a per-cluster pool, and puts a client
	// outside the mesh behind each router.
	BGP bool
	// L2 puts a client outside the mesh on each cluster's node segment
	// and answers the echo service's load-balancer addresses there with
	// ARP and NDP (an L2AnnouncementPolicy); the service is of type
	// LoadBalancer as with BGP.
	L2 bool
	// VMs enrolls that many external workloads (hosts behind the fabric,
	// spread over the clusters) with one-time tokens, each running the
	// echo server on its mesh addresses.
	VMs int
	// Detached lets the lab outlive the calling process (`isthmus lab up`).
	Detached bool
	// StateFile, when set, receives the State: first with only the prefix
	// (so `lab down` finds a half-built lab after a crash), then complete.
	// Up removes it when it fails.
	StateFile string
	// Timeout bounds the wait for the mesh to sync (default 3m).
	Timeout time.Duration
	// Binaries finds the binaries to run; nil means FindBinaries (next to
	// the running executable, then $PATH; never a build).
	Binaries func() (Binaries, error)
	// Progress receives one line per step; nil discards them.
	Progress func(format string, args ...any)
}

// State is what Up built, as JSON in the state file.
type State struct {
	Prefix     string    `json:"prefix"`
	Dir        string    `json:"dir"`
	Created    time.Time `json:"created"`
	Ready      bool      `json:"ready"` // false while Up is building
	Encryption string    `json:"encryption"`
	// Binaries are what the lab's processes run.
	Binaries Binaries     `json:"binaries"`
	Service  StateService `json:"service"`
	Policy   string       `json:"policy"`
	// PolicyAdmitsOutside: the policy also admits traffic from outside
	// the mesh (--bgp).
	PolicyAdmitsOutside bool `json:"policyAdmitsOutside,omitempty"`
	// PolicyAdmitsVMs: the policy also admits the external workloads
	// (app=vm; --vms).
	PolicyAdmitsVMs bool           `json:"policyAdmitsVMs,omitempty"`
	Clusters        []StateCluster `json:"clusters"`
	Pods            []StatePod     `json:"pods"`
	// Outside are the hosts outside the mesh (--bgp, --l2).
	Outside []StateOutside `json:"outside,omitempty"`
	// VMs are the enrolled external workloads (--vms).
	VMs []StateVM `json:"vms,omitempty"`
	// Kubernetes is set for a lab of Kubernetes clusters (--kubernetes,
	// package lab/kube).
	Kubernetes *StateKubernetes `json:"kubernetes,omitempty"`
}

// StateKubernetes is what a Kubernetes lab runs: each cluster's API server
// and admin kubeconfig are in its StateCluster.
type StateKubernetes struct {
	Version   string `json:"version"`
	Kubectl   string `json:"kubectl"`
	Helm      string `json:"helm"`
	Chart     string `json:"chart"`
	Namespace string `json:"namespace"` // of the Isthmus release
	Release   string `json:"release"`
}

// StateVM is an external workload of the lab.
type StateVM struct {
	Name     string       `json:"name"`     // its netns's short name, e.g. "vm1"
	Workload string       `json:"workload"` // its ExternalWorkload (`isthmus vm list`)
	Cluster  string       `json:"cluster"`  // the cluster it joined
	Netns    string       `json:"netns"`
	Socket   string       `json:"socket"` // its agent's
	IPs      []netip.Addr `json:"ips"`    // its mesh addresses
}

// StateOutside is a host outside the mesh and the service addresses it
// dials.
type StateOutside struct {
	Name    string           `json:"name"`
	Cluster string           `json:"cluster"`
	Netns   string           `json:"netns"`
	IPs     []netip.Addr     `json:"ips"`
	Addrs   []netip.AddrPort `json:"addrs"` // the service's addresses from outside in Cluster
	Via     string           `json:"via"`   // "BGP" (behind the router) or "L2" (on the node segment)
}

// StateService is the global service over the echo pods.
type StateService struct {
	Name       string       `json:"name"`
	Namespace  string       `json:"namespace"`
	VIPs       []netip.Addr `json:"vips"`
	Port       int          `json:"port"`
	TargetPort int          `json:"targetPort"`
}

// StateCluster is one cluster: its server and its nodes.
type StateCluster struct {
	Name       string         `json:"name"`
	ID         uint32         `json:"id"`
	Server     string         `json:"server"`     // etcd client URLs, comma-separated
	RootBundle string         `json:"rootBundle"` // credentials for `isthmus clustermesh`
	Router     string         `json:"router"`     // netns of the router, which runs the server
	PodCIDRs   []netip.Prefix `json:"podCIDRs"`
	Nodes      []StateNode    `json:"nodes"`
	// Kubeconfig (admin) and APIServer of a Kubernetes cluster; the API
	// server is reachable from the lab's namespaces (the router's, the
	// fabric's), not from the host's.
	Kubeconfig string `json:"kubeconfig,omitempty"`
	APIServer  string `json:"apiServer,omitempty"`
}

// StateNode is one node running an agent.
type StateNode struct {
	Name            string       `json:"name"`     // short lab name, e.g. "c1-n1"
	NodeName        string       `json:"nodeName"` // the agent's --node-name
	Netns           string       `json:"netns"`
	Socket          string       `json:"socket"`
	PinDir          string       `json:"pinDir"`
	IPs             []netip.Addr `json:"ips"` // underlay
	WireGuardDevice string       `json:"wireguardDevice,omitempty"`
}

// StatePod is one demo pod.
type StatePod struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Cluster   string            `json:"cluster"`
	Node      string            `json:"node"` // StateNode.Name
	Netns     string            `json:"netns"`
	IPv4      netip.Addr        `json:"ipv4"`
	IPv6      netip.Addr        `json:"ipv6"`
	Labels    map[string]string `json:"labels"`
	Role      string            `json:"role"` // connectivity.RoleEcho or connectivity.RoleDenied
}

// NetnsPath returns /var/run/netns/<name> for a netns name of the state.
func NetnsPath(name string) string { return filepath.Join(NetnsDir, name) }

// Addrs returns the pod's addresses (IPv4 first).
func (p StatePod) Addrs() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// Nodes returns every node of every cluster with its cluster's name.
func (s *State) Nodes() []NodeOf {
	var out []NodeOf
	for _, c := range s.Clusters {
		for _, n := range c.Nodes {
			out = append(out, NodeOf{Cluster: c.Name, StateNode: n})
		}
	}
	return out
}

// NodeOf is a node with the name of its cluster.
type NodeOf struct {
	Cluster string
	StateNode
}

// FindNetns resolves a pod, node, outside host or router name of the lab
// ("c1-n1-echo1", "c1-n1", "c1-out", "c1-rtr", "fabric", or the full netns
// name) to its netns name.
func (s *State) FindNetns(name string) (string, bool) {
	for _, p := range s.Pods {
		if p.Name == name || p.Netns == name {
			return p.Netns, true
		}
	}
	for _, n := range s.Nodes() {
		if n.Name == name || n.Netns == name {
			return n.Netns, true
		}
	}
	for _, o := range s.Outside {
		if o.Name == name || o.Netns == name {
			return o.Netns, true
		}
	}
	for _, v := range s.VMs {
		if v.Name == name || v.Netns == name {
			return v.Netns, true
		}
	}
	for _, c := range s.Clusters {
		if c.Name+"-rtr" == name || c.Router == name {
			return c.Router, true
		}
	}
	if name == "fabric" || name == s.Prefix+"-fabric" {
		return s.Prefix + "-fabric", true
	}
	return "", false
}

// ReadState reads a state file; a missing file is an error matching
// os.ErrNotExist.
func ReadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("lab state %s: %w", path, err)
	}
	if !prefixRE.MatchString(s.Prefix) {
		return nil, fmt.Errorf("lab state %s: bad prefix %q", path, s.Prefix)
	}
	return &s, nil
}

// WriteState writes s to path atomically.
func WriteState(path string, s *State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o644)
}

// DetachedPrefixes lists the prefixes of detached labs (those of `isthmus
// lab up`) that have an owner record: CleanupStale never removes them.
func DetachedPrefixes() []string {
	var out []string
	ents, _ := os.ReadDir(ownerDir)
	for _, e := range ents {
		p, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !prefixRE.MatchString(p) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(ownerDir, e.Name()))
		if err != nil {
			continue
		}
		var o owner
		if json.Unmarshal(b, &o) == nil && o.Detached {
			out = append(out, p)
		}
	}
	return out
}

// DemoVIPs are the global service's addresses.
var DemoVIPs = []netip.Addr{netip.MustParseAddr("10.96.0.100"), netip.MustParseAddr("fd00:96::100")}

const demoObjects = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: echo
  namespace: default
  annotations: {isthmus.io/global: "true", isthmus.io/affinity: none}
spec:
  vips: [%s, "%s"]
  ports: [{name: http, port: 80, targetPort: %d, protocol: TCP}]
  selector: {app: echo}%s
---
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: echo-from-echo
  namespace: default
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: echo}}]
      toPorts: [{port: %d, protocol: TCP}]%s
`

// Up builds the demo mesh (see the comment at the top of this file). On
// failure it tears down what it built.
func Up(ctx context.Context, o UpOptions) (l *Lab, st *State, err error) {
	if o.Clusters == 0 {
		o.Clusters = 2
	}
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	if o.PodsPerNode == 0 {
		o.PodsPerNode = 2
	}
	if o.Encryption == "" {
		o.Encryption = "none"
	}
	if o.Timeout == 0 {
		o.Timeout = 3 * time.Minute
	}
	switch {
	case o.Clusters < 1 || o.Clusters > 9:
		return nil, nil, fmt.Errorf("lab: %d clusters: want 1..9", o.Clusters)
	case o.Nodes < 1 || o.Nodes > 20:
		return nil, nil, fmt.Errorf("lab: %d nodes per cluster: want 1..20", o.Nodes)
	case o.PodsPerNode < 1 || o.PodsPerNode > 20:
		return nil, nil, fmt.Errorf("lab: %d pods per node: want 1..20", o.PodsPerNode)
	case o.VMs < 0 || o.VMs > 20:
		return nil, nil, fmt.Errorf("lab: %d VMs: want 0..20", o.VMs)
	case o.Encryption != "none" && o.Encryption != "wireguard":
		return nil, nil, fmt.Errorf("lab: encryption %q: want wireguard or none", o.Encryption)
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string, ...any) {}
	}
	step := Stepper(progress)

	findBinaries := o.Binaries
	if findBinaries == nil {
		findBinaries = FindBinaries
	}
	bins, err := findBinaries()
	if err != nil {
		return nil, nil, err
	}
	step("binaries (%s): %s", bins.From, strings.Join(bins.Paths(), ", "))
	cli := bins.CLI
	if err := EnsureBPFFS(); err != nil {
		return nil, nil, err
	}
	l, err = New(Options{Detached: o.Detached, Logf: progress, Binaries: func() (Binaries, error) { return bins, nil }})
	if err != nil {
		return nil, nil, err
	}
	st = &State{Prefix: l.Prefix(), Dir: l.Dir(), Created: time.Now().UTC(), Encryption: o.Encryption, Binaries: bins}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
			if o.StateFile != "" {
				_ = os.Remove(o.StateFile)
			}
		}
	}()
	if o.StateFile != "" {
		if err = WriteState(o.StateFile, st); err != nil {
			return l, nil, err
		}
	}
	step("lab %s: fabric router", l.Prefix())
	if _, err = l.Fabric(); err != nil {
		return l, nil, err
	}

	// Clusters build in parallel: each waits mostly for its server and
	// agents to come up.
	clusters := make([]*Cluster, o.Clusters)
	err = Parallel(o.Clusters, func(i int) error {
		t0 := time.Now()
		c, err := l.AddCluster(ctx, i+1, ClusterOptions{Nodes: o.Nodes, Encryption: o.Encryption, NoStaticPodRoutes: o.BGP})
		if err != nil {
			return fmt.Errorf("cluster c%d: %w", i+1, err)
		}
		clusters[i] = c
		step("cluster %s: router, server on %s, %d agents up (%.1fs)", c.Name, c.ServerAddr(), len(c.Agents), time.Since(t0).Seconds())
		return nil
	})
	if err != nil {
		return l, nil, err
	}
	for i := range clusters {
		for j := i + 1; j < len(clusters); j++ {
			step("connecting %s <-> %s", clusters[i].Name, clusters[j].Name)
			if err = Connect(ctx, clusters[i], clusters[j]); err != nil {
				return l, nil, err
			}
		}
	}

	st.Service = StateService{Name: "echo", Namespace: "default", VIPs: DemoVIPs, Port: 80, TargetPort: connectivity.EchoPort}
	st.Policy = "default/echo-from-echo"
	for _, c := range clusters {
		sc := StateCluster{Name: c.Name, ID: c.ID, Server: c.ServerAddr(), RootBundle: c.Bundle("root"),
			Router: c.Router.FullName(), PodCIDRs: c.PodCIDRs()}
		for j, n := range c.Nodes {
			sn := StateNode{Name: n.Name(), NodeName: n.NodeName(), Netns: n.FullName(), Socket: c.Agents[j].Socket,
				PinDir: n.PinDir(), IPs: []netip.Addr{c.underlay4(10 + j + 1), c.underlay6(10 + j + 1)}}
			if o.Encryption == "wireguard" {
				sn.WireGuardDevice = fmt.Sprintf("%sw%dn%d", l.Prefix(), c.Index, j+1)
			}
			sc.Nodes = append(sc.Nodes, sn)
		}
		st.Clusters = append(st.Clusters, sc)
	}

	step("pods: %d echo pods per node, one denied pod per cluster", o.PodsPerNode)
	type job struct {
		c *Cluster
		j int
	}
	var jobs []job
	for _, c := range clusters {
		for j := range c.Agents {
			jobs = append(jobs, job{c, j})
		}
	}
	pods := make([][]StatePod, len(jobs))
	err = Parallel(len(jobs), func(k int) error {
		c, j := jobs[k].c, jobs[k].j
		a, node := c.Agents[j], c.Nodes[j]
		var specs []StatePod
		for i := 1; i <= o.PodsPerNode; i++ {
			specs = append(specs, StatePod{Name: fmt.Sprintf("%s-echo%d", node.Name(), i), Role: connectivity.RoleEcho, Labels: map[string]string{"app": "echo"}})
		}
		if j == 0 {
			specs = append(specs, StatePod{Name: c.Name + "-denied", Role: connectivity.RoleDenied, Labels: map[string]string{"app": "denied"}})
		}
		for _, sp := range specs {
			p, err := a.AddPod(ctx, sp.Name, "default", sp.Labels)
			if err != nil {
				return err
			}
			sp.Namespace, sp.Cluster, sp.Node, sp.Netns, sp.IPv4, sp.IPv6 = p.Namespace, c.Name, node.Name(), p.FullName(), p.IPv4, p.IPv6
			// Denied pods serve too: no policy selects their ingress, so
			// the connectivity test proves their network by reaching them.
			// WithoutCancel: the server outlives this call (and, detached, this process).
			if _, err := p.Start(context.WithoutCancel(ctx), cli, "lab", "echo-server",
				"--listen", ":"+strconv.Itoa(connectivity.EchoPort), "--pod", sp.Name, "--node", node.Name(), "--cluster", c.Name); err != nil {
				return err
			}
			if err := waitListening(ctx, p.Netns, netip.AddrPortFrom(p.IPv4, connectivity.EchoPort)); err != nil {
				return err
			}
			pods[k] = append(pods[k], sp)
		}
		return nil
	})
	if err != nil {
		return l, nil, err
	}
	for _, ps := range pods {
		st.Pods = append(st.Pods, ps...)
	}

	step("applying Service default/echo (global, %s and %s port 80) and NetworkPolicy %s in every cluster", DemoVIPs[0], DemoVIPs[1], st.Policy)
	f := filepath.Join(l.Dir(), "demo-objects.yaml")
	svcType, fromNodes := "", ""
	if o.BGP || o.L2 {
		// Traffic from outside reaches the echo pods SNATed to the node
		// that took it (externalTrafficPolicy Cluster): from this node
		// (host), another node of the cluster (remote-node) or, for
		// backends in another cluster, a node the mesh does not vouch
		// for (world). The policy admits the outside on the echo port.
		svcType = "\n  type: LoadBalancer"
		fromNodes = fmt.Sprintf("\n    - fromEntities: [host, remote-node, world]\n      toPorts: [{port: %d, protocol: TCP}]", connectivity.EchoPort)
		st.PolicyAdmitsOutside = true
	}
	demo := fmt.Sprintf(demoObjects, DemoVIPs[0], DemoVIPs[1], connectivity.EchoPort, svcType, connectivity.EchoPort, fromNodes)
	if o.VMs > 0 {
		// The external workloads (app=vm, not backends of the service)
		// reach the echo pods too.
		demo = strings.Replace(demo, "- fromEndpoints: [{matchLabels: {app: echo}}]", "- fromEndpoints: [{matchLabels: {app: echo}}, {matchLabels: {app: vm}}]", 1)
		st.PolicyAdmitsVMs = true
	}
	if err = os.WriteFile(f, []byte(demo), 0o644); err != nil {
		return l, nil, err
	}
	for _, c := range clusters {
		if o.BGP || o.L2 {
			// The pool first, so the service gets its addresses at once.
			if err = applyNorthSouth(ctx, c, o.BGP, o.L2); err != nil {
				return l, nil, err
			}
		}
		if _, err = c.Agents[0].CLI(ctx, "apply", "-f", f); err != nil {
			return l, nil, err
		}
	}
	if o.StateFile != "" {
		if err = WriteState(o.StateFile, st); err != nil {
			return l, nil, err
		}
	}

	if o.BGP {
		step("BGP: BIRD in every cluster's router as top-of-rack, peered with every node; a client outside the mesh behind it")
		for _, c := range clusters {
			if err = startToR(ctx, c); err != nil {
				return l, nil, err
			}
		}
	}
	step("waiting until every agent sees the whole mesh")
	if err = st.WaitReady(ctx, o.Timeout); err != nil {
		return l, nil, err
	}
	if o.L2 {
		step("L2: a client outside the mesh on every cluster's node segment; the service's addresses answered with ARP and NDP")
		for _, c := range clusters {
			sc, err := c.AddSegmentClient(c.Name+"-seg", 200)
			if err != nil {
				return l, nil, err
			}
			addrs, err := waitLBAddrs(ctx, c, o.Timeout)
			if err != nil {
				return l, nil, err
			}
			so := StateOutside{Name: c.Name + "-seg", Cluster: c.Name, Netns: sc.FullName(), IPs: []netip.Addr{sc.IPv4, sc.IPv6}, Via: "L2"}
			for _, a := range addrs {
				so.Addrs = append(so.Addrs, netip.AddrPortFrom(a, 80))
			}
			st.Outside = append(st.Outside, so)
		}
	}
	if o.VMs > 0 {
		step("VMs: %d external workloads behind the fabric, enrolled with one-time tokens, each serving the echo server", o.VMs)
		for k := 1; k <= o.VMs; k++ {
			c := clusters[(k-1)%len(clusters)]
			name := fmt.Sprintf("vm%d", k)
			v, err := l.AddVM(ctx, c, k, name, map[string]string{"app": "vm"})
			if err != nil {
				return l, nil, err
			}
			ips, err := v.Addresses(ctx)
			if err != nil {
				return l, nil, err
			}
			if _, err := v.Start(context.WithoutCancel(ctx), cli, "lab", "echo-server",
				"--listen", ":"+strconv.Itoa(connectivity.EchoPort), "--pod", name, "--node", name, "--cluster", c.Name); err != nil {
				return l, nil, err
			}
			if err := waitListening(ctx, v.Netns, netip.AddrPortFrom(ips[0], connectivity.EchoPort)); err != nil {
				return l, nil, err
			}
			st.VMs = append(st.VMs, StateVM{Name: name, Workload: v.Name, Cluster: c.Name, Netns: v.FullName(), Socket: v.Agent.Socket, IPs: ips})
		}
	}
	if o.BGP {
		step("waiting for the load-balancer addresses and their routes in every top-of-rack router")
		for _, c := range clusters {
			out, err := c.AddOutside(c.Name + "-out")
			if err != nil {
				return l, nil, err
			}
			addrs, err := waitAnnounced(ctx, c, o.Timeout)
			if err != nil {
				return l, nil, err
			}
			so := StateOutside{Name: out.Name(), Cluster: c.Name, Netns: out.FullName(), IPs: []netip.Addr{out.IPv4, out.IPv6}, Via: "BGP"}
			for _, a := range addrs {
				so.Addrs = append(so.Addrs, netip.AddrPortFrom(a, 80))
			}
			st.Outside = append(st.Outside, so)
		}
	}
	st.Ready = true
	if o.StateFile != "" {
		if err = WriteState(o.StateFile, st); err != nil {
			return l, nil, err
		}
	}
	step("ready")
	return l, st, nil
}

// Stepper returns a progress function that prefixes each line with the
// seconds since Stepper was called ("[  5.6s] ...").
func Stepper(progress func(format string, args ...any)) func(format string, args ...any) {
	start := time.Now()
	return func(format string, args ...any) {
		progress("[%5.1fs] "+format, append([]any{time.Since(start).Seconds()}, args...)...)
	}
}

// Parallel runs fn(0..n-1) concurrently and joins their errors.
func Parallel(n int, fn func(i int) error) error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = fn(i) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitListening waits until something accepts on addr, dialled from inside
// ns (the pod itself, so no policy is in the way).
func waitListening(ctx context.Context, ns *Netns, addr netip.AddrPort) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := ns.Do(func() error {
			c, err := net.DialTimeout("tcp", addr.String(), time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: echo server in %s not listening on %s: %w", ns.FullName(), addr, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// WaitReady polls every agent until Check finds nothing missing.
func (s *State) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		problems := s.Check(ctx)
		if len(problems) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: mesh not ready after %v:\n  %s", timeout, strings.Join(problems, "\n  "))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// Check asks every agent for its status and lists what keeps the mesh from
// being ready: an agent unreachable, not connected or not published, a
// cluster not synced, nodes or pod addresses not seen, the service not in
// the datapath, WireGuard peers missing. Empty means ready.
func (s *State) Check(ctx context.Context) []string {
	wantIPs := map[string]int{}
	for _, p := range s.Pods {
		wantIPs[p.Cluster] += len(p.Addrs())
	}
	wantNodes := map[string]int{}
	total := 0
	for _, c := range s.Clusters {
		wantNodes[c.Name] = len(c.Nodes)
		total += len(c.Nodes)
	}
	nodes := s.Nodes()
	problems := make([][]string, len(nodes))
	_ = Parallel(len(nodes), func(i int) error {
		n := nodes[i]
		bad := func(format string, args ...any) {
			problems[i] = append(problems[i], n.Name+": "+fmt.Sprintf(format, args...))
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		st, err := api.NewClient(n.Socket).Status(cctx)
		if err != nil {
			bad("%v", err)
			return nil
		}
		if st.Reconcile.LastError != "" {
			bad("datapath: %s", st.Reconcile.LastError)
		}
		if len(s.Service.VIPs) > 0 && st.Frontends < len(s.Service.VIPs) {
			bad("%d of %d service frontends in the datapath", st.Frontends, len(s.Service.VIPs))
		}
		m := st.ClusterMesh
		if m == nil {
			bad("not in cluster mode")
			return nil
		}
		if !m.Connected {
			bad("not connected to its cluster's etcd (%s)", m.LastError)
		}
		if !m.Published {
			bad("records not published yet")
		}
		if m.RouteError != "" {
			bad("routes: %s", m.RouteError)
		}
		seen := map[string]bool{}
		for _, c := range m.Clusters {
			seen[c.Name] = true
			switch {
			case !c.Synced:
				bad("cluster %s not synced %s", c.Name, c.Error)
			case c.Nodes < wantNodes[c.Name]:
				bad("sees %d of %d nodes of %s", c.Nodes, wantNodes[c.Name], c.Name)
			case c.Endpoints < wantIPs[c.Name]:
				bad("sees %d of %d pod addresses of %s", c.Endpoints, wantIPs[c.Name], c.Name)
			case len(s.Service.VIPs) > 0 && c.Services < 1:
				bad("sees no service of %s yet", c.Name)
			}
		}
		for _, name := range slices.Sorted(maps.Keys(wantNodes)) {
			if !seen[name] {
				bad("does not see cluster %s yet", name)
			}
		}
		if s.Encryption == "wireguard" {
			switch wg := st.WireGuard; {
			case wg == nil:
				bad("no WireGuard device (encryption is on)")
			case wg.LastError != "":
				bad("WireGuard: %s", wg.LastError)
			case len(wg.Peers) < total-1:
				bad("%d of %d WireGuard peers", len(wg.Peers), total-1)
			}
		}
		return nil
	})
	var out []string
	for _, p := range problems {
		out = append(out, p...)
	}
	return out
}
