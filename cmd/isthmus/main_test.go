package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// backend is an api.Backend with canned answers.
type backend struct {
	api.Backend // methods not overridden panic: the test did not expect them
	gotAdd      api.EndpointRequest
	gotApply    string
	gotDelete   []string
}

func (b *backend) AddEndpoint(_ context.Context, r api.EndpointRequest) (api.Endpoint, error) {
	b.gotAdd = r
	return api.Endpoint{Name: r.Name, Namespace: r.Namespace, Interface: "isth0123456789", Identity: 1048577,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")}}, nil
}

func (b *backend) DeleteEndpoint(_ context.Context, ns, name string) error {
	return api.Errorf(http.StatusNotFound, "endpoint %s/%s not found", ns, name)
}

func (b *backend) Apply(_ context.Context, y []byte) (api.ApplyResult, error) {
	b.gotApply = string(y)
	return api.ApplyResult{Objects: []api.ObjectResult{{Kind: "Service", Namespace: "default", Name: "web", Action: "created"}}}, nil
}

const svcJSON = `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","namespace":"default"},"spec":{"vips":["10.96.0.10"],"ports":[{"port":80,"targetPort":8080,"protocol":"TCP"}],"selector":{"app":"web"}}}`

func (b *backend) ListObjects(_ context.Context, kind string) ([]api.Object, error) {
	if kind != "Service" {
		return nil, nil
	}
	return []api.Object{
		{Kind: "Service", Namespace: "default", Name: "web", Object: json.RawMessage(svcJSON)},
		{Kind: "Service", Namespace: "prod", Name: "web", Object: json.RawMessage(strings.Replace(svcJSON, `"default"`, `"prod"`, 1))},
	}, nil
}

func (b *backend) DeleteObject(_ context.Context, kind, ns, name string) error {
	b.gotDelete = []string{kind, ns, name}
	return nil
}

func run(t *testing.T, sock, stdin string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd := newRootCommand(strings.NewReader(stdin), &out)
	cmd.SetArgs(append([]string{"--socket", sock}, args...))
	cmd.SetErr(&out)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

func serveFake(t *testing.T, b api.Backend) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "a.sock")
	ln, err := api.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = api.NewServer(b, nil).Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

func TestCommands(t *testing.T) {
	b := &backend{}
	sock := serveFake(t, b)

	out, err := run(t, sock, "", "endpoint", "add", "web1", "--netns", "/var/run/netns/web1", "--labels", "app=web, tier=front", "-n", "prod")
	if err != nil {
		t.Fatal(err)
	}
	if out != "endpoint prod/web1 added: 10.0.0.2,fd00::2, identity 1048577, interface isth0123456789\n" {
		t.Errorf("endpoint add printed %q", out)
	}
	if b.gotAdd.Netns != "/var/run/netns/web1" || b.gotAdd.Labels["tier"] != "front" || b.gotAdd.Namespace != "prod" {
		t.Errorf("request %+v", b.gotAdd)
	}
	if _, err := run(t, sock, "", "endpoint", "add", "x", "--netns", "/x", "--labels", "app"); err == nil || !strings.Contains(err.Error(), "--labels") {
		t.Errorf("bad labels: %v", err)
	}

	_, err = run(t, sock, "", "endpoint", "del", "ghost")
	if err == nil || errorMessage(err) != "endpoint default/ghost not found (isthmus endpoint list shows the endpoints)" {
		t.Errorf("endpoint del: %v", err)
	}

	out, err = run(t, sock, "kind: Service\n", "apply", "-f", "-")
	if err != nil || out != "Service default/web created\n" || b.gotApply != "kind: Service\n" {
		t.Errorf("apply: %q %v (sent %q)", out, err, b.gotApply)
	}
	if _, err := run(t, sock, "", "apply"); err == nil || !strings.Contains(err.Error(), "-f FILE") {
		t.Errorf("apply without -f: %v", err)
	}

	out, err = run(t, sock, "", "get", "svc")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "NAMESPACE") || !strings.Contains(out, "80->8080/TCP") || !strings.Contains(out, "prod") {
		t.Errorf("get svc table:\n%s", out)
	}
	out, err = run(t, sock, "", "get", "services", "web", "-o", "yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out, "apiVersion: isthmus.io/v1alpha1\n") || strings.Contains(out, "---") || strings.Contains(out, "prod") {
		t.Errorf("get services web -o yaml:\n%s", out)
	}
	if _, err := run(t, sock, "", "get", "services", "nope"); err == nil || err.Error() != "Service default/nope not found" {
		t.Errorf("get missing: %v", err)
	}
	if _, err := run(t, sock, "", "get", "gadgets"); err == nil || !strings.Contains(err.Error(), `unknown kind "gadgets"`) {
		t.Errorf("get gadgets: %v", err)
	}
	if _, err := run(t, sock, "", "get", "svc", "-o", "xml"); err == nil || !strings.Contains(err.Error(), "want table, json or yaml") {
		t.Errorf("-o xml: %v", err)
	}

	out, err = run(t, sock, "", "delete", "policy", "allow", "-n", "prod")
	if err != nil || out != "NetworkPolicy prod/allow deleted\n" || strings.Join(b.gotDelete, " ") != "NetworkPolicy prod allow" {
		t.Errorf("delete: %q %v %v", out, err, b.gotDelete)
	}
}

func TestUnreachableAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "x.sock")
	_, err := run(t, sock, "", "status")
	want := "cannot reach the agent at " + sock + ": is isthmus-agent running? (--socket or ISTHMUS_SOCKET)"
	if err == nil || errorMessage(err) != want {
		t.Errorf("got %v, want %q", err, want)
	}
}

func TestSocketFromEnvironment(t *testing.T) {
	t.Setenv("ISTHMUS_SOCKET", "/tmp/from-env.sock")
	cmd := newRootCommand(strings.NewReader(""), &bytes.Buffer{})
	if got := cmd.PersistentFlags().Lookup("socket").DefValue; got != "/tmp/from-env.sock" {
		t.Errorf("default socket %q", got)
	}
}
