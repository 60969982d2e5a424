package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"syscall"
)

// Client talks to the agent over its unix socket. It implements Backend.
type Client struct {
	socket string
	hc     *http.Client
}

var _ Backend = (*Client)(nil)

// NewClient returns a client for the agent listening on socketPath.
func NewClient(socketPath string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socketPath)
		},
		DisableCompression: true,
	}
	return &Client{socket: socketPath, hc: &http.Client{Transport: tr}}
}

// UnreachableError says the agent's socket could not be reached at all.
type UnreachableError struct {
	Socket string
	Err    error
}

func (e *UnreachableError) Error() string {
	switch {
	case errors.Is(e.Err, syscall.ENOENT), errors.Is(e.Err, syscall.ECONNREFUSED):
		return fmt.Sprintf("cannot reach the agent at %s: is isthmus-agent running?", e.Socket)
	case errors.Is(e.Err, syscall.EACCES), errors.Is(e.Err, syscall.EPERM):
		return fmt.Sprintf("cannot reach the agent at %s: permission denied (the socket is for root only)", e.Socket)
	}
	return fmt.Sprintf("cannot reach the agent at %s: %v", e.Socket, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// do sends a request and decodes a 2xx JSON answer into out (if non-nil;
// a *[]byte gets the body as it is).
func (c *Client) do(ctx context.Context, method, path string, query url.Values, contentType string, body io.Reader, out any) error {
	// path is already escaped segment by segment (see seg).
	u := "http://isthmus-agent" + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return &UnreachableError{Socket: c.socket, Err: op.Err}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s %s: %w", method, path, ctx.Err())
		}
		return fmt.Errorf("talk to the agent at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read answer of %s %s: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = fmt.Sprintf("%s %s: agent answered %s", method, path, resp.Status)
		}
		return &Error{Status: resp.StatusCode, Err: errors.New(e.Error)}
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if raw, ok := out.(*[]byte); ok { // not JSON: /metrics
		*raw = data
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode answer of %s %s: %w", method, path, err)
	}
	return nil
}

func (c *Client) doJSON(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	ct := ""
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, ct = bytes.NewReader(data), "application/json"
	}
	return c.do(ctx, method, path, nil, ct, body, out)
}

func seg(s ...string) string {
	p := ""
	for _, x := range s {
		p += "/" + url.PathEscape(x)
	}
	return p
}

// Health returns nil when the agent answers.
func (c *Client) Health(ctx context.Context) error {
	return c.doJSON(ctx, http.MethodGet, "/healthz", nil, nil)
}

func (c *Client) AddEndpoint(ctx context.Context, req EndpointRequest) (Endpoint, error) {
	var ep Endpoint
	err := c.doJSON(ctx, http.MethodPost, "/v1/endpoints", req, &ep)
	return ep, err
}

func (c *Client) DeleteEndpoint(ctx context.Context, namespace, name string) error {
	return c.doJSON(ctx, http.MethodDelete, "/v1/endpoints"+seg(namespace, name), nil, nil)
}

// DeleteEndpointOf deletes the endpoint if it was added for containerID.
func (c *Client) DeleteEndpointOf(ctx context.Context, namespace, name, containerID string) error {
	return c.do(ctx, http.MethodDelete, "/v1/endpoints"+seg(namespace, name), url.Values{"containerID": {containerID}}, "", nil, nil)
}

// CollectEndpoints deletes the CNI endpoints whose container is not valid.
func (c *Client) CollectEndpoints(ctx context.Context, req GCRequest) (GCResult, error) {
	var res GCResult
	err := c.doJSON(ctx, http.MethodPost, "/v1/endpoints/gc", req, &res)
	return res, err
}

// Ready returns nil when the agent answers /readyz with 200, else the
// reasons it gives (or why it could not be asked).
func (c *Client) Ready(ctx context.Context) error {
	return c.doJSON(ctx, http.MethodGet, "/readyz", nil, nil)
}

func (c *Client) ListEndpoints(ctx context.Context) ([]Endpoint, error) {
	var eps []Endpoint
	err := c.doJSON(ctx, http.MethodGet, "/v1/endpoints", nil, &eps)
	return eps, err
}

func (c *Client) Apply(ctx context.Context, yaml []byte) (ApplyResult, error) {
	var res ApplyResult
	err := c.do(ctx, http.MethodPost, "/v1/apply", nil, "application/yaml", bytes.NewReader(yaml), &res)
	return res, err
}

func (c *Client) ListObjects(ctx context.Context, kind string) ([]Object, error) {
	var q url.Values
	if kind != "" {
		q = url.Values{"kind": {kind}}
	}
	var objs []Object
	err := c.do(ctx, http.MethodGet, "/v1/objects", q, "", nil, &objs)
	return objs, err
}

func (c *Client) DeleteObject(ctx context.Context, kind, namespace, name string) error {
	return c.doJSON(ctx, http.MethodDelete, "/v1/objects"+seg(kind, namespace, name), nil, nil)
}

func (c *Client) Identities(ctx context.Context) ([]Identity, error) {
	var ids []Identity
	err := c.doJSON(ctx, http.MethodGet, "/v1/identities", nil, &ids)
	return ids, err
}

func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.doJSON(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// RotateWireGuardKey asks the agent for a new WireGuard key.
func (c *Client) RotateWireGuardKey(ctx context.Context) (WireGuardStatus, error) {
	var st WireGuardStatus
	err := c.doJSON(ctx, http.MethodPost, "/v1/wireguard/rotate-key", nil, &st)
	return st, err
}

// Metrics returns the agent's Prometheus metrics in the text format.
func (c *Client) Metrics(ctx context.Context) ([]byte, error) {
	var raw []byte
	err := c.do(ctx, http.MethodGet, "/metrics", nil, "", nil, &raw)
	return raw, err
}
