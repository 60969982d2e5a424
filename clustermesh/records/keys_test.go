package records

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestKeyLayout(t *testing.T) {
	p := netip.MustParsePrefix
	for got, want := range map[string]string{
		ClusterConfigKey("c1"):                              "isthmus/cluster-config/c1",
		HeartbeatKey("c1"):                                  "isthmus/heartbeat/c1",
		NodeKey("c1", "n1.example"):                         "isthmus/state/nodes/v1/c1/n1.example",
		IPCacheKey("c1", "n1", p("10.0.0.1/32")):            "isthmus/state/ip/v1/c1/n1/10.0.0.1",
		IPCacheKey("c1", "n1", p("fd00::1/128")):            "isthmus/state/ip/v1/c1/n1/fd00::1",
		IPCacheKey("c1", "n1", p("10.1.0.0/16")):            "isthmus/state/ip/v1/c1/n1/10.1.0.0/16",
		ServiceKey("c1", "default", "web"):                  "isthmus/state/services/v1/c1/default/web",
		IdentityIDKey(1<<20 | 5):                            "isthmus/state/identities/v1/id/1048581",
		IdentityValueKey("a=1,isthmus.io/cluster=c1", "n1"): "isthmus/state/identities/v1/value/a=1,isthmus.io/cluster=c1/n1",
		IdentityLabelsKey("a=1"):                            "isthmus/state/identities/v1/labels/a=1",
		SyncedKey("c1", KindNodes):                          "isthmus/synced/c1/isthmus/state/nodes/v1",
		CachePrefix(KindIP, "c2"):                           "isthmus/cache/ip/v1/c2/",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

func TestParseKeysRoundTrip(t *testing.T) {
	if c, err := ParseClusterConfigKey(ClusterConfigKey("c-1")); err != nil || c != "c-1" {
		t.Errorf("ParseClusterConfigKey = %q, %v", c, err)
	}
	if c, err := ParseHeartbeatKey(HeartbeatKey("c1")); err != nil || c != "c1" {
		t.Errorf("ParseHeartbeatKey = %q, %v", c, err)
	}
	if c, n, err := ParseNodeKey(NodeKey("c1", "node-1.rack2")); err != nil || c != "c1" || n != "node-1.rack2" {
		t.Errorf("ParseNodeKey = %q %q %v", c, n, err)
	}
	for _, s := range []string{"10.0.0.1/32", "fd00::1/128", "10.1.0.0/16", "fd00:1::/64", "0.0.0.0/0"} {
		want := netip.MustParsePrefix(s)
		c, node, got, err := ParseIPCacheKey(IPCacheKey("c1", "n1", want))
		if err != nil || c != "c1" || node != "n1" || got != want {
			t.Errorf("ParseIPCacheKey(%s) = %q %q %v %v", s, c, node, got, err)
		}
	}
	if c, ns, n, err := ParseServiceKey(ServiceKey("c1", "kube-system", "dns")); err != nil || c != "c1" || ns != "kube-system" || n != "dns" {
		t.Errorf("ParseServiceKey = %q %q %q %v", c, ns, n, err)
	}
	if id, err := ParseIdentityIDKey(IdentityIDKey(4095<<20 | 1)); err != nil || id != 4095<<20|1 {
		t.Errorf("ParseIdentityIDKey = %d %v", id, err)
	}
	labels := "app=web,isthmus.io/cluster=c1,isthmus.io/namespace=default"
	if l, n, err := ParseIdentityValueKey(IdentityValueKey(labels, "n1")); err != nil || l != labels || n != "n1" {
		t.Errorf("ParseIdentityValueKey = %q %q %v", l, n, err)
	}
	if l, err := ParseIdentityLabelsKey(IdentityLabelsKey(labels)); err != nil || l != labels {
		t.Errorf("ParseIdentityLabelsKey = %q %v", l, err)
	}
	for _, k := range Kinds {
		if c, got, err := ParseSyncedKey(SyncedKey("c1", k)); err != nil || c != "c1" || got != k {
			t.Errorf("ParseSyncedKey(%s) = %q %q %v", k, c, got, err)
		}
	}
}

func TestParseKeysRejects(t *testing.T) {
	bad := map[string]func(string) error{
		"isthmus/cluster-config/":                           func(k string) error { _, err := ParseClusterConfigKey(k); return err },
		"isthmus/cluster-config/C1":                         func(k string) error { _, err := ParseClusterConfigKey(k); return err },
		"isthmus/cluster-config/a/b":                        func(k string) error { _, err := ParseClusterConfigKey(k); return err },
		"isthmus/cluster-config/" + strings.Repeat("a", 33): func(k string) error { _, err := ParseClusterConfigKey(k); return err },
		"isthmus/state/nodes/v1/c1":                         func(k string) error { _, _, err := ParseNodeKey(k); return err },
		"isthmus/state/nodes/v1/c1/":                        func(k string) error { _, _, err := ParseNodeKey(k); return err },
		"isthmus/state/nodes/v1/c1/a/b":                     func(k string) error { _, _, err := ParseNodeKey(k); return err },
		"isthmus/state/nodes/v2/c1/n":                       func(k string) error { _, _, err := ParseNodeKey(k); return err },
		"isthmus/state/ip/v1/c1/n1/10.0.0.1/32":             func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/n1/10.0.0.1/16":             func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/n1/::ffff:10.0.0.1":         func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/n1/fe80::1%eth0":            func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/n1/010.0.0.1":               func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/n1/FD00::1":                 func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/10.0.0.1":                   func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/ip/v1/c1/N1/10.0.0.1":                func(k string) error { _, _, _, err := ParseIPCacheKey(k); return err },
		"isthmus/state/services/v1/c1/default":              func(k string) error { _, _, _, err := ParseServiceKey(k); return err },
		"isthmus/state/services/v1/c1/default/a/b":          func(k string) error { _, _, _, err := ParseServiceKey(k); return err },
		"isthmus/state/identities/v1/id/0":                  func(k string) error { _, err := ParseIdentityIDKey(k); return err },
		"isthmus/state/identities/v1/id/01048577":           func(k string) error { _, err := ParseIdentityIDKey(k); return err },
		"isthmus/state/identities/v1/id/+1048577":           func(k string) error { _, err := ParseIdentityIDKey(k); return err },
		"isthmus/state/identities/v1/id/1048576":            func(k string) error { _, err := ParseIdentityIDKey(k); return err },
		"isthmus/state/identities/v1/id/4294967296":         func(k string) error { _, err := ParseIdentityIDKey(k); return err },
		"isthmus/state/identities/v1/value/a=1":             func(k string) error { _, _, err := ParseIdentityValueKey(k); return err },
		"isthmus/state/identities/v1/value/b=1,a=1/n":       func(k string) error { _, _, err := ParseIdentityValueKey(k); return err },
		"isthmus/state/identities/v1/value//n":              func(k string) error { _, _, err := ParseIdentityValueKey(k); return err },
		"isthmus/state/identities/v1/labels/a=1, b=2":       func(k string) error { _, err := ParseIdentityLabelsKey(k); return err },
		"isthmus/synced/c1/isthmus/state/foo/v1":            func(k string) error { _, _, err := ParseSyncedKey(k); return err },
	}
	for key, parse := range bad {
		err := parse(key)
		if err == nil {
			t.Errorf("%q: parsed, want an error", key)
		} else if !errors.Is(err, ErrMalformed) {
			t.Errorf("%q: error %v does not wrap ErrMalformed", key, err)
		}
	}
}

func TestCacheKeys(t *testing.T) {
	for state, want := range map[string]string{
		NodeKey("c2", "n1"): "isthmus/cache/nodes/v1/c2/n1",
		IPCacheKey("c2", "n1", netip.MustParsePrefix("10.0.0.0/8")): "isthmus/cache/ip/v1/c2/n1/10.0.0.0/8",
		ServiceKey("c2", "ns", "svc"):                               "isthmus/cache/services/v1/c2/ns/svc",
		IdentityIDKey(2<<20 | 7):                                    "isthmus/cache/identities/v1/c2/id/2097159",
	} {
		got, err := CacheKey(state, "c2")
		if err != nil || got != want {
			t.Errorf("CacheKey(%s) = %q, %v; want %q", state, got, err, want)
			continue
		}
		back, cluster, err := StateKey(got)
		if err != nil || back != state || cluster != "c2" {
			t.Errorf("StateKey(%s) = %q %q %v", got, back, cluster, err)
		}
	}
	if _, err := CacheKey(NodeKey("c1", "n1"), "c2"); !errors.Is(err, ErrClusterMismatch) {
		t.Errorf("mirroring c1's key as c2's = %v, want ErrClusterMismatch", err)
	}
	for _, k := range []string{"isthmus/cluster-config/c2", "isthmus/state/nodes/v1/c2", "isthmus/state/nodes/v1/c2/"} {
		if _, err := CacheKey(k, "c2"); err == nil {
			t.Errorf("CacheKey(%q) accepted", k)
		}
	}
	for _, k := range []string{"isthmus/cache/x/v1/c2/a", "isthmus/cache/nodes/v1/c2", "isthmus/cache/nodes/v1/C2/n", "isthmus/cache/nodes"} {
		if _, _, err := StateKey(k); err == nil {
			t.Errorf("StateKey(%q) accepted", k)
		}
	}
}

func TestLabelsString(t *testing.T) {
	l := map[string]string{"z": "1", "a": "", "isthmus.io/cluster": "c1"}
	s := LabelsString(l)
	if s != "a=,isthmus.io/cluster=c1,z=1" {
		t.Fatalf("LabelsString = %q", s)
	}
	back, err := ParseLabelsString(s)
	if err != nil || len(back) != 3 || back["isthmus.io/cluster"] != "c1" {
		t.Fatalf("ParseLabelsString = %v, %v", back, err)
	}
	for _, bad := range []string{"", "a", "a=1,a=1", "b=1,a=1", "a=1,", " a=1", "a=b/c", "A.io/x=1"} {
		if _, err := ParseLabelsString(bad); err == nil {
			t.Errorf("ParseLabelsString(%q) accepted", bad)
		}
	}
}
