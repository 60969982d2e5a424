package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// fake is a Backend with canned answers that records what it was asked.
type fake struct {
	mu    sync.Mutex
	calls []string
	err   error // returned by every method when set
	eps   []Endpoint
}

func (f *fake) record(format string, args ...any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
	return f.err
}

func (f *fake) AddEndpoint(_ context.Context, req EndpointRequest) (Endpoint, error) {
	if err := f.record("add %s/%s %s %v", req.Namespace, req.Name, req.Netns, req.Labels); err != nil {
		return Endpoint{}, err
	}
	if req.Name == "dup" {
		return Endpoint{}, Errorf(http.StatusConflict, "endpoint %s/%s already exists", req.Namespace, req.Name)
	}
	return Endpoint{Name: req.Name, Namespace: req.Namespace, Labels: req.Labels, Netns: req.Netns,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")}, Identity: 1<<20 | 1}, nil
}

func (f *fake) DeleteEndpoint(_ context.Context, ns, name string) error {
	if err := f.record("del %s/%s", ns, name); err != nil {
		return err
	}
	if name == "missing" {
		return Errorf(http.StatusNotFound, "endpoint %s/%s not found", ns, name)
	}
	return nil
}

func (f *fake) BGP(_ context.Context, routes bool) (BGPStatus, error) {
	return BGPStatus{}, f.record("bgp %v", routes)
}

func (f *fake) DeleteEndpointOf(_ context.Context, ns, name, id string) error {
	return f.record("delof %s/%s %s", ns, name, id)
}

func (f *fake) CollectEndpoints(_ context.Context, req GCRequest) (GCResult, error) {
	return GCResult{Removed: []Endpoint{{Name: "old", Namespace: "default", ContainerID: "c0"}}}, f.record("gc %v", req.Valid)
}

func (f *fake) ListEndpoints(context.Context) ([]Endpoint, error) {
	return f.eps, f.record("list")
}

func (f *fake) Apply(_ context.Context, yaml []byte) (ApplyResult, error) {
	if err := f.record("apply %q", yaml); err != nil {
		return ApplyResult{}, err
	}
	return ApplyResult{Objects: []ObjectResult{{Kind: "Service", Namespace: "default", Name: "web", Action: ActionCreated}}}, nil
}

func (f *fake) ListObjects(_ context.Context, kind string) ([]Object, error) {
	return []Object{{Kind: "Service", Namespace: "default", Name: "web", Object: json.RawMessage(`{"kind":"Service"}`)}}, f.record("objects %q", kind)
}

func (f *fake) DeleteObject(_ context.Context, kind, ns, name string) error {
	return f.record("delobj %s %s/%s", kind, ns, name)
}

func (f *fake) Identities(context.Context) ([]Identity, error) {
	return []Identity{{ID: 1<<20 | 1, Labels: map[string]string{"app": "web"}, Endpoints: 2}}, f.record("ids")
}

func (f *fake) RotateWireGuardKey(context.Context) (WireGuardStatus, error) {
	return WireGuardStatus{}, Errorf(http.StatusConflict, "encryption is off")
}

func (f *fake) Status(context.Context) (Status, error) {
	return Status{Node: "n1", Cluster: "c1", ClusterID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")},
		AttachMode: "tcx", Metrics: []Metric{{Reason: "drop_policy_egress", Drop: true, Packets: 3, Bytes: 180}}}, f.record("status")
}

func serve(t *testing.T, b Backend) (*Client, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NewServer(b, nil).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return NewClient(sock), sock
}

func TestClientServer(t *testing.T) {
	f := &fake{eps: []Endpoint{{Name: "a", Namespace: "default"}}}
	c, sock := serve(t, f)
	ctx := context.Background()

	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Errorf("socket mode %v, want a socket with 0600", st.Mode())
	}
	if err := c.Health(ctx); err != nil {
		t.Fatal(err)
	}

	ep, err := c.AddEndpoint(ctx, EndpointRequest{Name: "web", Namespace: "prod", Netns: "/var/run/netns/web", Labels: map[string]string{"app": "web"}})
	if err != nil {
		t.Fatal(err)
	}
	if ep.Name != "web" || len(ep.IPs) != 2 || ep.IPs[1] != netip.MustParseAddr("fd00::2") {
		t.Errorf("AddEndpoint = %+v", ep)
	}
	_, err = c.AddEndpoint(ctx, EndpointRequest{Name: "dup", Namespace: "default", Netns: "/x"})
	if StatusOf(err) != http.StatusConflict || err.Error() != "endpoint default/dup already exists" {
		t.Errorf("duplicate: %v (status %d)", err, StatusOf(err))
	}
	if err := c.DeleteEndpoint(ctx, "default", "web"); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteEndpoint(ctx, "default", "missing"); !IsNotFound(err) {
		t.Errorf("delete missing: %v", err)
	}
	if err := c.DeleteEndpointOf(ctx, "default", "web", "c1"); err != nil {
		t.Fatal(err)
	}
	if gc, err := c.CollectEndpoints(ctx, GCRequest{Valid: []string{"c1", "c2"}}); err != nil || len(gc.Removed) != 1 || gc.Removed[0].ContainerID != "c0" {
		t.Errorf("CollectEndpoints = %+v, %v", gc, err)
	}
	if eps, err := c.ListEndpoints(ctx); err != nil || len(eps) != 1 || eps[0].Name != "a" {
		t.Errorf("ListEndpoints = %+v, %v", eps, err)
	}
	res, err := c.Apply(ctx, []byte("kind: Service\n"))
	if err != nil || len(res.Objects) != 1 || res.Objects[0].Action != ActionCreated {
		t.Errorf("Apply = %+v, %v", res, err)
	}
	objs, err := c.ListObjects(ctx, "Service")
	if err != nil || len(objs) != 1 || string(objs[0].Object) != `{"kind":"Service"}` {
		t.Errorf("ListObjects = %+v, %v", objs, err)
	}
	if err := c.DeleteObject(ctx, "NetworkPolicy", "default", "a b/c"); err != nil {
		t.Fatal(err)
	}
	ids, err := c.Identities(ctx)
	if err != nil || len(ids) != 1 || ids[0].Labels["app"] != "web" {
		t.Errorf("Identities = %+v, %v", ids, err)
	}
	s, err := c.Status(ctx)
	if err != nil || s.Node != "n1" || s.AttachMode != "tcx" || len(s.Metrics) != 1 || s.PodCIDRs[0].Bits() != 24 {
		t.Errorf("Status = %+v, %v", s, err)
	}

	want := []string{
		"add prod/web /var/run/netns/web map[app:web]",
		"add default/dup /x map[]",
		"del default/web",
		"del default/missing",
		"delof default/web c1",
		"gc [c1 c2]",
		"list",
		`apply "kind: Service\n"`,
		`objects "Service"`,
		"delobj NetworkPolicy default/a b/c", // path segments survive escaping
		"ids",
		"status",
	}
	if !reflect.DeepEqual(f.calls, want) {
		t.Errorf("calls:\n got %q\nwant %q", f.calls, want)
	}
}

func TestBackendErrorStatus(t *testing.T) {
	f := &fake{err: errors.New("netlink: boom")}
	c, _ := serve(t, f)
	_, err := c.Status(context.Background())
	if StatusOf(err) != http.StatusInternalServerError || err.Error() != "netlink: boom" {
		t.Errorf("plain backend error: %v (status %d)", err, StatusOf(err))
	}
	f.err = WithStatus(http.StatusBadRequest, fmt.Errorf("objects: line 3: %w", errors.New("unknown field")))
	_, err = c.Apply(context.Background(), []byte("x: 1"))
	if StatusOf(err) != http.StatusBadRequest || err.Error() != "objects: line 3: unknown field" {
		t.Errorf("400 error: %v (status %d)", err, StatusOf(err))
	}
}

func TestHTTPErrors(t *testing.T) {
	f := &fake{}
	srv := httptest.NewServer(NewServer(f, nil))
	defer srv.Close()

	for _, tt := range []struct {
		method, path, body string
		status             int
		errContains        string
	}{
		{"POST", "/v1/endpoints", `{"name":"a","netns":"/x","bogus":1}`, 400, `unknown field "bogus"`},
		{"POST", "/v1/endpoints", `{"name":"a"} {"name":"b"}`, 400, "trailing data"},
		{"POST", "/v1/endpoints", ``, 400, "request body is empty"},
		{"POST", "/v1/endpoints", `[1,2]`, 400, "invalid request body"},
		{"POST", "/v1/endpoints", `{"name":"` + strings.Repeat("a", MaxBodyBytes) + `"}`, 413, "larger than 1048576 bytes"},
		{"POST", "/v1/apply", strings.Repeat("#", MaxBodyBytes+1), 413, "larger than"},
		{"POST", "/v1/apply", "  \n", 400, "nothing to apply"},
		{"GET", "/v1/nope", "", 404, "no such API path /v1/nope"},
		{"PUT", "/v1/endpoints", "", 405, "allowed: GET, POST"},
		{"GET", "/v1/endpoints/default/a", "", 405, "allowed: DELETE"},
		{"DELETE", "/v1/endpoints/default/missing", "", 404, "endpoint default/missing not found"},
	} {
		req, _ := http.NewRequest(tt.method, srv.URL+tt.path, strings.NewReader(tt.body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var e struct {
			Error string `json:"error"`
		}
		if resp.StatusCode != tt.status || json.Unmarshal(data, &e) != nil || !strings.Contains(e.Error, tt.errContains) {
			t.Errorf("%s %s: %d %s, want %d with error containing %q", tt.method, tt.path, resp.StatusCode, data, tt.status, tt.errContains)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s %s: Content-Type %q", tt.method, tt.path, ct)
		}
	}
	if len(f.calls) != 1 { // only the DELETE of "missing" reached the backend
		t.Errorf("backend was called for bad requests: %q", f.calls)
	}

	// Empty lists are [] not null.
	resp, err := http.Get(srv.URL + "/v1/endpoints")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.TrimSpace(string(data)) != "[]" {
		t.Errorf("empty list encoded as %s", data)
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "sub", "a.sock")

	// A stale socket (nobody listening) is replaced.
	if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	ln, err := Listen(sock)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	// A live one is refused.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Errorf("second Listen: %v", err)
	}
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket not removed on Close: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "sub", "*.tmp")); len(left) > 0 {
		t.Errorf("temporary sockets left: %v", left)
	}

	// Something that is not a socket is never removed.
	if err := os.WriteFile(sock, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("Listen over a file: %v", err)
	}
}

func TestUnreachable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := NewClient(sock).Status(ctx)
	var ue *UnreachableError
	if !errors.As(err, &ue) || err.Error() != "cannot reach the agent at "+sock+": is isthmus-agent running?" {
		t.Errorf("got %v", err)
	}
}
