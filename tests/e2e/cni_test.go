package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/cniinstall"
	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// cniNode is a node whose agent installed the CNI plugin, and how to run
// the installed plugin as a container runtime does.
type cniNode struct {
	*node
	plugin string         // the installed binary
	conf   map[string]any // the plugin's entry of the installed conflist
}

// cniResult is what the plugin printed: a result, or a CNI error.
type cniResult struct {
	out  []byte
	code uint // 0 on success
	msg  string
}

type cniCall struct {
	command, containerID, netns, ifName, args string
	conf                                      map[string]any // overrides of the conflist's entry
}

// run runs the installed plugin in the node's namespace with the CNI
// environment and the network configuration on stdin.
func (c *cniNode) run(call cniCall) cniResult {
	c.t.Helper()
	conf := map[string]any{"cniVersion": "1.1.0", "name": "isthmus"}
	for k, v := range c.conf {
		conf[k] = v
	}
	for k, v := range call.conf {
		if v == nil {
			delete(conf, k)
		} else {
			conf[k] = v
		}
	}
	stdin, err := json.Marshal(conf)
	if err != nil {
		c.t.Fatal(err)
	}
	return c.runRaw(call, stdin)
}

func (c *cniNode) runRaw(call cniCall, stdin []byte) cniResult {
	c.t.Helper()
	if call.ifName == "" {
		call.ifName = "eth0"
	}
	cmd := c.node.node.Command(c.ctx, c.plugin)
	cmd.Env = append(cmd.Env, "CNI_COMMAND="+call.command, "CNI_CONTAINERID="+call.containerID, "CNI_NETNS="+call.netns,
		"CNI_IFNAME="+call.ifName, "CNI_ARGS="+call.args, "CNI_PATH="+filepath.Dir(c.plugin))
	cmd.Stdin = strings.NewReader(string(stdin))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return cniResult{out: out}
	case errors.As(err, &exit):
		var e struct {
			Code    uint   `json:"code"`
			Msg     string `json:"msg"`
			Details string `json:"details"`
		}
		if jerr := json.Unmarshal(out, &e); jerr != nil || e.Code == 0 {
			c.t.Fatalf("%s: exit %v with no CNI error on stdout: %q (stderr %q)", call.command, err, out, stderr.String())
		}
		c.t.Logf("%s -> CNI error %d: %s: %s", call.command, e.Code, e.Msg, e.Details)
		return cniResult{out: out, code: e.Code, msg: e.Msg + ": " + e.Details}
	}
	c.t.Fatalf("run %s %s: %v", c.plugin, call.command, err)
	return cniResult{}
}

// ok fails the test unless the call succeeded.
func (c *cniNode) ok(call cniCall) []byte {
	c.t.Helper()
	r := c.run(call)
	if r.code != 0 {
		c.t.Fatalf("%s %s: CNI error %d: %s", call.command, call.containerID, r.code, r.msg)
	}
	return r.out
}

// fails fails the test unless the call failed with code.
func (c *cniNode) fails(call cniCall, code uint) string {
	c.t.Helper()
	r := c.run(call)
	if r.code != code {
		c.t.Fatalf("%s %s: got code %d (%s), want %d; output %s", call.command, call.containerID, r.code, r.msg, code, r.out)
	}
	return r.msg
}

func podArgs(name, uid string) string {
	return "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + name + ";K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=" + uid
}

// endpoint returns the agent's endpoint default/name, if any.
func (c *cniNode) endpoint(name string) (api.Endpoint, bool) {
	c.t.Helper()
	for _, ep := range c.endpoints() {
		if ep.Namespace == "default" && ep.Name == name {
			return ep, true
		}
	}
	return api.Endpoint{}, false
}

// startCNINode starts an agent that installs the plugin and its conflist
// into the node's CNI directories, and reads them back.
func startCNINode(t *testing.T) *cniNode {
	t.Helper()
	l := labtest.New(t)
	built := labtest.Binary(t, lab.CNIBinary)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	ln, err := l.AddNode("node")
	if err != nil {
		t.Fatal(err)
	}
	binDir, confDir := filepath.Join(ln.Dir(), "opt-cni-bin"), filepath.Join(ln.Dir(), "etc-cni-net.d")
	step(t, "starting isthmus-agent on %s with --cni-bin-dir %s --cni-conf-dir %s", ln.NodeName(), binDir, confDir)
	a, err := ln.StartAgent(ctx, lab.AgentOptions{PodCIDRs: []netip.Prefix{podCIDR4, podCIDR6},
		Args: []string{"--cni-bin-dir", binDir, "--cni-conf-dir", confDir, "--cni-plugin-path", built}})
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(confDir, cniinstall.ConfListName))
	if err != nil {
		t.Fatal(err)
	}
	var cl struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(data, &cl); err != nil || len(cl.Plugins) != 1 {
		t.Fatalf("conflist %s: %v", data, err)
	}
	sock, _ := filepath.Abs(a.Socket)
	if cl.CNIVersion != "1.0.0" || cl.Name != "isthmus" || cl.Plugins[0]["type"] != "isthmus-cni" || cl.Plugins[0]["agentSocket"] != sock {
		t.Fatalf("conflist: %s", data)
	}
	plugin := filepath.Join(binDir, "isthmus-cni")
	if st, err := os.Stat(plugin); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed plugin: %v, %v", st, err)
	}
	return &cniNode{node: &node{t: t, ctx: ctx, lab: l, node: ln, agent: a}, plugin: plugin, conf: cl.Plugins[0]}
}

// addResult is the part of an ADD result the test checks.
type addResult struct {
	CNIVersion string `json:"cniVersion"`
	Interfaces []struct {
		Name    string `json:"name"`
		Mac     string `json:"mac"`
		Sandbox string `json:"sandbox"`
	} `json:"interfaces"`
	IPs []struct {
		Address   netip.Prefix `json:"address"`
		Gateway   netip.Addr   `json:"gateway"`
		Interface *int         `json:"interface"`
	} `json:"ips"`
	Routes []struct {
		Dst netip.Prefix `json:"dst"`
		GW  netip.Addr   `json:"gw"`
	} `json:"routes"`
}

func parseAdd(t *testing.T, out []byte) addResult {
	t.Helper()
	var r addResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("ADD result %s: %v", out, err)
	}
	return r
}

// checkAddResult checks a result against the agent's endpoint and the pod's
// namespace.
func (c *cniNode) checkAddResult(r addResult, version string, pod *lab.Netns, ep api.Endpoint) {
	c.t.Helper()
	t := c.t
	if r.CNIVersion != version || len(r.Interfaces) != 2 || r.Interfaces[1].Name != "eth0" || r.Interfaces[1].Sandbox != pod.Path() ||
		r.Interfaces[1].Mac != ep.PodMAC || r.Interfaces[0].Name != ep.Interface || r.Interfaces[0].Sandbox != "" {
		t.Errorf("ADD result interfaces: %+v (endpoint %+v)", r, ep)
	}
	want := []netip.Prefix{}
	for _, a := range ep.IPs {
		want = append(want, netip.PrefixFrom(a, a.BitLen()))
	}
	var got []netip.Prefix
	for _, ip := range r.IPs {
		got = append(got, ip.Address)
		gw := netip.MustParseAddr("169.254.1.1")
		if ip.Address.Addr().Is6() {
			gw = netip.MustParseAddr("fe80::1")
		}
		if ip.Gateway != gw || ip.Interface == nil || *ip.Interface != 1 {
			t.Errorf("ADD result IP %+v: want gateway %s on interface 1", ip, gw)
		}
		if !podCIDR4.Contains(ip.Address.Addr()) && !podCIDR6.Contains(ip.Address.Addr()) {
			t.Errorf("ADD result IP %s outside the pod CIDRs", ip.Address)
		}
	}
	if len(want) != 2 || !slices.Equal(got, want) {
		t.Errorf("ADD result IPs %v, the endpoint has %v", got, want)
	}
	if len(r.Routes) != 2 || r.Routes[0].Dst.String() != "0.0.0.0/0" || r.Routes[0].GW.String() != "169.254.1.1" ||
		r.Routes[1].Dst.String() != "::/0" || r.Routes[1].GW.String() != "fe80::1" {
		t.Errorf("ADD result routes: %+v", r.Routes)
	}
	// The pod's namespace has them.
	h, err := pod.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	link, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatalf("pod %s: %v", pod.Name(), err)
	}
	if link.Attrs().HardwareAddr.String() != ep.PodMAC {
		t.Errorf("pod eth0 MAC %s, endpoint %s", link.Attrs().HardwareAddr, ep.PodMAC)
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	have := map[netip.Prefix]bool{}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		have[netip.PrefixFrom(ip.Unmap(), ones)] = true
	}
	for _, p := range want {
		if !have[p] {
			t.Errorf("pod eth0 lacks %s (has %v)", p, have)
		}
	}
}

// The CNI plugin as a container runtime drives it, against a real agent:
// the agent installs it; ADD (and again: the same), CHECK, a recreated
// sandbox replaces the endpoint, a late DEL of the old sandbox changes
// nothing, STATUS, GC of a leaked attachment (not of a CLI endpoint), DEL
// twice, and the error codes of a broken config and of an agent that is
// away.
func TestCNIPlugin(t *testing.T) {
	c := startCNINode(t)
	nodeIP := netip.MustParseAddr("198.51.100.1")
	peer, err := c.lab.AddPodNetns("peer")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.lab.Link(c.node.node, peer, netip.PrefixFrom(nodeIP, 24), netip.MustParsePrefix("198.51.100.2/24")); err != nil {
		t.Fatal(err)
	}

	step(t, "ADD pod web (container c1)")
	web1, err := c.lab.AddPodNetns("web1")
	if err != nil {
		t.Fatal(err)
	}
	add1 := cniCall{command: "ADD", containerID: "c1", netns: web1.Path(), args: podArgs("web", "uid-1")}
	out1 := c.ok(add1)
	ep, ok := c.endpoint("web")
	if !ok || ep.ContainerID != "c1" || ep.PodUID != "uid-1" || ep.Netns != web1.Path() {
		t.Fatalf("endpoint after ADD: %+v, %v", ep, ok)
	}
	res1 := parseAdd(t, out1)
	c.checkAddResult(res1, "1.1.0", web1, ep)
	if err := eventually(5*time.Second, func() error { return ping(c.ctx, web1, nodeIP, 1) }); err != nil {
		t.Errorf("pod web -> node %s: %v", nodeIP, err)
	}

	step(t, "ADD again (the same container): the same endpoint")
	if out := c.ok(add1); string(out) != string(out1) {
		t.Errorf("repeated ADD:\n got %s\nwant %s", out, out1)
	}
	if again, _ := c.endpoint("web"); again.ID != ep.ID {
		t.Errorf("repeated ADD changed the endpoint: %+v -> %+v", ep, again)
	}

	step(t, "CHECK with the ADD's result")
	var prev map[string]any
	if err := json.Unmarshal(out1, &prev); err != nil {
		t.Fatal(err)
	}
	check1 := cniCall{command: "CHECK", containerID: "c1", netns: web1.Path(), args: podArgs("web", "uid-1"), conf: map[string]any{"prevResult": prev}}
	c.ok(check1)
	bad := map[string]any{}
	for k, v := range prev {
		bad[k] = v
	}
	bad["ips"] = []any{map[string]any{"address": "10.244.1.250/32", "gateway": "169.254.1.1", "interface": 1}}
	c.fails(cniCall{command: "CHECK", containerID: "c1", netns: web1.Path(), args: podArgs("web", "uid-1"), conf: map[string]any{"prevResult": bad}}, 999)
	c.fails(cniCall{command: "CHECK", containerID: "c1", netns: web1.Path(), args: podArgs("web", "uid-1"), conf: map[string]any{"prevResult": prev, "mtu": 1280}}, 999)

	step(t, "the sandbox is recreated: ADD of container c2 in a new netns replaces the endpoint")
	web2, err := c.lab.AddPodNetns("web2")
	if err != nil {
		t.Fatal(err)
	}
	add2 := cniCall{command: "ADD", containerID: "c2", netns: web2.Path(), args: podArgs("web", "uid-1")}
	out2 := c.ok(add2)
	ep2, _ := c.endpoint("web")
	if ep2.ContainerID != "c2" || ep2.Netns != web2.Path() || ep2.ID == ep.ID {
		t.Fatalf("endpoint after the replacing ADD: %+v", ep2)
	}
	c.checkAddResult(parseAdd(t, out2), "1.1.0", web2, ep2)
	if h, err := web1.Handle(); err == nil {
		if _, err := h.LinkByName("eth0"); err == nil {
			t.Error("the old sandbox still has eth0")
		}
		h.Close()
	}
	if err := eventually(5*time.Second, func() error { return ping(c.ctx, web2, nodeIP, 1) }); err != nil {
		t.Errorf("pod web (c2) -> node: %v", err)
	}

	step(t, "a late DEL of c1 leaves the pod's endpoint (c2) alone; CHECK of c1 fails")
	c.ok(cniCall{command: "DEL", containerID: "c1", netns: web1.Path(), args: podArgs("web", "uid-1")})
	if now, ok := c.endpoint("web"); !ok || now.ContainerID != "c2" {
		t.Fatalf("after DEL of c1: %+v, %v", now, ok)
	}
	c.fails(check1, 3)

	step(t, "STATUS")
	c.ok(cniCall{command: "STATUS"})

	step(t, "GC: a leaked attachment (0.4.0 config) goes, the valid one and a CLI pod stay")
	leak, err := c.lab.AddPodNetns("leak")
	if err != nil {
		t.Fatal(err)
	}
	out3 := c.ok(cniCall{command: "ADD", containerID: "c3", netns: leak.Path(), args: podArgs("leak", "uid-3"), conf: map[string]any{"cniVersion": "0.4.0"}})
	if r := parseAdd(t, out3); r.CNIVersion != "0.4.0" || len(r.IPs) != 2 {
		t.Errorf("0.4.0 ADD result: %s", out3)
	}
	c.addPod("cli", map[string]string{"app": "cli"})
	c.ok(cniCall{command: "GC", conf: map[string]any{"cni.dev/valid-attachments": []any{map[string]any{"containerID": "c2", "ifname": "eth0"}}}})
	if _, ok := c.endpoint("leak"); ok {
		t.Error("GC left the leaked endpoint")
	}
	for _, name := range []string{"web", "cli"} {
		if _, ok := c.endpoint(name); !ok {
			t.Errorf("GC removed %s", name)
		}
	}

	step(t, "DEL c2, twice")
	del2 := cniCall{command: "DEL", containerID: "c2", netns: web2.Path(), args: podArgs("web", "uid-1")}
	c.ok(del2)
	if _, ok := c.endpoint("web"); ok {
		t.Error("DEL left the endpoint")
	}
	c.ok(del2)
	c.ok(cniCall{command: "DEL", containerID: "c2"}) // no CNI_ARGS, no netns

	step(t, "broken configurations")
	c.fails(cniCall{command: "ADD", containerID: "c4", netns: web2.Path(), args: podArgs("web", ""), conf: map[string]any{"mtu": 10}}, 7)
	c.fails(cniCall{command: "ADD", containerID: "c4", netns: web2.Path(), args: podArgs("web", ""), conf: map[string]any{"timeout": "soon"}}, 7)
	c.fails(cniCall{command: "ADD", containerID: "c4", netns: web2.Path(), args: podArgs("web", ""), conf: map[string]any{"agentSocket": "agent.sock"}}, 7)
	if r := c.runRaw(cniCall{command: "ADD", containerID: "c4", netns: web2.Path(), args: podArgs("web", "")}, []byte(`{"cniVersion":"1.1.0","name":`)); r.code != 6 {
		t.Errorf("unparseable config: code %d (%s), want 6 (decoding failure, from skel)", r.code, r.msg)
	}
	c.fails(cniCall{command: "ADD", containerID: "c4", netns: web2.Path(), args: "IgnoreUnknown=1"}, 4)

	step(t, "no agent at the socket: ADD and DEL try again later (11)")
	gone := map[string]any{"agentSocket": filepath.Join(c.lab.Dir(), "no-agent.sock")}
	c.fails(cniCall{command: "ADD", containerID: "c4", netns: web2.Path(), args: podArgs("web", ""), conf: gone}, 11)
	c.fails(cniCall{command: "DEL", containerID: "c4", args: podArgs("web", ""), conf: gone}, 11)

	step(t, "the agent stops: STATUS is 50, DEL 11")
	if err := c.agent.Proc.Stop(); err != nil {
		t.Logf("stop agent: %v", err)
	}
	msg := c.fails(cniCall{command: "STATUS"}, 50)
	if !strings.Contains(msg, "not reachable") {
		t.Errorf("STATUS message: %s", msg)
	}
	c.fails(cniCall{command: "DEL", containerID: "c2", args: podArgs("web", "uid-1")}, 11)
}
