package desired

import (
	"fmt"
	"maps"
	"net/http"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

func decodeBatch(t *testing.T, yaml string) Batch {
	t.Helper()
	objs, err := objects.Decode([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	b, err := ValidateBatch(objs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func poolYAML(name, cidr string) string {
	return "---\napiVersion: isthmus.io/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {name: " + name + "}\nspec:\n  blocks: [{cidr: " + cidr + "}]\n"
}

// Overlapping pools are refused with both names, against applied pools
// and within one batch; a pool replacing itself is no overlap.
func TestCheckConflictsPools(t *testing.T) {
	cur := Objects(decodeBatch(t, poolYAML("blue", "192.0.2.0/24")).Objects)
	for name, tc := range map[string]struct{ yaml, want string }{
		"against applied": {poolYAML("green", "192.0.2.128/25"), "LoadBalancerIPPool green: block 192.0.2.128-192.0.2.255 overlaps block 192.0.2.0-192.0.2.255 of LoadBalancerIPPool blue"},
		"within batch":    {poolYAML("red", "198.51.100.0/24") + poolYAML("yellow", "198.51.100.7/32"), "LoadBalancerIPPool yellow: block 198.51.100.7 overlaps block 198.51.100.0-198.51.100.255 of LoadBalancerIPPool red"},
	} {
		err := decodeBatch(t, tc.yaml).CheckConflicts(cur)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, tc.want)
		} else if api.StatusOf(err) != http.StatusConflict {
			t.Errorf("%s: status %d, want 409", name, api.StatusOf(err))
		}
	}
	for name, yaml := range map[string]string{
		"replace itself":  poolYAML("blue", "192.0.2.0/25"),
		"disjoint":        poolYAML("green", "198.51.100.0/24"),
		"swap in a batch": poolYAML("blue", "198.51.100.0/24") + poolYAML("green", "192.0.2.0/24"),
	} {
		if err := decodeBatch(t, yaml).CheckConflicts(cur); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func svcYAML(name, vip, extra string) string {
	return "---\napiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: " + name + "}\nspec:\n  vips: [" + vip + "]\n" + extra
}

// A Service claiming another's external address and port or node port is
// refused (409), against applied Services and within one batch; the same
// numbers on another protocol, or a Service replacing itself, are not.
func TestCheckConflictsServices(t *testing.T) {
	np := func(port, proto string) string {
		return "  type: NodePort\n  ports: [{port: 80, nodePort: " + port + ", protocol: " + proto + "}]\n"
	}
	ext := "  externalIPs: [203.0.113.10]\n  ports: [{port: 80}]\n"
	cur := Objects(decodeBatch(t, svcYAML("a", "10.96.0.1", np("30080", "TCP"))+svcYAML("e", "10.96.0.5", ext)).Objects)
	for name, tc := range map[string]struct{ yaml, want string }{
		"node port against applied": {svcYAML("b", "10.96.0.2", np("30080", "TCP")), "service default/b: node port 30080/tcp is already used by service default/a"},
		"node port within batch":    {svcYAML("c", "10.96.0.3", np("30081", "UDP")) + svcYAML("d", "10.96.0.4", np("30081", "UDP")), "service default/d: node port 30081/udp is already used by service default/c"},
		"external address":          {svcYAML("f", "10.96.0.6", ext), "service default/f: frontend 203.0.113.10:80/tcp is already used by service default/e"},
	} {
		err := decodeBatch(t, tc.yaml).CheckConflicts(cur)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, tc.want)
		} else if api.StatusOf(err) != http.StatusConflict {
			t.Errorf("%s: status %d, want 409", name, api.StatusOf(err))
		}
	}
	for name, yaml := range map[string]string{
		"replace itself":      svcYAML("a", "10.96.0.1", np("30080", "TCP")),
		"other protocol":      svcYAML("b", "10.96.0.2", np("30080", "UDP")),
		"move in a batch":     svcYAML("a", "10.96.0.1", np("30090", "TCP")) + svcYAML("b", "10.96.0.2", np("30080", "TCP")),
		"node port as a port": svcYAML("b", "10.96.0.2", "  ports: [{port: 30080}]\n"),
	} {
		if err := decodeBatch(t, yaml).CheckConflicts(cur); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// The memo gives the answers CheckConflicts gives, call after call, and
// a service replaced by a new object is checked with its new frontends.
func TestCheckConflictsMemo(t *testing.T) {
	np := func(port string) string { return "  type: NodePort\n  ports: [{port: 80, nodePort: " + port + "}]\n" }
	cur := Objects(decodeBatch(t, svcYAML("a", "10.96.0.1", np("30080"))+svcYAML("e", "10.96.0.5", np("30085"))).Objects)
	moved := maps.Clone(cur)
	maps.Copy(moved, decodeBatch(t, svcYAML("a", "10.96.0.1", np("30090"))).Objects)
	var memo FrontendMemo
	for i, tc := range []struct {
		cur      Objects
		yaml     string
		conflict bool
	}{
		{cur, svcYAML("b", "10.96.0.2", np("30080")), true},
		{cur, svcYAML("b", "10.96.0.2", np("30085")), true},
		{cur, svcYAML("b", "10.96.0.2", np("30086")), false},
		{moved, svcYAML("b", "10.96.0.2", np("30080")), false},
		{moved, svcYAML("b", "10.96.0.2", np("30090")), true},
		{cur, svcYAML("b", "10.96.0.2", np("30080")), true},
	} {
		b := decodeBatch(t, tc.yaml)
		want := b.CheckConflicts(tc.cur)
		got := b.CheckConflictsMemo(tc.cur, &memo)
		if (want != nil) != tc.conflict || fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("call %d: with the memo %v, without %v (conflict expected: %v)", i, got, want, tc.conflict)
		}
		if len(memo.last) != len(tc.cur) {
			t.Errorf("call %d: the memo holds %d services, want those of the call (%d)", i, len(memo.last), len(tc.cur))
		}
	}
}
