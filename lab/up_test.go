package lab

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/isthmus-mesh/isthmus/connectivity"
)

func TestStateRoundTripAndLookups(t *testing.T) {
	path := filepath.Join(t.TempDir(), "up.json")
	if _, err := ReadState(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing state: %v, want ErrNotExist", err)
	}
	st := &State{Prefix: "ilabt3st", Encryption: "wireguard", Ready: true,
		Clusters: []StateCluster{{Name: "c1", ID: 1, Router: "ilabt3st-c1-rtr",
			Nodes: []StateNode{{Name: "c1-n1", Netns: "ilabt3st-c1-n1", IPs: []netip.Addr{netip.MustParseAddr("10.101.0.11")}}}}},
		Pods: []StatePod{{Name: "c1-n1-echo1", Cluster: "c1", Node: "c1-n1", Netns: "ilabt3st-c1-n1-echo1",
			IPv4: netip.MustParseAddr("10.1.1.2"), Role: connectivity.RoleEcho}},
	}
	if err := WriteState(path, st); err != nil {
		t.Fatal(err)
	}
	got, err := ReadState(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Prefix != st.Prefix || !got.Ready || len(got.Nodes()) != 1 || got.Nodes()[0].Cluster != "c1" {
		t.Fatalf("read back %+v", got)
	}
	if a := got.Pods[0].Addrs(); len(a) != 1 || a[0] != st.Pods[0].IPv4 {
		t.Errorf("pod addrs %v", a)
	}
	for name, want := range map[string]string{
		"c1-n1-echo1": "ilabt3st-c1-n1-echo1",
		"c1-n1":       "ilabt3st-c1-n1",
		"c1-rtr":      "ilabt3st-c1-rtr",
		"fabric":      "ilabt3st-fabric",
	} {
		if ns, ok := got.FindNetns(name); !ok || ns != want {
			t.Errorf("FindNetns(%q) = %q, %v; want %q", name, ns, ok, want)
		}
	}
	if _, ok := got.FindNetns("nope"); ok {
		t.Error("FindNetns found a name that is not in the lab")
	}
	// A state naming something that is not a lab prefix is refused, so
	// `lab down` never cleans up by a foreign prefix.
	if err := os.WriteFile(path, []byte(`{"prefix":"/"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadState(path); err == nil {
		t.Fatal("ReadState accepted prefix \"/\"")
	}
}
