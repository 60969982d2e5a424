package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// MaxBodyBytes bounds every request body.
const MaxBodyBytes = 1 << 20

// Server serves a Backend.
type Server struct {
	backend Backend
	log     *slog.Logger
	mux     *http.ServeMux
}

// handler answers a request with a status and a JSON body, or an error.
type handler func(r *http.Request) (int, any, error)

// NewServer builds the HTTP handler for b.
func NewServer(b Backend, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	s := &Server{backend: b, log: log, mux: http.NewServeMux()}
	s.route("/v1/endpoints", map[string]handler{http.MethodGet: s.listEndpoints, http.MethodPost: s.addEndpoint})
	s.route("/v1/endpoints/gc", map[string]handler{http.MethodPost: s.collectEndpoints})
	s.route("/v1/endpoints/{namespace}/{name}", map[string]handler{http.MethodDelete: s.deleteEndpoint})
	s.route("/v1/apply", map[string]handler{http.MethodPost: s.apply})
	s.route("/v1/objects", map[string]handler{http.MethodGet: s.listObjects})
	s.route("/v1/objects/{kind}/{namespace}/{name}", map[string]handler{http.MethodDelete: s.deleteObject})
	s.route("/v1/identities", map[string]handler{http.MethodGet: s.identities})
	s.route("/v1/status", map[string]handler{http.MethodGet: s.status})
	s.route("/v1/wireguard/rotate-key", map[string]handler{http.MethodPost: s.rotateWireGuardKey})
	s.route("/v1/bgp", map[string]handler{http.MethodGet: s.bgp})
	s.route("/healthz", map[string]handler{http.MethodGet: func(*http.Request) (int, any, error) {
		return http.StatusOK, map[string]string{"status": "ok"}, nil
	}})
	s.route("/", map[string]handler{})
	// Go's profiles (CPU, heap, goroutines) on the socket, which is root's
	// alone: whoever may add endpoints may profile the agent. They cost
	// nothing until asked for, and they are how a slow path is found on a
	// shared machine where wall clock is noise (tests/bench -svc-profile).
	s.mux.HandleFunc("/debug/pprof/", pprof.Index)
	s.mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	s.mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return s
}

// route registers a path with its handlers per method. Dispatching on the
// method here (not in the mux pattern) keeps 404 and 405 answers in JSON.
func (s *Server) route(pattern string, methods map[string]handler) {
	allowed := slices.Sorted(maps.Keys(methods))
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		if len(methods) == 0 {
			s.write(w, r, 0, nil, Errorf(http.StatusNotFound, "no such API path %s", r.URL.Path))
			return
		}
		h, ok := methods[r.Method]
		if !ok {
			w.Header().Set("Allow", strings.Join(allowed, ", "))
			s.write(w, r, 0, nil, Errorf(http.StatusMethodNotAllowed, "method %s not allowed on %s (allowed: %s)", r.Method, r.URL.Path, strings.Join(allowed, ", ")))
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
		status, body, err := h(r)
		s.write(w, r, status, body, err)
	})
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// WithHealth adds GET /metrics, served by metrics (the Prometheus text
// format), and GET /readyz: 200 {"status":"ready"} when notReady returns
// nothing, else 503 {"error":"not ready: <reasons>"}. Call it before Serve.
func (s *Server) WithHealth(metrics http.Handler, notReady func() []string) *Server {
	s.mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", http.MethodGet)
			s.write(w, r, 0, nil, Errorf(http.StatusMethodNotAllowed, "method %s not allowed on %s (allowed: GET)", r.Method, r.URL.Path))
			return
		}
		metrics.ServeHTTP(w, r)
	})
	s.route("/readyz", map[string]handler{http.MethodGet: func(*http.Request) (int, any, error) {
		if reasons := notReady(); len(reasons) > 0 {
			// Written as a body, not returned as an error: probes poll
			// this while the agent starts, which is not worth a log line.
			return http.StatusServiceUnavailable, map[string]string{"error": "not ready: " + strings.Join(reasons, "; ")}, nil
		}
		return http.StatusOK, map[string]string{"status": "ready"}, nil
	}})
	return s
}

func (s *Server) write(w http.ResponseWriter, r *http.Request, status int, body any, err error) {
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			err = Errorf(http.StatusRequestEntityTooLarge, "request body larger than %d bytes", mbe.Limit)
		}
		status = StatusOf(err)
		body = map[string]string{"error": err.Error()}
		if status >= 500 {
			s.log.Error("api request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		} else {
			s.log.Info("api request refused", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
		}
	}
	if status == http.StatusNoContent {
		w.WriteHeader(status)
		return
	}
	data, merr := json.Marshal(body)
	if merr != nil {
		status, data = http.StatusInternalServerError, []byte(`{"error":"encode response"}`)
		s.log.Error("api encode response", "path", r.URL.Path, "err", merr)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(data, '\n'))
}

// decode reads a strict JSON body into v.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		if errors.Is(err, io.EOF) {
			return Errorf(http.StatusBadRequest, "request body is empty, want a JSON object")
		}
		return Errorf(http.StatusBadRequest, "invalid request body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Errorf(http.StatusBadRequest, "invalid request body: trailing data after the JSON object")
	}
	return nil
}

func (s *Server) addEndpoint(r *http.Request) (int, any, error) {
	var req EndpointRequest
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	ep, err := s.backend.AddEndpoint(r.Context(), req)
	return http.StatusCreated, ep, err
}

// deleteEndpoint deletes an endpoint; with ?containerID=<id> only when it
// was added for that container.
func (s *Server) deleteEndpoint(r *http.Request) (int, any, error) {
	ns, name := r.PathValue("namespace"), r.PathValue("name")
	q := r.URL.Query()
	if q.Has("containerID") {
		id := q.Get("containerID")
		if id == "" {
			return 0, nil, Errorf(http.StatusBadRequest, "containerID must not be empty")
		}
		return http.StatusNoContent, nil, s.backend.DeleteEndpointOf(r.Context(), ns, name, id)
	}
	return http.StatusNoContent, nil, s.backend.DeleteEndpoint(r.Context(), ns, name)
}

func (s *Server) collectEndpoints(r *http.Request) (int, any, error) {
	var req GCRequest
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	res, err := s.backend.CollectEndpoints(r.Context(), req)
	res.Removed = nonNil(res.Removed)
	return http.StatusOK, res, err
}

func (s *Server) listEndpoints(r *http.Request) (int, any, error) {
	eps, err := s.backend.ListEndpoints(r.Context())
	return http.StatusOK, nonNil(eps), err
}

func (s *Server) apply(r *http.Request) (int, any, error) {
	data, err := io.ReadAll(r.Body)
	if err != nil {
		return 0, nil, err
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return 0, nil, Errorf(http.StatusBadRequest, "nothing to apply: the request body is empty")
	}
	res, err := s.backend.Apply(r.Context(), data)
	if res.Objects == nil {
		res.Objects = []ObjectResult{}
	}
	return http.StatusOK, res, err
}

func (s *Server) listObjects(r *http.Request) (int, any, error) {
	objs, err := s.backend.ListObjects(r.Context(), r.URL.Query().Get("kind"))
	return http.StatusOK, nonNil(objs), err
}

func (s *Server) deleteObject(r *http.Request) (int, any, error) {
	err := s.backend.DeleteObject(r.Context(), r.PathValue("kind"), r.PathValue("namespace"), r.PathValue("name"))
	return http.StatusNoContent, nil, err
}

func (s *Server) identities(r *http.Request) (int, any, error) {
	ids, err := s.backend.Identities(r.Context())
	return http.StatusOK, nonNil(ids), err
}

func (s *Server) status(r *http.Request) (int, any, error) {
	st, err := s.backend.Status(r.Context())
	return http.StatusOK, st, err
}

func (s *Server) rotateWireGuardKey(r *http.Request) (int, any, error) {
	st, err := s.backend.RotateWireGuardKey(r.Context())
	return http.StatusOK, st, err
}

// nonNil makes empty lists encode as [] rather than null.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// Listener is the API socket. Closing it removes the socket file.
type Listener struct {
	*net.UnixListener
	path string
}

// Close stops listening and removes the socket file.
func (l *Listener) Close() error {
	err := l.UnixListener.Close()
	if rerr := os.Remove(l.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}

// Path is where the socket lives.
func (l *Listener) Path() string { return l.path }

// Listen opens the API socket at path with mode 0600. The socket is bound
// under a temporary name, restricted, then renamed into place, so it is never
// reachable with looser permissions. A stale socket from a dead agent is
// replaced; a live one is an error.
func Listen(path string) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket; remove it or choose another --socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another agent is already serving %s", path)
		}
	}
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	_ = os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("restrict %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return &Listener{UnixListener: ln, path: path}, nil
}

// Serve answers API requests on ln until ctx ends, then stops accepting
// (closing ln), and lets running requests finish for up to 10 seconds.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("api server: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}
