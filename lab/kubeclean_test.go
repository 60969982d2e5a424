package lab

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The sandbox namespaces a lab's agents hold endpoints in are found from
// their state files, whatever else those files hold.
func TestRecordedSandboxNetns(t *testing.T) {
	dir := t.TempDir()
	write := func(node, name, body string) {
		d := filepath.Join(dir, "helm-state", node, "endpoints")
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("n1", "default.a.json", `{"endpoint":{"netnsPath":"/var/run/netns/cni-8fbcfb93-7736-d513-3634-494b620b83e7"}}`)
	write("n2", "default.b.json", `{"endpoint":{"netnsPath":"/run/netns/cni-0dc8ea5e-d2bb-9dd0-31a2-c272060f819e"}}`)
	write("n2", "default.c.json", `{"endpoint":{"netnsPath":"/var/run/netns/ilab-c1-n1-pod1"}}`) // not a CRI sandbox
	got := slices.Sorted(maps.Keys(recordedSandboxNetns([]string{dir, ""})))
	want := []string{"cni-0dc8ea5e-d2bb-9dd0-31a2-c272060f819e", "cni-8fbcfb93-7736-d513-3634-494b620b83e7"}
	if !slices.Equal(got, want) {
		t.Fatalf("recorded %v, want %v", got, want)
	}
}
