package state

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

func testEndpoint(name string, id uint32) Endpoint {
	return Endpoint{
		Name: name, Namespace: "default",
		Labels:    identity.Labels{"app": name},
		NetnsPath: "/var/run/netns/" + name, HostIfName: "isth0123456789", IfIndex: 42,
		IPs:      []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")},
		Identity: 1<<20 | 7, ID: id,
		HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
		Created: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	id1, id2 := s.AllocateEndpointID(), s.AllocateEndpointID()
	if id1 != 1 || id2 != 2 {
		t.Fatalf("IDs %d, %d; want 1, 2", id1, id2)
	}
	a, b := testEndpoint("a", id1), testEndpoint("b", id2)
	for _, e := range []Endpoint{b, a} {
		if err := s.PutEndpoint(e); err != nil {
			t.Fatal(err)
		}
	}
	svc := []byte(`{"kind":"Service","metadata":{"name":"web","namespace":"default"}}`)
	pol := []byte(`{"kind":"NetworkPolicy","metadata":{"name":"p","namespace":"default"}}`)
	if err := s.UpdateObjects(map[string][]byte{"Service/default/web": svc, "NetworkPolicy/default/p": pol}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteEndpoint("default", "b"); err != nil {
		t.Fatal(err)
	}
	if err := s.UpdateObjects(nil, []string{"NetworkPolicy/default/p"}); err != nil {
		t.Fatal(err)
	}

	for _, f := range []string{EndpointsFile, ObjectsFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, st.Mode().Perm())
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %v", left)
	}

	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := s2.Endpoints(); !reflect.DeepEqual(got, []Endpoint{a}) {
		t.Errorf("endpoints after reopen:\n got %+v\nwant %+v", got, []Endpoint{a})
	}
	if _, ok := s2.Endpoint("default", "b"); ok {
		t.Error("deleted endpoint came back")
	}
	objs := s2.Objects()
	if len(objs) != 1 || !strings.Contains(string(objs["Service/default/web"]), `"web"`) {
		t.Errorf("objects after reopen: %q", objs)
	}
	// IDs are never reused, also across restarts, even though b (ID 2) is gone.
	if id := s2.AllocateEndpointID(); id != 3 {
		t.Errorf("next ID after reopen = %d, want 3", id)
	}
}

func TestReturnedValuesAreCopies(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := testEndpoint("a", 1)
	if err := s.PutEndpoint(e); err != nil {
		t.Fatal(err)
	}
	e.Labels["app"] = "changed"
	got, _ := s.Endpoint("default", "a")
	got.IPs[0] = netip.MustParseAddr("10.9.9.9")
	again, _ := s.Endpoint("default", "a")
	if again.Labels["app"] != "a" || again.IPs[0] != netip.MustParseAddr("10.0.0.5") {
		t.Errorf("store state was changed through a returned value: %+v", again)
	}
}

func TestCorruptFiles(t *testing.T) {
	for _, tt := range []struct {
		file, content, want string
	}{
		{EndpointsFile, `{"version":1,"endpoints":[`, "is corrupt"},
		{EndpointsFile, `{"version":1,"endpoints":[],"extra":true}`, `unknown field "extra"`},
		{EndpointsFile, `{"version":1,"endpoints":[]} {}`, "trailing data"},
		{EndpointsFile, `{"version":9,"endpoints":[]}`, "has version 9"},
		{EndpointsFile, `{"version":1,"endpoints":[{"name":"a","namespace":"x"},{"name":"a","namespace":"x"}]}`, "appears twice"},
		{EndpointsFile, `{"version":1,"endpoints":[{"name":"a","namespace":"x","ips":["not-an-ip"]}]}`, "is corrupt"},
		{ObjectsFile, `not json`, "is corrupt"},
	} {
		dir := t.TempDir()
		p := filepath.Join(dir, tt.file)
		if err := os.WriteFile(p, []byte(tt.content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Open(dir)
		if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), p) {
			t.Errorf("%s %q: error %v, want one naming the file and containing %q", tt.file, tt.content, err, tt.want)
		}
		if b, _ := os.ReadFile(p); string(b) != tt.content {
			t.Errorf("corrupt %s was overwritten", tt.file)
		}
	}
}

func TestFailedWriteChangesNothing(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	// A directory where the file should be makes the rename fail.
	if err := os.Mkdir(filepath.Join(dir, EndpointsFile), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := s.PutEndpoint(testEndpoint("a", 1)); err == nil {
		t.Fatal("PutEndpoint succeeded although the file cannot be written")
	}
	if len(s.Endpoints()) != 0 {
		t.Error("failed PutEndpoint changed the in-memory state")
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(left) > 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
	if err := s.UpdateObjects(map[string][]byte{"Service/default/x": []byte("{")}, nil); err == nil {
		t.Error("UpdateObjects accepted invalid JSON")
	}
}
