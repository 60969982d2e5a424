package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

func TestParseConf(t *testing.T) {
	c, terr := parseConf([]byte(`{"cniVersion":"1.1.0","name":"isthmus","type":"isthmus-cni"}`))
	if terr != nil || c.AgentSocket != "/var/run/isthmus/agent.sock" || c.timeout != DefaultTimeout || c.MTU != 0 {
		t.Errorf("defaults: %+v, %v", c, terr)
	}
	c, terr = parseConf([]byte(`{"cniVersion":"1.0.0","name":"isthmus","type":"isthmus-cni","agentSocket":"/run/n1.sock","mtu":1450,"timeout":"5s"}`))
	if terr != nil || c.AgentSocket != "/run/n1.sock" || c.timeout != 5*time.Second || c.MTU != 1450 {
		t.Errorf("set: %+v, %v", c, terr)
	}
	for conf, want := range map[string]string{
		`{"name":"n","agentSocket":"run/n1.sock"}`: `agentSocket "run/n1.sock" must be an absolute path`,
		`{"name":"n","mtu":20}`:                    "mtu 20 out of range 68-65535",
		`{"name":"n","timeout":"soon"}`:            `timeout "soon": want a positive Go duration`,
		`{"name":"n","timeout":"-1s"}`:             `timeout "-1s"`,
		`{"name":"n","mtu":"big"}`:                 "cannot unmarshal",
	} {
		_, terr := parseConf([]byte(conf))
		if terr == nil || terr.Code != types.ErrInvalidNetworkConfig || !strings.Contains(terr.Details, want) {
			t.Errorf("%s: %v, want code 7 with %q", conf, terr, want)
		}
	}
}

func TestParseArgs(t *testing.T) {
	p, terr := parseArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;OTHER=x", true)
	if terr != nil || p != (pod{Namespace: "prod", Name: "web-0", UID: "u-1"}) {
		t.Errorf("got %+v, %v", p, terr)
	}
	// Unknown keys are ignored even without IgnoreUnknown.
	if _, terr := parseArgs("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;FOO=1", true); terr != nil {
		t.Errorf("unknown key: %v", terr)
	}
	for _, args := range []string{"", "K8S_POD_NAME=b", "K8S_POD_NAMESPACE=a"} {
		if _, terr := parseArgs(args, true); terr == nil || terr.Code != types.ErrInvalidEnvironmentVariables {
			t.Errorf("%q: %v, want code 4", args, terr)
		}
	}
	if _, terr := parseArgs("", false); terr != nil {
		t.Errorf("not needed: %v", terr)
	}
	if _, terr := parseArgs("novalue", false); terr == nil || terr.Code != types.ErrInvalidEnvironmentVariables {
		t.Errorf("malformed: %v", terr)
	}
}

func TestAgentErrorCodes(t *testing.T) {
	c := &NetConf{AgentSocket: "/s.sock", timeout: time.Second}
	for _, tc := range []struct {
		err  error
		code uint
	}{
		{&api.UnreachableError{Socket: "/s.sock", Err: syscall.ENOENT}, types.ErrTryAgainLater},
		{context.DeadlineExceeded, types.ErrTryAgainLater},
		{api.Errorf(http.StatusServiceUnavailable, "labels of pod a/b: not known yet"), types.ErrTryAgainLater},
		{api.Errorf(http.StatusBadRequest, "bad name"), types.ErrInternal},
		{errors.New("boom"), types.ErrInternal},
	} {
		if got := agentError("add", c, tc.err); got.Code != tc.code || got.Details == "" {
			t.Errorf("%v: %+v, want code %d", tc.err, got, tc.code)
		}
	}
}

// fakeAgent answers like the agent.
type fakeAgent struct {
	eps     map[string]api.Endpoint
	err     error
	deleted []string
	gcValid []string
}

func (f *fakeAgent) AddEndpoint(_ context.Context, r api.EndpointRequest) (api.Endpoint, error) {
	if f.err != nil {
		return api.Endpoint{}, f.err
	}
	ep := api.Endpoint{Name: r.Name, Namespace: r.Namespace, Netns: r.Netns, ContainerID: r.ContainerID, Interface: "isth0123456789",
		HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
		IPs: []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:244:1::5")}}
	f.eps[r.Namespace+"/"+r.Name] = ep
	return ep, nil
}

func (f *fakeAgent) DeleteEndpointOf(_ context.Context, ns, name, id string) error {
	if f.err != nil {
		return f.err
	}
	ep, ok := f.eps[ns+"/"+name]
	if !ok {
		return api.Errorf(http.StatusNotFound, "endpoint %s/%s not found", ns, name)
	}
	if ep.ContainerID == id {
		delete(f.eps, ns+"/"+name)
		f.deleted = append(f.deleted, ns+"/"+name)
	}
	return nil
}

func (f *fakeAgent) ListEndpoints(context.Context) ([]api.Endpoint, error) {
	var out []api.Endpoint
	for _, ep := range f.eps {
		out = append(out, ep)
	}
	return out, f.err
}

func (f *fakeAgent) CollectEndpoints(_ context.Context, r api.GCRequest) (api.GCResult, error) {
	f.gcValid = r.Valid
	return api.GCResult{}, f.err
}

func (f *fakeAgent) Ready(context.Context) error { return f.err }

func withFake(t *testing.T) *fakeAgent {
	f := &fakeAgent{eps: map[string]api.Endpoint{}}
	old := newAgent
	newAgent = func(string) agent { return f }
	t.Cleanup(func() { newAgent = old })
	return f
}

// stdout runs fn and returns what it printed.
func stdout(t *testing.T, fn func() error) (string, error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	ferr := fn()
	os.Stdout = old
	w.Close()
	out, _ := io.ReadAll(r)
	return string(out), ferr
}

const podArgs = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"

func cmdArgs(version, extra string) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: "c1", Netns: "/var/run/netns/web", IfName: "eth0", Args: podArgs,
		StdinData: []byte(`{"cniVersion":"` + version + `","name":"isthmus","type":"isthmus-cni"` + extra + `}`)}
}

// The ADD result in each supported version: interfaces, /32 and /128 with
// the gateways, default routes.
func TestAddResult(t *testing.T) {
	withFake(t)
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		out, err := stdout(t, func() error { return cmdAdd(cmdArgs(v, "")) })
		if err != nil {
			t.Fatalf("%s: %v", v, err)
		}
		var res struct {
			CNIVersion string `json:"cniVersion"`
			Interfaces []struct{ Name, Mac, Sandbox string }
			IPs        []struct {
				Version   string `json:"version"`
				Address   string `json:"address"`
				Gateway   string `json:"gateway"`
				Interface *int   `json:"interface"`
			} `json:"ips"`
			Routes []struct{ Dst, GW string } `json:"routes"`
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("%s: %v\n%s", v, err, out)
		}
		if res.CNIVersion != v || len(res.Interfaces) != 2 || res.Interfaces[1].Name != "eth0" || res.Interfaces[1].Sandbox != "/var/run/netns/web" ||
			res.Interfaces[1].Mac != "02:00:00:00:00:02" || res.Interfaces[0].Name != "isth0123456789" {
			t.Errorf("%s: interfaces %s", v, out)
		}
		if len(res.IPs) != 2 || res.IPs[0].Address != "10.244.1.5/32" || res.IPs[0].Gateway != "169.254.1.1" ||
			res.IPs[1].Address != "fd00:244:1::5/128" || res.IPs[1].Gateway != "fe80::1" || *res.IPs[1].Interface != 1 {
			t.Errorf("%s: ips %s", v, out)
		}
		if (v == "0.4.0") != (res.IPs[0].Version == "4") {
			t.Errorf("%s: the IP version field: %s", v, out)
		}
		if len(res.Routes) != 2 || res.Routes[0].Dst != "0.0.0.0/0" || res.Routes[0].GW != "169.254.1.1" || res.Routes[1].Dst != "::/0" || res.Routes[1].GW != "fe80::1" {
			t.Errorf("%s: routes %s", v, out)
		}
	}
}

func TestCommandErrors(t *testing.T) {
	f := withFake(t)
	code := func(err error) uint {
		var e *types.Error
		if !errors.As(err, &e) {
			return 0
		}
		return e.Code
	}
	// No pod in CNI_ARGS.
	a := cmdArgs("1.1.0", "")
	a.Args = ""
	if err := cmdAdd(a); code(err) != types.ErrInvalidEnvironmentVariables {
		t.Errorf("ADD without pod: %v", err)
	}
	// A broken config.
	if err := cmdAdd(cmdArgs("1.1.0", `,"mtu":1`)); code(err) != types.ErrInvalidNetworkConfig {
		t.Errorf("ADD with mtu 1: %v", err)
	}
	// DEL of something gone, of another container, twice: all succeed.
	if err := cmdDel(cmdArgs("1.1.0", "")); err != nil {
		t.Errorf("DEL of nothing: %v", err)
	}
	if _, err := stdout(t, func() error { return cmdAdd(cmdArgs("1.1.0", "")) }); err != nil {
		t.Fatal(err)
	}
	old := cmdArgs("1.1.0", "")
	old.ContainerID = "c0"
	if err := cmdDel(old); err != nil || len(f.eps) != 1 {
		t.Errorf("DEL of an old container: %v, endpoints %v", err, f.eps)
	}
	// DEL without CNI_ARGS finds the container's endpoint.
	noPod := cmdArgs("1.1.0", "")
	noPod.Args = ""
	if err := cmdDel(noPod); err != nil || len(f.eps) != 0 {
		t.Errorf("DEL by container ID: %v, endpoints %v", err, f.eps)
	}
	// CHECK without prevResult, and of a missing endpoint.
	if err := cmdCheck(cmdArgs("1.1.0", "")); code(err) != types.ErrInvalidNetworkConfig {
		t.Errorf("CHECK without prevResult: %v", err)
	}
	prev := `,"prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[]}`
	if err := cmdCheck(cmdArgs("1.1.0", prev)); code(err) != types.ErrUnknownContainer {
		t.Errorf("CHECK of no endpoint: %v", err)
	}
	// GC passes the valid container IDs.
	gc := cmdArgs("1.1.0", `,"cni.dev/valid-attachments":[{"containerID":"c7","ifname":"eth0"}]`)
	if err := cmdGC(gc); err != nil || len(f.gcValid) != 1 || f.gcValid[0] != "c7" {
		t.Errorf("GC: %v, valid %v", err, f.gcValid)
	}
	// The agent away: ADD, DEL and GC try again later; STATUS is code 50.
	f.err = &api.UnreachableError{Socket: "/s", Err: syscall.ECONNREFUSED}
	for name, fn := range map[string]func(*skel.CmdArgs) error{"ADD": cmdAdd, "DEL": cmdDel, "GC": cmdGC} {
		if err := fn(cmdArgs("1.1.0", "")); code(err) != types.ErrTryAgainLater {
			t.Errorf("%s with the agent away: %v", name, err)
		}
	}
	if err := cmdStatus(cmdArgs("1.1.0", "")); code(err) != types.ErrPluginNotAvailable {
		t.Errorf("STATUS with the agent away: %v", err)
	}
	f.err = nil
	if err := cmdStatus(cmdArgs("1.1.0", "")); err != nil {
		t.Errorf("STATUS: %v", err)
	}
}
