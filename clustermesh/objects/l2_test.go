package objects

import (
	"strings"
	"testing"
)

const l2Policy = `apiVersion: isthmus.io/v1alpha1
kind: L2AnnouncementPolicy
metadata:
  name: lan
spec:
  serviceSelector:
    matchLabels: {expose: lan}
  nodeSelector:
    matchExpressions:
    - {key: rack, operator: In, values: [r1]}
  interfaceRegex: "eth[0-9]+"
  externalIPs: false
`

func TestDecodeL2Policy(t *testing.T) {
	objs, err := Decode([]byte(l2Policy))
	if err != nil {
		t.Fatal(err)
	}
	p, ok := objs[0].(*L2AnnouncementPolicy)
	if !ok {
		t.Fatalf("decoded %T", objs[0])
	}
	if Key(p) != "L2AnnouncementPolicy/default/lan" {
		t.Errorf("key %s", Key(p))
	}
	// The defaults are written out; the given false stays.
	if p.Spec.LoadBalancerIPs == nil || !*p.Spec.LoadBalancerIPs || p.Spec.ExternalIPs == nil || *p.Spec.ExternalIPs {
		t.Errorf("coverage lb=%v ext=%v", p.Spec.LoadBalancerIPs, p.Spec.ExternalIPs)
	}
	match, err := p.Spec.InterfaceMatcher()
	if err != nil {
		t.Fatal(err)
	}
	// The regex is anchored at both ends.
	for name, want := range map[string]bool{"eth0": true, "eth12": true, "veth0": false, "eth0a": false} {
		if match(name) != want {
			t.Errorf("interface %s: match %v", name, !want)
		}
	}
	svc := Service{Metadata: Meta{Name: "web", Namespace: "shop", Labels: map[string]string{"expose": "lan"}}}
	if !p.Spec.SelectsService(svc) {
		t.Error("service with expose=lan not selected")
	}
	svc.Metadata.Labels = nil
	if p.Spec.SelectsService(svc) {
		t.Error("service without the label selected")
	}
	byNS := L2AnnouncementPolicySpec{ServiceSelector: Selector{MatchLabels: map[string]string{ServiceNamespaceLabel: "shop"}}}
	if !byNS.SelectsService(svc) {
		t.Error("namespace label not matched")
	}
}

func TestDecodeL2PolicyErrors(t *testing.T) {
	base := "apiVersion: isthmus.io/v1alpha1\nkind: L2AnnouncementPolicy\nmetadata: {name: lan}\nspec:\n"
	for _, c := range []struct{ spec, want string }{
		{"  serviceSelector: {}\n", "needs interfaces (a list of names) or interfaceRegex"},
		{"  interfaces: [eth0]\n  interfaceRegex: eth.*\n", "not both"},
		{"  interfaceRegex: \"eth[\"\n", "spec.interfaceRegex: not a valid regular expression"},
		{"  interfaces: [eth0, eth0]\n", `spec.interfaces[1]: "eth0" is already listed`},
		{"  interfaces: [averyveryverylongname]\n", "spec.interfaces[0]: \"averyveryverylongname\" is longer than 15"},
		{"  interfaces: [\"a/b\"]\n", "spec.interfaces[0]"},
		{"  interfaces: [eth0]\n  loadBalancerIPs: false\n  externalIPs: false\n", "would announce nothing"},
		{"  interfaces: [eth0]\n  externalIPs: \"yes\"\n", "spec.externalIPs: must be true or false"},
		{"  interfaces: [eth0]\n  nodeSelector: {matchExpressions: [{key: a, operator: Has}]}\n", "spec.nodeSelector.matchExpressions[0].operator"},
		{"  interfaces: [eth0]\n  vips: [1.2.3.4]\n", "spec.vips: unknown field"},
	} {
		_, err := Decode([]byte(base + c.spec))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("spec %q: got %v, want an error with %q", c.spec, err, c.want)
		}
	}
}
