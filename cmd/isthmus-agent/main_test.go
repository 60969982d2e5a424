package main

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/agent"
)

func parse(t *testing.T, args ...string) (agent.Config, error) {
	t.Helper()
	var got agent.Config
	cmd := newCommand(func(c agent.Config) error { got = c; return nil })
	cmd.SetArgs(args)
	err := cmd.Execute()
	return got, err
}

func TestClusterModeFlags(t *testing.T) {
	cfg, err := parse(t, "--node-name", "n1", "--pod-cidr", "10.1.1.0/24",
		"--kvstore-endpoints", "https://192.0.2.1:2379, https://192.0.2.2:2379",
		"--kvstore-bundle", "/pki/agents", "--node-ip", "192.0.2.11", "--node-ip", "2001:db8::11", "--lease-ttl", "30s")
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.ClusterMode() || !slices.Equal(cfg.KVStoreEndpoints, []string{"https://192.0.2.1:2379", "https://192.0.2.2:2379"}) ||
		cfg.KVStoreBundle != "/pki/agents" || cfg.LeaseTTL != 30*time.Second ||
		!slices.Equal(cfg.NodeIPs, []netip.Addr{netip.MustParseAddr("192.0.2.11"), netip.MustParseAddr("2001:db8::11")}) {
		t.Errorf("config %+v", cfg)
	}

	cfg, err = parse(t, "--node-name", "n1", "--pod-cidr", "10.1.1.0/24")
	if err != nil || cfg.ClusterMode() || cfg.LeaseTTL != agent.DefaultLeaseTTL {
		t.Errorf("standalone: %+v, %v", cfg, err)
	}

	if _, err := parse(t, "--pod-cidr", "10.1.1.0/24", "--node-ip", "node1"); err == nil || !strings.Contains(err.Error(), `--node-ip "node1"`) {
		t.Errorf("bad node IP: %v", err)
	}
}

func TestBigTCPFlags(t *testing.T) {
	cfg, err := parse(t, "--pod-cidr", "10.1.1.0/24")
	if err != nil || cfg.BigTCP.IPv6 != "auto" || cfg.BigTCP.IPv4 != "auto" || cfg.BigTCP.Size != 196608 {
		t.Errorf("defaults: %+v, %v", cfg.BigTCP, err)
	}
	cfg, err = parse(t, "--pod-cidr", "10.1.1.0/24", "--ipv6-big-tcp", "off", "--ipv4-big-tcp", "on", "--big-tcp-size", "524288")
	if err != nil || cfg.BigTCP.IPv6 != "off" || cfg.BigTCP.IPv4 != "on" || cfg.BigTCP.Size != 524288 {
		t.Errorf("set: %+v, %v", cfg.BigTCP, err)
	}
	if _, err := parse(t, "--pod-cidr", "10.1.1.0/24", "--ipv6-big-tcp", "yes"); err == nil || !strings.Contains(err.Error(), `--ipv6-big-tcp "yes": want off, on or auto`) {
		t.Errorf("bad mode: %v", err)
	}
	// The size is checked with the rest of the configuration.
	cfg, _ = parse(t, "--pod-cidr", "10.1.1.0/24", "--big-tcp-size", "65536")
	if _, err := agent.New(cfg); err == nil || !strings.Contains(err.Error(), "--big-tcp-size 65536 out of range 65537-524288") {
		t.Errorf("size 65536: %v", err)
	}
}

func TestCNIFlags(t *testing.T) {
	cfg, err := parse(t, "--pod-cidr", "10.1.1.0/24")
	if err != nil || cfg.CNI.Enabled() || cfg.CNI.CNIVersion != "1.0.0" {
		t.Errorf("defaults: %+v, %v", cfg.CNI, err)
	}
	cfg, err = parse(t, "--pod-cidr", "10.1.1.0/24", "--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir", "/etc/cni/net.d")
	if err != nil || !cfg.CNI.Enabled() || !strings.HasSuffix(cfg.CNI.PluginPath, "/isthmus-cni") {
		t.Errorf("set: %+v, %v", cfg.CNI, err)
	}
	cfg, err = parse(t, "--pod-cidr", "10.1.1.0/24", "--cni-bin-dir", "/b", "--cni-plugin-path", "/x/isthmus-cni", "--cni-version", "1.1.0")
	if err != nil || cfg.CNI.PluginPath != "/x/isthmus-cni" || cfg.CNI.CNIVersion != "1.1.0" {
		t.Errorf("plugin path: %+v, %v", cfg.CNI, err)
	}
}
