package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/server"
	"github.com/isthmus-mesh/isthmus/clustermesh/server/servertest"
	"github.com/isthmus-mesh/isthmus/internal/promtest"
)

func parse(t *testing.T, args ...string) (server.Config, error) {
	t.Helper()
	var got server.Config
	cmd := newCommand(func(_ context.Context, cfg server.Config) error { got = cfg; return nil })
	cmd.SetArgs(args)
	cmd.SetOut(io.Discard)
	err := cmd.ExecuteContext(context.Background())
	return got, err
}

func TestFlags(t *testing.T) {
	cfg, err := parse(t, "--cluster-name", "c1", "--cluster-id", "7", "--pod-cidr", "10.1.0.0/16,fd00:1::/48", "--cache-ttl", "30m",
		"--advertise-client", "https://192.0.2.1:2379", "--log-level", "warn")
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.Server
	if s.ClusterName != "c1" || s.ClusterID != 7 || len(s.PodCIDRs) != 2 || s.DataDir != "/var/lib/isthmus-clustermesh/c1" ||
		s.ListenClient != "0.0.0.0:2379" || s.ListenPeer != "127.0.0.1:2380" || s.AdvertiseClient[0] != "https://192.0.2.1:2379" {
		t.Errorf("server config %+v", s)
	}
	if cfg.Mirror.CacheTTL != 30*time.Minute || cfg.IdentityGCInterval != 10*time.Minute || cfg.IdentityGCGrace != 5*time.Minute || cfg.HealthListen != "" {
		t.Errorf("config %+v", cfg)
	}

	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--cluster-id", "1", "--pod-cidr", "10.1.0.0/16"}, "--cluster-name is required"},
		{[]string{"--cluster-name", "C1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16"}, "--cluster-name"},
		{[]string{"--cluster-name", "c1", "--pod-cidr", "10.1.0.0/16"}, "--cluster-id is required"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "5000", "--pod-cidr", "10.1.0.0/16"}, "--cluster-id"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1"}, "--pod-cidr is required"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.1/16"}, "without host bits"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16", "--etcd-ca", "x"}, "add --etcd-endpoints"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16", "--etcd-endpoints", "https://e:2379", "--etcd-cert", "x"}, "go together"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16", "--etcd-endpoints", "https://e:2379", "--ca-dir", "/x"}, "--ca-dir is for the embedded etcd"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16", "--log-level", "loud"}, "--log-level"},
		{[]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16", "--cache-ttl", "-1s"}, "--cache-ttl"},
	} {
		if _, err := parse(t, tt.args...); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v: %v, want %q", tt.args, err, tt.want)
		}
	}
}

// TestRunAndStop runs the real server from the command line, checks its
// health and metrics endpoints, and stops it by cancelling (what SIGTERM
// does).
func TestRunAndStop(t *testing.T) {
	health, metrics := servertest.FreeAddr(t), servertest.FreeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newCommand(server.Run)
	cmd.SetArgs([]string{"--cluster-name", "c1", "--cluster-id", "1", "--pod-cidr", "10.1.0.0/16",
		"--data-dir", t.TempDir(), "--listen-client", servertest.FreeAddr(t), "--listen-peer", servertest.FreeAddr(t),
		"--health-listen", health, "--metrics-addr", metrics, "--log-level", "error"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()

	servertest.Eventually(t, 20*time.Second, "healthz", func() error {
		resp, err := http.Get("http://" + health + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return io.ErrUnexpectedEOF
		}
		return nil
	})
	resp, err := http.Get("http://" + health + "/status")
	if err != nil {
		t.Fatal(err)
	}
	var rep server.StatusReport
	err = json.NewDecoder(resp.Body).Decode(&rep)
	resp.Body.Close()
	if err != nil || rep.Server.Cluster != "c1" || rep.Server.ClusterID != 1 {
		t.Errorf("status %+v: %v", rep, err)
	}
	if resp, err := http.Get("http://" + metrics + "/readyz"); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("GET /readyz on --metrics-addr: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if fams, err := promtest.Get(nil, "http://"+metrics+"/metrics"); err != nil {
		t.Error(err)
	} else if v, _ := fams.Value("isthmus_clustermesh_info", "cluster", "c1", "etcd", "embedded"); v != 1 {
		t.Errorf("isthmus_clustermesh_info{cluster=c1,etcd=embedded} = %v", v)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("stopped with %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("did not stop")
	}
}
