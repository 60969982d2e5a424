package etcdserver

import (
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

func TestAgentsCannotReadRemotes(t *testing.T) {
	ctx := testCtx(t)
	s := start(t, sharedConfig(t))
	if err := s.Client().Put(ctx, RemoteKey("c2"), []byte("secret")); err != nil {
		t.Fatal(err)
	}
	b, _ := s.ExportBundle()
	agents := connectBundle(t, b)
	if _, _, err := agents.Get(ctx, RemoteKey("c2")); !isPermissionDenied(err) {
		t.Errorf("agents reading %s = %v, want permission denied", RemoteKey("c2"), err)
	}
	if _, _, err := agents.GetPrefix(ctx, RemotesPrefix); !isPermissionDenied(err) {
		t.Errorf("agents listing %s = %v, want permission denied", RemotesPrefix, err)
	}
	// Everything around the hole works.
	for _, key := range []string{"isthmus/remotes", "isthmus/remotesx", "isthmus/status/remotes/c2", "isthmus/config/Service/default/web", "isthmus/zzz"} {
		if err := agents.Put(ctx, key, []byte("x")); err != nil {
			t.Errorf("agents writing %s: %v", key, err)
		}
	}
	if _, _, err := agents.GetPrefix(ctx, records.StateRoot); err != nil {
		t.Errorf("agents listing %s: %v", records.StateRoot, err)
	}
	if kv, found, err := agents.Get(ctx, InfoKey); err != nil || !found {
		t.Fatalf("server info: %v %v", found, err)
	} else if in, err := DecodeInfo(kv.Value); err != nil || in.Cluster != "c1" || in.LocalURL == "" {
		t.Errorf("server info %+v: %v", in, err)
	}
}

func TestMirroredConfigsAllowRestart(t *testing.T) {
	ctx := testCtx(t)
	cfg := testConfig(t)
	s := start(t, cfg)
	cc2, _ := records.ClusterConfig{Name: "c2", ID: 2}.Marshal()
	cc3, _ := records.ClusterConfig{Name: "c3", ID: 3}.Marshal()
	// c2: a mirrored copy with its remote record; c3: a copy left behind
	// by a disconnect while the server was down.
	for key, v := range map[string][]byte{
		records.ClusterConfigKey("c2"): cc2, RemoteKey("c2"): []byte("{}"),
		records.ClusterConfigKey("c3"): cc3,
	} {
		if err := s.Client().Put(ctx, key, v); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	s = start(t, cfg)
	// A cluster with a heartbeat of its own shares this etcd: refused.
	stamp, _ := records.Stamp{Cluster: "c3", Time: s.Info().Started}.Marshal()
	if err := s.Client().Put(ctx, records.HeartbeatKey("c3"), stamp); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Start(ctx, cfg); err == nil || !strings.Contains(err.Error(), `cluster "c3"`) {
		t.Errorf("start with a live cluster's config in etcd = %v, want refused", err)
	}
}

func TestDataDir(t *testing.T) {
	ctx := testCtx(t)
	cfg := sharedConfig(t)
	s := start(t, cfg)
	if _, err := OpenDataDir(t.TempDir()); err == nil || !strings.Contains(err.Error(), InfoFile) {
		t.Errorf("empty dir: %v", err)
	}
	d, err := OpenDataDir(cfg.DataDir)
	if err != nil {
		t.Fatal(err)
	}
	if in := d.Info(); in.Cluster != "c1" || in.ClusterID != 1 || !in.Embedded || in.Endpoints[0] != "https://"+cfg.ListenClient {
		t.Errorf("info %+v", in)
	}
	ab, err := d.Bundle(UserAgents)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := s.ExportBundle()
	if string(ab.Cert) != string(want.Cert) || ab.Cluster != "c1" {
		t.Error("data dir agents bundle differs from the server's")
	}
	kc, err := d.RootKVConfig()
	if err != nil {
		t.Fatal(err)
	}
	kc.Logger = quiet
	root, err := kvstore.Connect(ctx, kc)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	rb, err := d.RemoteBundle(ctx, root, "c2")
	if err != nil {
		t.Fatal(err)
	}
	if rb.User != "remote-c2" || rb.Cluster != "c1" {
		t.Errorf("remote bundle %s for %s", rb.User, rb.Cluster)
	}
	remote := connectBundle(t, rb)
	if _, _, err := remote.Get(ctx, records.ClusterConfigKey("c1")); err != nil {
		t.Errorf("remote-c2 reading the cluster config: %v", err)
	}
	if _, err := d.RemoteBundle(ctx, root, "c1"); err == nil {
		t.Error("remote bundle for the cluster itself: want error")
	}
	if _, err := d.Bundle("remote-c2"); err == nil {
		t.Error("stored bundle of a remote user: want error")
	}
}
