package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// Binaries of the project the lab starts. Binary finds them in
// $ISTHMUS_BIN_DIR, next to the running executable (the `isthmus` CLI), or
// builds them once per process from the module source.
const (
	AgentBinary  = "isthmus-agent"
	CLIBinary    = "isthmus"
	ServerBinary = "isthmus-clustermesh"
	EnvBinDir    = "ISTHMUS_BIN_DIR"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binary returns the path of one of the project's binaries.
func Binary(name string) (string, error) {
	if dir := os.Getenv(EnvBinDir); dir != "" {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("lab: %s=%s has no %s: %w", EnvBinDir, dir, name, err)
		}
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && filepath.Base(exe) == CLIBinary {
			return p, nil
		}
	}
	buildOnce.Do(func() { buildDir, buildErr = buildBinaries() })
	if buildErr != nil {
		return "", buildErr
	}
	return filepath.Join(buildDir, name), nil
}

// CleanupBinaries removes binaries Binary built (call from TestMain).
func CleanupBinaries() {
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

func buildBinaries() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "isthmus-bin-")
	if err != nil {
		return "", err
	}
	args := []string{"build", "-o", dir + "/"}
	for _, b := range []string{AgentBinary, CLIBinary, ServerBinary} {
		if _, err := os.Stat(filepath.Join(root, "cmd", b)); err == nil {
			args = append(args, "./cmd/"+b)
		}
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("lab: build binaries: %v\n%s", err, out)
	}
	return dir, nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/isthmus-mesh/isthmus\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("lab: cannot find the isthmus module root to build binaries (set " + EnvBinDir + ")")
		}
		dir = parent
	}
}

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
	bin, err := Binary(AgentBinary)
	if err != nil {
		return nil, err
	}
	cli, err := Binary(CLIBinary)
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
	pod := &Pod{Netns: ns, PodName: name, Namespace: namespace}
	h, err := ns.Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	link, err := h.LinkByName("eth0")
	if err != nil {
		return nil, fmt.Errorf("lab: pod %s has no eth0 after endpoint add: %w", name, err)
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
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
