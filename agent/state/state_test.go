package state

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
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

	for _, f := range []string{filepath.Join(EndpointsDir, "default.a.json"), EndpointIDsFile, ObjectsFile} {
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
	if _, err := os.Stat(filepath.Join(dir, EndpointsDir, "default.b.json")); !os.IsNotExist(err) {
		t.Errorf("the deleted endpoint's file: %v", err)
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
	// IDs are never reused, also across restarts, even though b (ID 2) is
	// gone; a restart skips the rest of the block the IDs file reserved.
	if id := s2.AllocateEndpointID(); id != 3+idBlock {
		t.Errorf("next ID after reopen = %d, want %d", id, 3+idBlock)
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
		{EndpointIDsFile, `{"version":2,"nextID":3}`, "has version 2"},
		{filepath.Join(EndpointsDir, "x.a.json"), `{"version":1,"endpoint":{"name":"a"`, "is corrupt"},
		{filepath.Join(EndpointsDir, "x.a.json"), `{"version":1,"endpoint":{"name":"b","namespace":"x"}}`, `holds endpoint "x"/"b"`},
		{filepath.Join(EndpointsDir, "x.a.json"), `{"version":3,"endpoint":{"name":"a","namespace":"x"}}`, "has version 3"},
		{filepath.Join(EndpointsDir, "x.a.json"), `{"version":1,"endpoint":{"name":"a","namespace":"x","extra":1}}`, `unknown field "extra"`},
	} {
		dir := t.TempDir()
		p := filepath.Join(dir, tt.file)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
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
	if err := os.MkdirAll(filepath.Join(dir, EndpointsDir, "default.a.json", "x"), 0o700); err != nil {
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

// An older agent's single endpoints file is moved into per-endpoint files
// on Open, IDs included, and removed; a crash after the files were written
// but before the removal only repeats the move; a later change touches one
// file only.
func TestLegacyEndpointsFileMigrated(t *testing.T) {
	dir := t.TempDir()
	legacy := `{"version":1,"nextID":9,"endpoints":[` +
		`{"name":"a","namespace":"default","netnsPath":"/var/run/netns/a","hostIfName":"isth1","ifIndex":4,"ips":["10.0.0.5"],"identity":7,"id":3,"hostMAC":"02:00:00:00:00:01","podMAC":"02:00:00:00:00:02","created":"2025-01-02T03:04:05Z"},` +
		`{"name":"b","namespace":"prod","netnsPath":"/var/run/netns/b","hostIfName":"isth2","ifIndex":5,"ips":["10.0.0.6"],"identity":7,"id":5,"hostMAC":"02:00:00:00:00:03","podMAC":"02:00:00:00:00:04","created":"2025-01-02T03:04:05Z"}]}`
	write := func() {
		if err := os.WriteFile(filepath.Join(dir, EndpointsFile), []byte(legacy), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	check := func(s *Store) {
		t.Helper()
		eps := s.Endpoints()
		if len(eps) != 2 || eps[0].Key() != "default/a" || eps[0].ID != 3 || eps[1].Key() != "prod/b" || eps[1].IPs[0] != netip.MustParseAddr("10.0.0.6") {
			t.Fatalf("endpoints after the move: %+v", eps)
		}
		if _, err := os.Stat(filepath.Join(dir, EndpointsFile)); !os.IsNotExist(err) {
			t.Errorf("the old file is still there: %v", err)
		}
		for _, f := range []string{"default.a.json", "prod.b.json"} {
			if _, err := os.Stat(filepath.Join(dir, EndpointsDir, f)); err != nil {
				t.Error(err)
			}
		}
	}
	write()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	check(s)
	// The move again, as after a crash before the old file was removed,
	// with one endpoint changed since in its own file: the newer one wins.
	write()
	e, _ := s.Endpoint("prod", "b")
	e.IPs = []netip.Addr{netip.MustParseAddr("10.0.0.6")}
	e.IfIndex = 77
	if err := s.PutEndpoint(e); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	check(s2)
	if b, _ := s2.Endpoint("prod", "b"); b.IfIndex != 77 {
		t.Errorf("the old file's copy won over the endpoint's own file: ifIndex %d", b.IfIndex)
	}
	if id := s2.AllocateEndpointID(); id != 9 {
		t.Errorf("next ID %d after the move, want 9 (the old file's)", id)
	}
}

// The CNI fields survive a reopen, and a file written before they existed
// (no containerID, podIfName, podUID) still loads, with them empty.
func TestCNIFieldsAndOlderFiles(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	cni := testEndpoint("cni", s.AllocateEndpointID())
	cni.ContainerID, cni.PodIfName, cni.PodUID = "0123abcd", "net1", "9f1c-uid"
	if err := s.PutEndpoint(cni); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, EndpointsDir, "default.cni.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"containerID": "0123abcd"`, `"podIfName": "net1"`, `"podUID": "9f1c-uid"`} {
		if !strings.Contains(string(data), want) {
			t.Errorf("endpoint file lacks %s:\n%s", want, data)
		}
	}
	old := `{"version":1,"endpoint":{"name":"old","namespace":"default","netnsPath":"/var/run/netns/old",` +
		`"hostIfName":"isthaaaaaaaaaa","ifIndex":7,"ips":["10.0.0.9"],"identity":1048583,"id":5,` +
		`"hostMAC":"02:00:00:00:00:03","podMAC":"02:00:00:00:00:04","created":"2025-01-02T03:04:05Z"}}`
	if err := os.WriteFile(filepath.Join(dir, EndpointsDir, "default.old.json"), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := s2.Endpoint("default", "cni"); !ok || !reflect.DeepEqual(got, cni) {
		t.Errorf("CNI endpoint after reopen:\n got %+v\nwant %+v", got, cni)
	}
	got, ok := s2.Endpoint("default", "old")
	if !ok || got.ContainerID != "" || got.PodIfName != "" || got.PodUID != "" || got.HostIfName != "isthaaaaaaaaaa" {
		t.Errorf("endpoint of an older agent: %+v, %v", got, ok)
	}
}

// The endpoint IDs file is written once per block of IDs, not at every
// add (each write is two fsyncs on the add's path), and a restart still
// never gives out an ID given before, whether its add completed or not.
func TestEndpointIDsPersistedInBlocks(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	writes, last := 0, ""
	var maxID uint32
	for i := range 100 {
		id := s.AllocateEndpointID()
		maxID = max(maxID, id)
		if i%10 == 9 {
			continue // an add that failed: its ID is not reused either
		}
		if err := s.PutEndpoint(testEndpoint("e"+string(rune('a'+i%26))+strings.Repeat("x", i/26), id)); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, EndpointIDsFile))
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != last {
			writes++
			last = string(b)
		}
	}
	if writes > 2 {
		t.Errorf("the IDs file was written %d times for 90 adds, want at most 2 (blocks of %d)", writes, idBlock)
	}
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if id := s2.AllocateEndpointID(); id <= maxID {
		t.Fatalf("after a restart the next ID is %d; %d was given out before", id, maxID)
	}
}

// objects.json, written without encoding/json, reads back as written:
// no objects, one, several (keys that need escaping, values with and
// without white space, as files of older agents hold them).
func TestEncodeObjectsReadsBack(t *testing.T) {
	for _, objs := range []map[string]json.RawMessage{
		{},
		{"Service/default/a": json.RawMessage(`{"kind":"Service"}`)},
		{
			"Service/default/a":  json.RawMessage(`{"kind":"Service","spec":{"vips":["10.0.0.1"]}}`),
			"Service/x/\"q\"\\<": json.RawMessage("{\n  \"kind\": \"Service\"\n}"),
			"NetworkPolicy/b/c":  json.RawMessage(`[1, 2]`),
		},
	} {
		data := encodeObjects(objs)
		var of objectsFile
		if err := strictjson.Decode(data, &of); err != nil {
			t.Fatalf("%s does not decode: %v", data, err)
		}
		if of.Version != fileVersion || len(of.Objects) != len(objs) {
			t.Fatalf("%s: version %d, %d objects", data, of.Version, len(of.Objects))
		}
		for k, v := range objs {
			if string(of.Objects[k]) != string(v) {
				t.Fatalf("%s: object %q reads back as %s, want %s", data, k, of.Objects[k], v)
			}
		}
	}
}

// LB-IPAM's assignments, written one per line, read back sorted by
// namespace and name: none, one, several.
func TestLBAssignmentsReadBack(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rec := func(ns, name, ip string) records.LBAssignment {
		return records.LBAssignment{Version: records.CurrentVersion, Namespace: ns, Name: name,
			Addresses: []records.LBAddress{{IP: netip.MustParseAddr(ip), Pool: "p"}}}
	}
	for _, as := range [][]records.LBAssignment{
		{},
		{rec("default", "web", "192.0.2.1")},
		{rec("a-b", "c", "192.0.2.2"), rec("a", "b-c", "192.0.2.3"), {Version: records.CurrentVersion, Namespace: "default", Name: "refused", Refused: "no room"}},
	} {
		if err := s.SaveLBAssignments(as); err != nil {
			t.Fatal(err)
		}
		got, err := s.LBAssignments()
		if err != nil {
			t.Fatal(err)
		}
		want := slices.Clone(as)
		slices.SortFunc(want, func(a, b records.LBAssignment) int {
			return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
		})
		if len(want) == 0 {
			want = nil
		}
		if len(got) == 0 {
			got = nil
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("saved %v, read back %v", want, got)
		}
	}
}

// Saving again after edits (encoding only the assignments that changed)
// writes the file a fresh store writes for the same assignments, byte for
// byte, over random sequences of edits; an invalid assignment is refused
// whether or not one of its name was saved before.
func TestLBAssignmentsSavedAgain(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 5))
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cur := map[string]records.LBAssignment{}
	for step := range 100 {
		for range rng.IntN(4) {
			name := fmt.Sprint("s", rng.IntN(10))
			if rng.IntN(4) == 0 {
				delete(cur, name)
				continue
			}
			r := records.LBAssignment{Namespace: "default", Name: name}
			if rng.IntN(5) == 0 {
				r.Refused = "no room"
			} else {
				r.Addresses = []records.LBAddress{{IP: netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(6) + 1)}), Pool: fmt.Sprint("p", rng.IntN(2))}}
			}
			cur[name] = r
		}
		as := slices.Collect(maps.Values(cur))
		if err := s.SaveLBAssignments(as); err != nil {
			t.Fatal(err)
		}
		fresh, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if err := fresh.SaveLBAssignments(as); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(s.path(LBIPAMFile))
		want, _ := os.ReadFile(fresh.path(LBIPAMFile))
		if string(got) != string(want) {
			t.Fatalf("step %d: saved again\n%s\nfresh\n%s", step, got, want)
		}
	}
	bad := records.LBAssignment{Namespace: "default", Name: "s1", Addresses: []records.LBAddress{{Pool: "p"}}}
	if err := s.SaveLBAssignments([]records.LBAssignment{bad}); err == nil {
		t.Error("an invalid assignment was saved")
	}
}

// Endpoint files are written without the store's lock, each endpoint's
// under its own: while one endpoint's write takes its time, another
// endpoint is put and the endpoints are read, and a delete of the same
// endpoint waits for the write, so memory and disk agree.
func TestSlowEndpointWriteBlocksOnlyItsEndpoint(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	inWrite, release := make(chan struct{}), make(chan struct{})
	afterEndpointWrite = func(e Endpoint) {
		if e.Name == "slow" {
			close(inWrite)
			<-release
		}
	}
	t.Cleanup(func() { afterEndpointWrite = nil })
	put := make(chan error, 1)
	go func() { put <- s.PutEndpoint(testEndpoint("slow", 1)) }()
	<-inWrite

	done := make(chan error, 1)
	go func() {
		err := s.PutEndpoint(testEndpoint("other", 2))
		s.Endpoints()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a put of another endpoint waited for a slow write")
	}

	del := make(chan error, 1)
	go func() { del <- s.DeleteEndpoint("default", "slow") }()
	select {
	case err := <-del:
		t.Fatalf("a delete of the endpoint returned during its put's write (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-put; err != nil {
		t.Fatal(err)
	}
	if err := <-del; err != nil {
		t.Fatal(err)
	}
	again, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	mem, disk := s.Endpoints(), again.Endpoints()
	if !reflect.DeepEqual(mem, disk) || len(mem) != 1 || mem[0].Name != "other" {
		t.Errorf("in memory %v, on disk %v; want other alone in both", mem, disk)
	}
}

// The snapshot EndpointsGen patches from the change log equals a sorted
// copy of every endpoint, and EndpointsChangedSince names every endpoint
// that differs between two snapshots, after random puts and deletes (in
// namespaces whose keys sort apart from their names: "a-b/x" < "a/x").
func TestEndpointsSnapshotFollowsChanges(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	type snapshot struct {
		eps []Endpoint
		gen uint64
	}
	var taken []snapshot
	for step := range 300 {
		e := testEndpoint(fmt.Sprint("e", rng.IntN(12)), uint32(step+1))
		e.Namespace = []string{"a", "a-b", "b"}[rng.IntN(3)]
		e.NetnsPath += e.Namespace
		if rng.IntN(3) == 0 {
			err = s.DeleteEndpoint(e.Namespace, e.Name)
		} else {
			err = s.PutEndpoint(e)
		}
		if err != nil {
			t.Fatal(err)
		}
		if rng.IntN(4) > 0 {
			continue // several changes between two snapshots
		}
		eps, gen := s.EndpointsGen()
		if want := s.Endpoints(); !reflect.DeepEqual(slices.Clip(eps), want) && !(len(eps) == 0 && len(want) == 0) {
			t.Fatalf("step %d: snapshot %v, want %v", step, eps, want)
		}
		for _, old := range taken {
			keys, ok := s.EndpointsChangedSince(old.gen, gen)
			if !ok {
				t.Fatalf("step %d: changes since %d not known", step, old.gen)
			}
			for _, k := range diffKeys(old.eps, eps) {
				if !slices.Contains(keys, k) {
					t.Fatalf("step %d: changes since %d are %v, without %s", step, old.gen, keys, k)
				}
			}
		}
		taken = append(taken, snapshot{eps, gen})
	}
	_, gen := s.EndpointsGen()
	if _, ok := s.EndpointsChangedSince(gen, gen+1); ok {
		t.Error("changes past the last are known")
	}
}

// diffKeys returns the keys of the endpoints that differ between a and b.
func diffKeys(a, b []Endpoint) []string {
	byKey := func(l []Endpoint) map[string]Endpoint {
		m := map[string]Endpoint{}
		for _, e := range l {
			m[e.Key()] = e
		}
		return m
	}
	ma, mb := byKey(a), byKey(b)
	var out []string
	for k, e := range ma {
		if f, ok := mb[k]; !ok || !reflect.DeepEqual(e, f) {
			out = append(out, k)
		}
	}
	for k := range mb {
		if _, ok := ma[k]; !ok {
			out = append(out, k)
		}
	}
	return out
}

// A staged endpoint is in memory before its file is written, reaches the
// disk only through commit (a reopened store sees it only after), makes
// a delete wait for the write, and cannot replace an endpoint; a commit
// that fails leaves it in memory for the caller's DeleteEndpoint.
func TestStageEndpoint(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	commit, err := s.StageEndpoint(testEndpoint("a", 1))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Endpoint("default", "a"); !ok {
		t.Fatal("a staged endpoint is not in memory")
	}
	if s2, err := Open(dir); err != nil {
		t.Fatal(err)
	} else if _, ok := s2.Endpoint("default", "a"); ok {
		t.Fatal("a staged endpoint was on disk before its commit")
	}
	del := make(chan error, 1)
	go func() { del <- s.DeleteEndpoint("default", "a") }()
	select {
	case err := <-del:
		t.Fatalf("a delete returned before the staged endpoint's commit (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	if err := commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-del; err != nil {
		t.Fatal(err)
	}

	commit, err = s.StageEndpoint(testEndpoint("b", 3))
	if err != nil {
		t.Fatal(err)
	}
	if err := commit(); err != nil {
		t.Fatal(err)
	}
	if s2, err := Open(dir); err != nil {
		t.Fatal(err)
	} else if got, ok := s2.Endpoint("default", "b"); !ok || got.ID != 3 {
		t.Fatalf("after the commit a reopened store has %+v (%v), want b", got, ok)
	}
	if _, err := s.StageEndpoint(testEndpoint("b", 5)); err == nil {
		t.Fatal("an existing endpoint was staged again")
	}

	// A write that fails: a file stands where the endpoints directory was.
	commit, err = s.StageEndpoint(testEndpoint("c", 4))
	if err != nil {
		t.Fatal(err)
	}
	epDir := filepath.Join(dir, EndpointsDir)
	if err := os.RemoveAll(epDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(epDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := commit(); err == nil {
		t.Fatal("a commit into a file succeeded")
	}
	if err := os.Remove(epDir); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(epDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Endpoint("default", "c"); !ok {
		t.Fatal("a failed commit took the endpoint out of memory; the caller's rollback does")
	}
	if err := s.DeleteEndpoint("default", "c"); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Endpoint("default", "c"); ok {
		t.Fatal("the rollback left the endpoint")
	}
}
