package lab

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// AgentOptions configure an agent started on a lab node.
type AgentOptions struct {
	PodCIDRs    []netip.Prefix // required: one IPv4 and/or one IPv6
	ClusterName string         // default "default"
	ClusterID   uint32         // default 1
	Args        []string       // extra flags
}

// Agent is an isthmus-agent process running in a node's namespace.
type Agent struct {
	Node     *Node
	Socket   string
	StateDir string
	Proc     *Proc
	opts     AgentOptions
	bin      string
	cli      string
}

// StartAgent starts isthmus-agent in the node and waits until its API
// answers. Its state dir and socket live in the node's directory, its maps
// under Node.PinDir().
func (n *Node) StartAgent(ctx context.Context, o AgentOptions) (*Agent, error) {
	bin, err := n.lab.Binary(AgentBinary)
	if err != nil {
		return nil, err
	}
	cli, err := n.lab.Binary(CLIBinary)
	if err != nil {
		return nil, err
	}
	if o.ClusterName == "" {
		o.ClusterName = "default"
	}
	if o.ClusterID == 0 {
		o.ClusterID = 1
	}
	a := &Agent{Node: n, Socket: filepath.Join(n.Dir(), "agent.sock"), StateDir: filepath.Join(n.Dir(), "state"), opts: o, bin: bin, cli: cli}
	return a, a.Start(ctx)
}

// Start (re)starts the agent process with the same configuration.
func (a *Agent) Start(ctx context.Context) error {
	args := []string{a.bin,
		"--node-name", a.Node.NodeName(),
		"--cluster-name", a.opts.ClusterName,
		"--cluster-id", strconv.FormatUint(uint64(a.opts.ClusterID), 10),
		"--state-dir", a.StateDir,
		"--socket", a.Socket,
	}
	for _, c := range a.opts.PodCIDRs {
		args = append(args, "--pod-cidr", c.String())
	}
	args = append(args, a.opts.Args...)
	p, err := a.Node.Start(context.WithoutCancel(ctx), args...)
	if err != nil {
		return err
	}
	a.Proc = p
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := a.CLI(ctx, "status"); err == nil {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("lab: agent on %s exited: %v\n%s", a.Node.Name(), p.Wait(), tail(p.Log(), 4000))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: agent on %s did not answer within 30s\n%s", a.Node.Name(), tail(p.Log(), 4000))
		}
	}
}

// AddArgs appends flags to those the agent starts with from its next Start
// on (a repeated flag's last value wins), e.g. to restart it with
// another setting.
func (a *Agent) AddArgs(args ...string) { a.opts.Args = append(a.opts.Args, args...) }

// KVStoreBundle returns the --kvstore-bundle directory the agent was
// started with: its node's own etcd credential ("" outside cluster mode).
func (a *Agent) KVStoreBundle() string {
	for i, arg := range a.opts.Args {
		if arg == "--kvstore-bundle" && i+1 < len(a.opts.Args) {
			return a.opts.Args[i+1]
		}
	}
	return ""
}

// CLI runs the isthmus CLI against this agent and returns its combined
// output; a non-zero exit is an error that includes the output.
func (a *Agent) CLI(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, a.cli, append([]string{"--socket", a.Socket}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("isthmus %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Pod is a workload namespace attached to an agent.
type Pod struct {
	*Netns
	PodName   string
	Namespace string
	Node      string // the node name of the agent that hosts it
	IPv4      netip.Addr
	IPv6      netip.Addr
}

// Addr returns the pod's IPv6 address when v6 is set, else its IPv4 address.
func (p *Pod) Addr(v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// AddPod creates a pod namespace and attaches it with `isthmus endpoint add`.
// The pod's addresses are read back from its eth0.
func (a *Agent) AddPod(ctx context.Context, name, namespace string, labels map[string]string) (*Pod, error) {
	ns, err := a.Node.lab.AddPodNetns(name)
	if err != nil {
		return nil, err
	}
	if namespace == "" {
		namespace = "default"
	}
	args := []string{"endpoint", "add", name, "--netns", ns.Path(), "--namespace", namespace}
	if len(labels) > 0 {
		var kv []string
		for k, v := range labels {
			kv = append(kv, k+"="+v)
		}
		sort.Strings(kv)
		args = append(args, "--labels", strings.Join(kv, ","))
	}
	if _, err := a.CLI(ctx, args...); err != nil {
		return nil, err
	}
	pod := &Pod{Netns: ns, PodName: name, Namespace: namespace, Node: a.Node.NodeName()}
	h, err := ns.Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	link, err := h.LinkByName("eth0")
	if err != nil {
		return nil, fmt.Errorf("lab: pod %s has no eth0 after endpoint add: %w", name, err)
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, err
	}
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP)
		if !ok || ip.IsLinkLocalUnicast() {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() {
			pod.IPv4 = ip
		} else {
			pod.IPv6 = ip
		}
	}
	return pod, nil
}
