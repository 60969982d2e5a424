package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// outputBackend adds canned read answers to backend (its own type, so
// that other tests' fakes do not collide with these methods).
type outputBackend struct {
	backend
	applyErr error
}

var testEndpoints = []api.Endpoint{
	{Name: "web1", Namespace: "default", Labels: map[string]string{"app": "web"}, Netns: "/var/run/netns/web1",
		Interface: "isth0123456789", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}, Identity: 1048577},
	{Name: "db1", Namespace: "shop", Netns: "/var/run/netns/db1",
		Interface: "isth9876543210", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.3")}, Identity: 1048578},
}

func (b *outputBackend) ListEndpoints(context.Context) ([]api.Endpoint, error) {
	return testEndpoints, nil
}

func (b *outputBackend) Identities(context.Context) ([]api.Identity, error) {
	return []api.Identity{
		{ID: 1, Labels: map[string]string{"isthmus.io/reserved": "host"}},
		{ID: 1048577, Labels: map[string]string{"app": "web", "isthmus.io/namespace": "default"}, Endpoints: 1},
	}, nil
}

func (b *outputBackend) Status(context.Context) (api.Status, error) {
	return api.Status{Node: "n1", Cluster: "c1", ClusterID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
		AttachMode: "tcx", Started: time.Now().Add(-time.Minute), Endpoints: 2, Services: 1,
		Metrics: []api.Metric{{Reason: "forward", Packets: 7, Bytes: 700}},
		ClusterMesh: &api.ClusterMeshStatus{KVStoreEndpoints: []string{"https://192.0.2.1:2379"}, Connected: true,
			Clusters: []api.ClusterSummary{{Name: "c1", ID: 1, Local: true, Synced: true, Nodes: 2}}},
	}, nil
}

func (b *outputBackend) Apply(ctx context.Context, y []byte) (api.ApplyResult, error) {
	if b.applyErr != nil {
		return api.ApplyResult{}, b.applyErr
	}
	return b.backend.Apply(ctx, y)
}

// TestReadOutputs runs every read verb against the fake agent with each
// -o format and checks that JSON and YAML carry the API's objects whole.
func TestReadOutputs(t *testing.T) {
	sock := serveFake(t, &outputBackend{})

	out, err := run(t, sock, "", "endpoint", "list")
	if err != nil || !regexpLine(out, `^NAMESPACE\s+NAME\s+IPS\s+IDENTITY`) || !regexpLine(out, `^default\s+web1\s+10\.0\.0\.2\s+1048577\s+app=web\s+isth0123456789`) {
		t.Errorf("endpoint list: %v\n%s", err, out)
	}
	for _, format := range []string{"json", "yaml"} {
		out, err := run(t, sock, "", "endpoint", "ls", "-o", format)
		var eps []api.Endpoint
		if err == nil {
			err = unmarshalOutput(format, out, &eps)
		}
		if err != nil || len(eps) != 2 || eps[0].Interface != "isth0123456789" || eps[1].Namespace != "shop" {
			t.Errorf("endpoint ls -o %s: %v %+v\n%s", format, err, eps, out)
		}
	}

	out, err = run(t, sock, "", "identity", "list")
	if err != nil || !regexpLine(out, `^1\s+-\s+isthmus\.io/reserved=host`) || !regexpLine(out, `^1048577\s+1\s+app=web`) {
		t.Errorf("identity list: %v\n%s", err, out)
	}
	for _, format := range []string{"json", "yaml"} {
		out, err := run(t, sock, "", "identity", "list", "-o", format)
		var ids []api.Identity
		if err == nil {
			err = unmarshalOutput(format, out, &ids)
		}
		if err != nil || len(ids) != 2 || ids[1].Labels["app"] != "web" || ids[1].Endpoints != 1 {
			t.Errorf("identity list -o %s: %v %+v\n%s", format, err, ids, out)
		}
	}

	out, err = run(t, sock, "", "status")
	if err != nil || !strings.Contains(out, "n1 (cluster c1, ID 1)") || !strings.Contains(out, "Cluster mesh:") ||
		!regexpLine(out, `^\s+forward\s+7\s+700$`) {
		t.Errorf("status: %v\n%s", err, out)
	}
	for _, format := range []string{"json", "yaml"} {
		out, err := run(t, sock, "", "status", "-o", format)
		var st api.Status
		if err == nil {
			err = unmarshalOutput(format, out, &st)
		}
		if err != nil || st.Node != "n1" || st.ClusterMesh == nil || len(st.ClusterMesh.Clusters) != 1 || st.Metrics[0].Packets != 7 {
			t.Errorf("status -o %s: %v %+v\n%s", format, err, st, out)
		}
	}

	// get: a list without NAME, one object with it.
	out, err = run(t, sock, "", "get", "svc", "-o", "json")
	var list []map[string]any
	if err == nil {
		err = json.Unmarshal([]byte(out), &list)
	}
	if err != nil || len(list) != 2 {
		t.Errorf("get svc -o json: %v\n%s", err, out)
	}
	out, err = run(t, sock, "", "get", "svc", "web", "-n", "prod", "-o", "json")
	var one map[string]any
	if err == nil {
		err = json.Unmarshal([]byte(out), &one)
	}
	if err != nil || one["kind"] != "Service" || one["metadata"].(map[string]any)["namespace"] != "prod" {
		t.Errorf("get svc web -n prod -o json: %v\n%s", err, out)
	}
	out, err = run(t, sock, "", "get", "services", "-o", "yaml")
	if err != nil || strings.Count(out, "\n---\n") != 1 || strings.Count(out, "kind: Service") != 2 {
		t.Errorf("get services -o yaml:\n%s", out)
	}
	if out, err := run(t, sock, "", "get", "policies"); err != nil || !strings.Contains(out, "No policies applied") {
		t.Errorf("get policies: %v\n%s", err, out)
	}

	// -o is checked before the agent is asked, for every read verb.
	for _, verb := range [][]string{{"endpoint", "list"}, {"identity", "list"}, {"status"}, {"get", "svc"}} {
		if _, err := run(t, "/nonexistent.sock", "", append(verb, "-o", "wide")...); err == nil || !strings.Contains(err.Error(), "want table, json or yaml") {
			t.Errorf("%v -o wide: %v", verb, err)
		}
	}
}

func unmarshalOutput(format, out string, v any) error {
	if format == "yaml" {
		return yaml.UnmarshalStrict([]byte(out), v)
	}
	return json.Unmarshal([]byte(out), v)
}

// TestErrorsSayWhatToDo checks the hints of invalid input and of an
// unreachable cluster etcd.
func TestErrorsSayWhatToDo(t *testing.T) {
	b := &outputBackend{}
	sock := serveFake(t, b)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"get", "gadgets"}, "want service (services, svc), policy (policies, networkpolicy, networkpolicies, netpol), pool (pools, ippool"},
		{[]string{"get", "endpoints"}, "isthmus endpoint list"},
		{[]string{"delete", "identity", "x"}, "isthmus identity list"},
		{[]string{"get"}, "usage: isthmus get services|policies|pools [NAME]"},
		{[]string{"endpoint", "add", "--netns", "/x"}, "usage: isthmus endpoint add NAME"},
		{[]string{"endpoint", "lst"}, `unknown command "lst" for "isthmus endpoint": want add, del, list (did you mean list?)`},
		{[]string{"clustermesh", "stat"}, "did you mean status?"},
		{[]string{"status", "--bogus"}, "unknown flag: --bogus (isthmus status --help lists the flags)"},
		{[]string{"status", "extra"}, "usage: isthmus status"},
	} {
		if _, err := run(t, sock, "", tc.args...); err == nil || !strings.Contains(errorMessage(err), tc.want) {
			t.Errorf("%v: got %v, want %q in it", tc.args, err, tc.want)
		}
	}
	// A group alone prints its help and succeeds.
	if out, err := run(t, sock, "", "endpoint"); err != nil || !strings.Contains(out, "Available Commands:") {
		t.Errorf("endpoint alone: %v\n%s", err, out)
	}

	b.applyErr = api.Errorf(http.StatusServiceUnavailable, "not connected to the cluster's kvstore yet: dial tcp: refused")
	_, err := run(t, sock, "kind: Service\n", "apply", "-f", "-")
	if err == nil || !strings.HasSuffix(errorMessage(err), "isthmus clustermesh status, on the server host, shows the server)") {
		t.Errorf("apply with etcd unreachable: %v", err)
	}
	b.applyErr = api.Errorf(http.StatusServiceUnavailable, "no free pod address")
	if _, err := run(t, sock, "kind: Service\n", "apply", "-f", "-"); err == nil || errorMessage(err) != "no free pod address" {
		t.Errorf("other 503s get no etcd hint: %v", err)
	}
}

// runComplete runs the shell completion request cobra's scripts make and
// returns the candidates (descriptions cut) and the directive line.
func runComplete(t *testing.T, sock string, args ...string) ([]string, string) {
	t.Helper()
	out, err := run(t, sock, "", append([]string{"__complete"}, args...)...)
	if err != nil {
		t.Fatalf("__complete %v: %v", args, err)
	}
	// Standard output: one candidate a line, then ":<directive>"; cobra
	// also writes "Completion ended with ..." to standard error, which
	// run() mixes in.
	var lines []string
	for l := range strings.SplitSeq(strings.TrimSuffix(out, "\n"), "\n") {
		if !strings.HasPrefix(l, "Completion ended") {
			lines = append(lines, l)
		}
	}
	var cands []string
	for _, l := range lines[:len(lines)-1] {
		name, _, _ := strings.Cut(l, "\t")
		cands = append(cands, name)
	}
	return cands, lines[len(lines)-1]
}

func TestCompletion(t *testing.T) {
	sock := serveFake(t, &outputBackend{})

	out, err := run(t, sock, "", "completion", "bash")
	if err != nil || !strings.HasPrefix(out, "# bash completion V2 for isthmus") || !strings.Contains(out, "__start_isthmus") {
		t.Errorf("completion bash: %v\n%.200s", err, out)
	}
	for _, shell := range []string{"zsh", "fish", "powershell"} {
		if out, err := run(t, sock, "", "completion", shell); err != nil || !strings.Contains(out, "isthmus") {
			t.Errorf("completion %s: %v", shell, err)
		}
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"get", ""}, "services policies pools l2policies"},
		{[]string{"get", "po"}, "policies pools"},
		{[]string{"delete", ""}, "services policies pools l2policies"},
		{[]string{"get", "svc", ""}, "web"}, // the default namespace only
		{[]string{"delete", "service", "-n", "prod", ""}, "web"},
		{[]string{"get", "policies", ""}, ""},
		{[]string{"get", "svc", "web", ""}, ""},
		{[]string{"endpoint", "del", ""}, "web1"},
		{[]string{"endpoint", "del", "-n", "shop", ""}, "db1"},
		{[]string{"status", "-o", ""}, "table json yaml"},
		{[]string{"endpoint", "list", "--output", "j"}, "json"},
		{[]string{"endpoint", ""}, "add del list"},
	} {
		got, directive := runComplete(t, sock, tc.args...)
		if strings.Join(got, " ") != tc.want {
			t.Errorf("__complete %q: got %q, want %q", tc.args, got, tc.want)
		}
		if !strings.Contains(tc.want, "add") && directive != ":4" { // 4: ShellCompDirectiveNoFileComp
			t.Errorf("__complete %q: directive %s", tc.args, directive)
		}
	}
	// Without an agent there is nothing to offer, and no error.
	if got, _ := runComplete(t, "/nonexistent.sock", "endpoint", "del", ""); len(got) != 0 {
		t.Errorf("endpoint del without an agent: %q", got)
	}
}
