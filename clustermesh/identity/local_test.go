package identity

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/isthmus-mesh/isthmus/bpf"
)

func newTestLocal(t *testing.T, clusterID uint32) (*Local, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "identities.json")
	a, err := NewLocal(path, clusterID)
	if err != nil {
		t.Fatalf("NewLocal: %v", err)
	}
	return a, path
}

func labels(app string) Labels {
	return Labels{"app": app, LabelNamespace: "default", LabelCluster: "c1"}
}

func TestNewLocalClusterID(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		id uint32
		ok bool
	}{{0, false}, {1, true}, {4095, true}, {4096, false}} {
		_, err := NewLocal(filepath.Join(dir, fmt.Sprint(tt.id)), tt.id)
		if (err == nil) != tt.ok {
			t.Errorf("NewLocal(cluster %d) = %v, want ok=%v", tt.id, err, tt.ok)
		}
	}
	if _, err := NewLocal("", 1); err == nil {
		t.Error("NewLocal with empty path: want error")
	}
}

func TestAllocateSameLabelsSameID(t *testing.T) {
	ctx := context.Background()
	a, _ := newTestLocal(t, 7)
	id1, err := a.Allocate(ctx, labels("web"))
	if err != nil {
		t.Fatal(err)
	}
	if ClusterIDOf(id1) != 7 || id1&MaxLocal == 0 {
		t.Errorf("id %d (%#x) is not a cluster-7 identity", id1, id1)
	}
	// A different map with the same content is the same identity.
	id2, err := a.Allocate(ctx, maps.Clone(labels("web")))
	if err != nil {
		t.Fatal(err)
	}
	if id1 != id2 {
		t.Errorf("same labels: %d != %d", id1, id2)
	}
	id3, err := a.Allocate(ctx, labels("db"))
	if err != nil {
		t.Fatal(err)
	}
	if id3 == id1 {
		t.Errorf("different labels got the same ID %d", id3)
	}
	got, ok := a.Get(id1)
	if !ok || !maps.Equal(got, labels("web")) {
		t.Errorf("Get(%d) = %v, %v", id1, got, ok)
	}
	// The returned labels are a copy.
	got["app"] = "mutated"
	if again, _ := a.Get(id1); again["app"] != "web" {
		t.Error("Get returned internal state")
	}
}

func TestAllocateRejectsBadLabels(t *testing.T) {
	a, _ := newTestLocal(t, 1)
	for _, l := range []Labels{nil, {}, {"bad key": "v"}, {"k": "bad value"}} {
		if _, err := a.Allocate(context.Background(), l); err == nil {
			t.Errorf("Allocate(%v): want error", l)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := a.Allocate(ctx, labels("web")); !errors.Is(err, context.Canceled) {
		t.Errorf("Allocate with cancelled ctx = %v", err)
	}
}

func TestReleaseRefcount(t *testing.T) {
	ctx := context.Background()
	a, _ := newTestLocal(t, 1)
	id, _ := a.Allocate(ctx, labels("web"))
	if _, err := a.Allocate(ctx, labels("web")); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Get(id); !ok {
		t.Fatal("identity freed while still referenced")
	}
	if err := a.Release(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Get(id); ok {
		t.Fatal("identity still present after last release")
	}
	if err := a.Release(ctx, id); !errors.Is(err, ErrNotFound) {
		t.Errorf("release of freed id = %v, want ErrNotFound", err)
	}
	if err := a.Release(ctx, 1); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Errorf("release of host identity = %v, want reserved error", err)
	}
}

func TestNoImmediateReuse(t *testing.T) {
	ctx := context.Background()
	a, _ := newTestLocal(t, 1)
	id1, _ := a.Allocate(ctx, labels("a"))
	if err := a.Release(ctx, id1); err != nil {
		t.Fatal(err)
	}
	id2, _ := a.Allocate(ctx, labels("b"))
	if id2 == id1 {
		t.Errorf("freed ID %d reused immediately", id1)
	}
	// Same labels after release: a new ID too (the old one is gone).
	id3, _ := a.Allocate(ctx, labels("a"))
	if id3 == id1 || id3 == id2 {
		t.Errorf("got %d, want a fresh ID (not %d or %d)", id3, id1, id2)
	}
}

func TestExhaustionAndWrap(t *testing.T) {
	ctx := context.Background()
	a, _ := newTestLocal(t, 2)
	a.maxLocal = 3
	var ids []uint32
	for _, app := range []string{"a", "b", "c"} {
		id, err := a.Allocate(ctx, labels(app))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	_, err := a.Allocate(ctx, labels("d"))
	if err == nil || !strings.Contains(err.Error(), "exhausted") {
		t.Fatalf("4th allocation with limit 3 = %v, want exhausted", err)
	}
	// An existing label set still gets its ID when the space is full.
	if id, err := a.Allocate(ctx, labels("a")); err != nil || id != ids[0] {
		t.Fatalf("re-allocating existing labels = %d, %v", id, err)
	}
	// Free the middle one: the cursor wraps around and finds it.
	if err := a.Release(ctx, ids[1]); err != nil {
		t.Fatal(err)
	}
	id, err := a.Allocate(ctx, labels("d"))
	if err != nil {
		t.Fatal(err)
	}
	if id != ids[1] {
		t.Errorf("after wrap got %d, want freed %d", id, ids[1])
	}
	want := []uint32{2<<20 | 1, 2<<20 | 2, 2<<20 | 3}
	for i, got := range a.List() {
		if got.ID != want[i] {
			t.Errorf("List()[%d].ID = %d, want %d", i, got.ID, want[i])
		}
	}
}

func TestPersistence(t *testing.T) {
	ctx := context.Background()
	a, path := newTestLocal(t, 3)
	web, _ := a.Allocate(ctx, labels("web"))
	a.Allocate(ctx, labels("web"))
	db, _ := a.Allocate(ctx, labels("db"))
	gone, _ := a.Allocate(ctx, labels("gone"))
	if err := a.Release(ctx, gone); err != nil {
		t.Fatal(err)
	}

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("state file mode %o, want 600", perm)
	}

	b, err := NewLocal(path, 3)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	if got := b.List(); len(got) != 2 || got[0].ID != web || got[1].ID != db {
		t.Fatalf("after reopen List() = %v", got)
	}
	// Reference counts survived: web needs two releases.
	if err := b.Release(ctx, web); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.Get(web); !ok {
		t.Error("refcount lost across reopen")
	}
	// The cursor survived: the freed ID is not handed out next.
	next, _ := b.Allocate(ctx, labels("new"))
	if next == gone || next <= gone {
		t.Errorf("after reopen got %d, want a fresh ID after %d", next, gone)
	}
	if _, err := NewLocal(path, 4); err == nil || !strings.Contains(err.Error(), "cluster ID 3") {
		t.Errorf("reopen for another cluster = %v, want cluster mismatch", err)
	}
	// No temp files are left behind.
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want 1", len(entries))
	}
}

func TestCorruptStateFile(t *testing.T) {
	tests := []struct {
		name, content, want string
	}{
		{"not json", "{oops", "corrupt"},
		{"empty", "", "corrupt"},
		{"unknown field", `{"version":1,"clusterID":1,"next":1,"identities":[],"extra":1}`, "unknown field"},
		{"wrong version", `{"version":9,"clusterID":1,"next":1,"identities":[]}`, "version 9"},
		{"foreign id", `{"version":1,"clusterID":1,"next":1,"identities":[{"id":2097153,"labels":{"a":"b"},"refs":1}]}`, "not an identity of cluster 1"},
		{"zero refs", `{"version":1,"clusterID":1,"next":1,"identities":[{"id":1048577,"labels":{"a":"b"},"refs":0}]}`, "no references"},
		{"no labels", `{"version":1,"clusterID":1,"next":1,"identities":[{"id":1048577,"labels":{},"refs":1}]}`, "no labels"},
		{"bad labels", `{"version":1,"clusterID":1,"next":1,"identities":[{"id":1048577,"labels":{"a b":"c"},"refs":1}]}`, `label key "a b"`},
		{"duplicate id", `{"version":1,"clusterID":1,"next":1,"identities":[{"id":1048577,"labels":{"a":"b"},"refs":1},{"id":1048577,"labels":{"a":"c"},"refs":1}]}`, "more than once"},
		{"duplicate labels", `{"version":1,"clusterID":1,"next":1,"identities":[{"id":1048577,"labels":{"a":"b"},"refs":1},{"id":1048578,"labels":{"a":"b"},"refs":1}]}`, "belong to both"},
		{"trailing", `{"version":1,"clusterID":1,"next":1,"identities":[]} {}`, "trailing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := NewLocal(path, 1)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("NewLocal on %s = %v, want error naming the file and containing %q", tt.name, err, tt.want)
			}
		})
	}
}

func TestSaveFailureRollsBack(t *testing.T) {
	ctx := context.Background()
	a, path := newTestLocal(t, 1)
	id, err := a.Allocate(ctx, labels("web"))
	if err != nil {
		t.Fatal(err)
	}
	// Make the directory unwritable by replacing it with a file.
	dir := filepath.Dir(path)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Allocate(ctx, labels("db")); err == nil {
		t.Fatal("Allocate with unwritable state: want error")
	}
	if err := a.Release(ctx, id); err == nil {
		t.Fatal("Release with unwritable state: want error")
	}
	if got := a.List(); len(got) != 1 || got[0].ID != id {
		t.Errorf("state changed despite failed saves: %v", got)
	}
}

func TestConcurrentAllocate(t *testing.T) {
	ctx := context.Background()
	a, path := newTestLocal(t, 9)
	const workers, apps = 8, 10
	ids := make([][]uint32, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range apps {
				id, err := a.Allocate(ctx, labels(fmt.Sprint("app", i)))
				if err != nil {
					t.Error(err)
					return
				}
				ids[w] = append(ids[w], id)
			}
		})
	}
	wg.Wait()
	for w := 1; w < workers; w++ {
		for i := range apps {
			if ids[w][i] != ids[0][i] {
				t.Fatalf("worker %d app%d got %d, worker 0 got %d", w, i, ids[w][i], ids[0][i])
			}
		}
	}
	if n := len(a.List()); n != apps {
		t.Fatalf("%d identities, want %d", n, apps)
	}
	// Release concurrently: every reference once.
	for w := range workers {
		wg.Go(func() {
			for _, id := range ids[w] {
				if err := a.Release(ctx, id); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if n := len(a.List()); n != 0 {
		t.Errorf("%d identities left after releasing all references", n)
	}
	b, err := NewLocal(path, 9)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(b.List()); n != 0 {
		t.Errorf("reopened state holds %d identities", n)
	}
}

func TestReserved(t *testing.T) {
	// Must agree with the datapath constants.
	for name, want := range map[string]uint32{
		"host":        bpf.IdentityHost,
		"world":       bpf.IdentityWorld,
		"unmanaged":   bpf.IdentityUnmanaged,
		"health":      bpf.IdentityHealth,
		"remote-node": bpf.IdentityRemote,
		"ingress":     8,
	} {
		id, ok := ReservedIdentity(name)
		if !ok || id != want {
			t.Errorf("ReservedIdentity(%q) = %d, %v; want %d", name, id, ok, want)
		}
		back, ok := ReservedName(want)
		if !ok || back != name {
			t.Errorf("ReservedName(%d) = %q, %v; want %q", want, back, ok, name)
		}
	}
	if _, ok := ReservedIdentity("nope"); ok {
		t.Error("unknown reserved name found")
	}
	if _, ok := ReservedName(5); ok {
		t.Error("unused reserved ID 5 has a name")
	}
	a, _ := newTestLocal(t, 1)
	l, ok := a.Get(bpf.IdentityWorld)
	if !ok || l[LabelReserved] != "world" {
		t.Errorf("Get(world) = %v, %v", l, ok)
	}
	if len(a.List()) != 0 {
		t.Error("List includes reserved identities")
	}
}

func TestClusterIDOf(t *testing.T) {
	tests := []struct{ id, want uint32 }{
		{0, 0}, {1, 0}, {255, 0}, {1<<20 | 1, 1}, {4095<<20 | MaxLocal, 4095},
	}
	for _, tt := range tests {
		if got := ClusterIDOf(tt.id); got != tt.want {
			t.Errorf("ClusterIDOf(%#x) = %d, want %d", tt.id, got, tt.want)
		}
	}
}

// Version moves with the set of identities, and only with it: a new
// reference to an existing identity, or one of several dropped, leaves
// it; a new identity or a freed one moves it.
func TestLocalVersion(t *testing.T) {
	ctx := context.Background()
	a, _ := newTestLocal(t, 1)
	v := a.Version()
	step := func(what string, moves bool, fn func() error) {
		t.Helper()
		if err := fn(); err != nil {
			t.Fatal(err)
		}
		if nv := a.Version(); (nv != v) != moves {
			t.Errorf("%s: version %d -> %d, want moved %v", what, v, nv, moves)
		}
		v = a.Version()
	}
	var id uint32
	step("new identity", true, func() (err error) { id, err = a.Allocate(ctx, labels("web")); return err })
	step("another reference", false, func() error { _, err := a.Allocate(ctx, labels("web")); return err })
	step("one reference dropped", false, func() error { return a.Release(ctx, id) })
	step("last reference dropped", true, func() error { return a.Release(ctx, id) })
}

// A reference on an identity that stays is not written (two fsyncs on
// every endpoint add and delete otherwise); after a restart SetRefs sets
// the counts from the users and frees the identities nobody uses.
func TestRefsInMemoryAndSetRefs(t *testing.T) {
	ctx := context.Background()
	a, path := newTestLocal(t, 5)
	web, _ := a.Allocate(ctx, labels("web"))
	db, _ := a.Allocate(ctx, labels("db"))
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if id, err := a.Allocate(ctx, labels("web")); err != nil || id != web {
			t.Fatalf("Allocate web again = %d, %v", id, err)
		}
	}
	if err := a.Release(ctx, web); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(path); string(after) != string(before) {
		t.Errorf("a reference on an identity that stays rewrote the state:\n%s\nwant\n%s", after, before)
	}

	// A restart: the users say web has three references and db none.
	b, err := NewLocal(path, 5)
	if err != nil {
		t.Fatal(err)
	}
	v := b.Version()
	freed, err := b.SetRefs(map[uint32]uint64{web: 3})
	if err != nil {
		t.Fatal(err)
	}
	if len(freed) != 1 || freed[0] != db {
		t.Errorf("SetRefs freed %v, want [%d]", freed, db)
	}
	if _, ok := b.Get(db); ok || b.Version() == v {
		t.Error("db is still there, or the version did not move")
	}
	for i := range 3 {
		if _, ok := b.Get(web); !ok {
			t.Fatalf("web gone after %d of its 3 releases", i)
		}
		if err := b.Release(ctx, web); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := b.Get(web); ok {
		t.Error("web survived its last release")
	}
	c, err := NewLocal(path, 5)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.List(); len(got) != 0 {
		t.Errorf("the file still holds %v", got)
	}
}
