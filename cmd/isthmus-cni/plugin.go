package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/endpoint"
)

const (
	// DefaultAgentSocket is the agent socket when the config names none.
	DefaultAgentSocket = api.SocketDir + "/agent.sock"
	// DefaultTimeout bounds one call to the agent (an ADD waits for the
	// datapath to take the pod).
	DefaultTimeout = 60 * time.Second
)

// NetConf is the plugin's network configuration.
type NetConf struct {
	types.PluginConf
	// AgentSocket is the node agent's API socket (absolute path).
	AgentSocket string `json:"agentSocket,omitempty"`
	// MTU, when set, is the MTU CHECK expects on the pod's interface (the
	// agent sets it, from its --mtu).
	MTU int `json:"mtu,omitempty"`
	// Timeout bounds one call to the agent, a Go duration ("30s").
	Timeout string `json:"timeout,omitempty"`

	timeout time.Duration
}

// K8sArgs are the CNI_ARGS the kubelet's runtime passes.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // the names are the wire format
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

// parseConf decodes and checks the network configuration: a value that
// cannot work is ErrInvalidNetworkConfig (7).
func parseConf(data []byte) (*NetConf, *types.Error) {
	var c NetConf
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration", err.Error())
	}
	if c.AgentSocket == "" {
		c.AgentSocket = DefaultAgentSocket
	}
	if !filepath.IsAbs(c.AgentSocket) {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration",
			fmt.Sprintf("agentSocket %q must be an absolute path (the agent's --socket)", c.AgentSocket))
	}
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration",
			fmt.Sprintf("mtu %d out of range 68-65535", c.MTU))
	}
	c.timeout = DefaultTimeout
	if c.Timeout != "" {
		d, err := time.ParseDuration(c.Timeout)
		if err != nil || d <= 0 {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network configuration",
				fmt.Sprintf("timeout %q: want a positive Go duration such as \"30s\"", c.Timeout))
		}
		c.timeout = d
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "invalid prevResult", err.Error())
	}
	return &c, nil
}

// pod is who a call is about.
type pod struct {
	Namespace, Name, UID string
}

// parseArgs reads the pod from CNI_ARGS; unknown keys are ignored. With
// need, a missing pod name or namespace is ErrInvalidEnvironmentVariables.
func parseArgs(args string, need bool) (pod, *types.Error) {
	var a K8sArgs
	a.IgnoreUnknown = true
	if err := types.LoadArgs(args, &a); err != nil {
		return pod{}, types.NewError(types.ErrInvalidEnvironmentVariables, "invalid CNI_ARGS", err.Error())
	}
	p := pod{Namespace: string(a.K8S_POD_NAMESPACE), Name: string(a.K8S_POD_NAME), UID: string(a.K8S_POD_UID)}
	if need && (p.Name == "" || p.Namespace == "") {
		return pod{}, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS lacks the pod",
			"want K8S_POD_NAMESPACE and K8S_POD_NAME (set by the kubelet's container runtime)")
	}
	return p, nil
}

// agent is what the plugin asks of the node agent (api.Client).
type agent interface {
	AddEndpoint(ctx context.Context, req api.EndpointRequest) (api.Endpoint, error)
	DeleteEndpointOf(ctx context.Context, namespace, name, containerID string) error
	ListEndpoints(ctx context.Context) ([]api.Endpoint, error)
	CollectEndpoints(ctx context.Context, req api.GCRequest) (api.GCResult, error)
	Ready(ctx context.Context) error
}

// newAgent connects to the agent; tests replace it.
var newAgent = func(socket string) agent { return api.NewClient(socket) }

// agentError turns an error of the agent into a CNI error: an agent that
// cannot be reached, is not ready (503) or does not answer in time is
// ErrTryAgainLater (11), anything else ErrInternal (999) with its message.
func agentError(what string, c *NetConf, err error) *types.Error {
	var unreachable *api.UnreachableError
	switch {
	case errors.As(err, &unreachable):
		return types.NewError(types.ErrTryAgainLater, what+": the node agent is not reachable", err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return types.NewError(types.ErrTryAgainLater, what+": the node agent did not answer in time",
			fmt.Sprintf("no answer from %s within %s (the config's timeout)", c.AgentSocket, c.timeout))
	case api.StatusOf(err) == http.StatusServiceUnavailable:
		return types.NewError(types.ErrTryAgainLater, what+": the node agent cannot do it now", err.Error())
	}
	return types.NewError(types.ErrInternal, what+": the node agent refused", err.Error())
}

func setup(args *skel.CmdArgs, needPod bool) (*NetConf, pod, context.Context, context.CancelFunc, *types.Error) {
	c, terr := parseConf(args.StdinData)
	if terr != nil {
		return nil, pod{}, nil, nil, terr
	}
	p, terr := parseArgs(args.Args, needPod)
	if terr != nil {
		return nil, pod{}, nil, nil, terr
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	return c, p, ctx, cancel, nil
}

// cmdAdd asks the agent for the pod's endpoint (a repeated ADD gets the
// same one; a new sandbox of the pod replaces it) and reports it.
func cmdAdd(args *skel.CmdArgs) error {
	c, p, ctx, cancel, terr := setup(args, true)
	if terr != nil {
		return terr
	}
	defer cancel()
	if args.Netns == "" {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_NETNS is empty", "ADD needs the pod's network namespace")
	}
	ep, err := newAgent(c.AgentSocket).AddEndpoint(ctx, api.EndpointRequest{
		Name: p.Name, Namespace: p.Namespace, Netns: args.Netns,
		ContainerID: args.ContainerID, IfName: args.IfName, PodUID: p.UID,
	})
	if err != nil {
		return agentError(fmt.Sprintf("add pod %s/%s", p.Namespace, p.Name), c, err)
	}
	return types.PrintResult(resultOf(ep, args.IfName, args.Netns), c.CNIVersion)
}

// resultOf is the CNI result of an endpoint: the host veth and the pod's
// interface, its /32 and /128 with the gateways the agent routes through,
// and a default route per family.
func resultOf(ep api.Endpoint, ifName, netns string) *types100.Result {
	res := &types100.Result{CNIVersion: types100.ImplementedSpecVersion,
		Interfaces: []*types100.Interface{
			{Name: ep.Interface, Mac: ep.HostMAC},
			{Name: ifName, Mac: ep.PodMAC, Sandbox: netns},
		}}
	podIf := 1
	var v4, v6 bool
	for _, a := range ep.IPs {
		gw, bits := endpoint.GatewayIPv4, 32
		if a.Is6() {
			gw, bits = endpoint.GatewayIPv6, 128
			v6 = true
		} else {
			v4 = true
		}
		res.IPs = append(res.IPs, &types100.IPConfig{Interface: &podIf,
			Address: net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, bits)}, Gateway: gw.AsSlice()})
	}
	if v4 {
		res.Routes = append(res.Routes, &types.Route{Dst: net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, GW: endpoint.GatewayIPv4.AsSlice()})
	}
	if v6 {
		res.Routes = append(res.Routes, &types.Route{Dst: net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, GW: endpoint.GatewayIPv6.AsSlice()})
	}
	return res
}

// cmdDel removes the pod's endpoint if it belongs to this container: a DEL
// of an older sandbox leaves the pod's current endpoint alone, and a DEL
// of something already gone succeeds. An unreachable agent is
// ErrTryAgainLater, so the runtime retries.
func cmdDel(args *skel.CmdArgs) error {
	c, p, ctx, cancel, terr := setup(args, false)
	if terr != nil {
		return terr
	}
	defer cancel()
	a := newAgent(c.AgentSocket)
	targets := []pod{p}
	if p.Name == "" || p.Namespace == "" {
		// No pod in CNI_ARGS: find the container's endpoint.
		eps, err := a.ListEndpoints(ctx)
		if err != nil {
			return agentError("delete container "+args.ContainerID, c, err)
		}
		targets = nil
		for _, ep := range eps {
			if ep.ContainerID == args.ContainerID {
				targets = append(targets, pod{Namespace: ep.Namespace, Name: ep.Name})
			}
		}
	}
	for _, t := range targets {
		if err := a.DeleteEndpointOf(ctx, t.Namespace, t.Name, args.ContainerID); err != nil && !api.IsNotFound(err) {
			return agentError(fmt.Sprintf("delete pod %s/%s", t.Namespace, t.Name), c, err)
		}
	}
	return nil
}

// cmdCheck verifies that the pod's endpoint exists for this container and
// that its interface and addresses are what the previous result says,
// in the agent's records and in the pod's namespace.
func cmdCheck(args *skel.CmdArgs) error {
	c, p, ctx, cancel, terr := setup(args, true)
	if terr != nil {
		return terr
	}
	defer cancel()
	if c.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs prevResult", "the runtime passes the ADD's result as prevResult")
	}
	prev, err := types100.NewResultFromResult(c.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "invalid prevResult", err.Error())
	}
	eps, err := newAgent(c.AgentSocket).ListEndpoints(ctx)
	if err != nil {
		return agentError(fmt.Sprintf("check pod %s/%s", p.Namespace, p.Name), c, err)
	}
	var ep *api.Endpoint
	for i := range eps {
		if eps[i].Namespace == p.Namespace && eps[i].Name == p.Name {
			ep = &eps[i]
		}
	}
	key := p.Namespace + "/" + p.Name
	switch {
	case ep == nil:
		return types.NewError(types.ErrUnknownContainer, "pod "+key+" has no endpoint", "the agent does not know it (deleted, or never added)")
	case ep.ContainerID != args.ContainerID:
		return types.NewError(types.ErrUnknownContainer, "pod "+key+" has an endpoint of another container",
			fmt.Sprintf("the endpoint belongs to container %q, not %q", ep.ContainerID, args.ContainerID))
	}
	if problems := compare(prev, resultOf(*ep, args.IfName, ep.Netns), args); len(problems) > 0 {
		return types.NewError(types.ErrInternal, "pod "+key+" does not match its ADD result", strings.Join(problems, "; "))
	}
	if args.Netns != "" && args.Netns != ep.Netns {
		return types.NewError(types.ErrInternal, "pod "+key+" is in another network namespace",
			fmt.Sprintf("the endpoint is in %s, CNI_NETNS is %s", ep.Netns, args.Netns))
	}
	if problems := inspectPod(ep.Netns, args.IfName, ep, c.MTU); len(problems) > 0 {
		return types.NewError(types.ErrInternal, "pod "+key+"'s interface is not as plumbed", strings.Join(problems, "; "))
	}
	return nil
}

// compare lists how prev (the ADD's result) differs from what the agent
// reports now.
func compare(prev, now *types100.Result, args *skel.CmdArgs) []string {
	var problems []string
	var podIf *types100.Interface
	for _, i := range prev.Interfaces {
		if i.Name == args.IfName && i.Sandbox != "" {
			podIf = i
		}
	}
	switch {
	case podIf == nil:
		problems = append(problems, "prevResult has no interface "+args.IfName+" in a sandbox")
	case !strings.EqualFold(podIf.Mac, now.Interfaces[1].Mac):
		problems = append(problems, fmt.Sprintf("interface %s: prevResult says MAC %s, the agent %s", args.IfName, podIf.Mac, now.Interfaces[1].Mac))
	}
	want := map[string]bool{}
	for _, ip := range now.IPs {
		want[ip.Address.String()] = true
	}
	got := map[string]bool{}
	for _, ip := range prev.IPs {
		got[ip.Address.String()] = true
		if !want[ip.Address.String()] {
			problems = append(problems, "prevResult has address "+ip.Address.String()+", the endpoint does not")
		}
	}
	for a := range want {
		if !got[a] {
			problems = append(problems, "the endpoint has address "+a+", prevResult does not")
		}
	}
	return problems
}

// cmdStatus reports whether the agent is there and ready for ADDs.
func cmdStatus(args *skel.CmdArgs) error {
	c, terr := parseConf(args.StdinData)
	if terr != nil {
		return terr
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(c.timeout, 10*time.Second))
	defer cancel()
	if err := newAgent(c.AgentSocket).Ready(ctx); err != nil {
		var unreachable *api.UnreachableError
		if errors.As(err, &unreachable) {
			return types.NewError(types.ErrPluginNotAvailable, "the node agent is not reachable", err.Error())
		}
		return types.NewError(types.ErrPluginNotAvailable, "the node agent is not ready", err.Error())
	}
	return nil
}

// cmdGC asks the agent to remove the endpoints of containers the runtime
// no longer has. Endpoints the CLI added (no container ID) are never
// collected.
func cmdGC(args *skel.CmdArgs) error {
	c, terr := parseConf(args.StdinData)
	if terr != nil {
		return terr
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	req := api.GCRequest{Valid: []string{}}
	for _, v := range c.ValidAttachments {
		req.Valid = append(req.Valid, v.ContainerID)
	}
	res, err := newAgent(c.AgentSocket).CollectEndpoints(ctx, req)
	if err != nil {
		return agentError("garbage collection", c, err)
	}
	for _, ep := range res.Removed {
		fmt.Fprintf(os.Stderr, "isthmus-cni: GC removed endpoint %s/%s of container %s\n", ep.Namespace, ep.Name, ep.ContainerID)
	}
	if len(res.Errors) > 0 {
		return types.NewError(types.ErrInternal, "garbage collection left endpoints behind", strings.Join(res.Errors, "; "))
	}
	return nil
}

// addrsOf is the set of an endpoint's addresses as prefixes.
func addrsOf(ep *api.Endpoint) map[netip.Prefix]bool {
	m := map[netip.Prefix]bool{}
	for _, a := range ep.IPs {
		m[netip.PrefixFrom(a, a.BitLen())] = true
	}
	return m
}
