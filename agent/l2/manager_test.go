package l2

import (
	"io"
	"log/slog"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	gl2 "github.com/isthmus-mesh/isthmus/gateway/l2"
)

// A node without an L2 announcement policy never lists its interfaces:
// the election runs every 25 ms, and on a node whose pods come and go the
// link watch empties the cache each time, so every election would dump
// every link (each pod's veth) from the kernel for nothing. With a policy
// it lists them.
func TestNoPolicyListsNoLinks(t *testing.T) {
	m := New(Config{Node: "n1", Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	listed := 0
	m.listLinks = func() ([]gl2.Link, error) {
		listed++
		return []gl2.Link{{Name: "eth0", Carrier: true}}, nil
	}
	for range 3 {
		m.linksChanged() // a pod's veth came or went
		m.elect()
	}
	if listed != 0 {
		t.Fatalf("the interfaces were listed %d times without a policy", listed)
	}
	m.SetInput(Input{Policies: []objects.L2AnnouncementPolicy{{Metadata: objects.Meta{Name: "p", Namespace: "default"},
		Spec: objects.L2AnnouncementPolicySpec{Interfaces: []string{"^nomatch$"}}}}})
	m.elect()
	if listed != 1 {
		t.Fatalf("the interfaces were listed %d times with a policy, want 1", listed)
	}
}
